"""Patch encoders: a registry of presets over timm, built with one factory.

    enc = create_encoder("resnet50", weights="/models/resnet50.safetensors")
    feats = enc.model(enc.preprocess(uint8_batch))          # (B, D)

A name is a registered preset (pathology foundation models whose architecture
timm builds, plus tiny models for tests) or any timm model name. Nothing is
downloaded: ``pretrained=False`` plus a local ``weights`` file, or an
``hf-hub:`` name for users who have network. Weights load safely
(safetensors, or ``torch.load(weights_only=True)``) and their sha256 is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from gigamil.errors import GigamilError, UsageError
from gigamil.registry import Registry

__all__ = ["EncoderSpec", "Encoder", "ENCODERS", "create_encoder", "list_encoders",
           "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger("gigamil.encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one encoder with timm, and what it expects."""

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    weights: str = ""  # the file users are expected to pass, and where it comes from
    pooling: str = "default"  # "default" (timm's pooled features) or "cls+mean" (Virchow)
    description: str = ""
    feature_dim: int | None = None  # declared for presets; measured when built


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def _preset(spec: EncoderSpec) -> EncoderSpec:
    ENCODERS.register(spec.name)(lambda: spec)
    return spec


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


# ---- presets ---------------------------------------------------------------------
_preset(EncoderSpec("resnet50", "resnet50", {}, weights="ImageNet resnet50 (timm) .safetensors",
                    feature_dim=2048, description="ImageNet ResNet-50, 2048-d (CLAM's default, truncated there)"))
_preset(EncoderSpec("resnet18", "resnet18", {}, weights="ImageNet resnet18 (timm) .safetensors",
                    feature_dim=512, description="ImageNet ResNet-18, 512-d"))
_preset(EncoderSpec("vit_small", "vit_small_patch16_224", {},
                    weights="ImageNet vit_small_patch16_224 (timm) .safetensors",
                    feature_dim=384, description="ImageNet ViT-S/16, 384-d"))
_preset(EncoderSpec("vit_base", "vit_base_patch16_224", {},
                    weights="ImageNet vit_base_patch16_224 (timm) .safetensors",
                    feature_dim=768, description="ImageNet ViT-B/16, 768-d"))
_preset(EncoderSpec(
    "uni", "vit_large_patch16_224",
    {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    weights="MahmoodLab/UNI pytorch_model.bin", feature_dim=1024, description="UNI (ViT-L/16), 1024-d"))
_preset(EncoderSpec(
    "uni2-h", "vit_giant_patch14_224",
    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
     "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
     "dynamic_img_size": True, "@swiglu": True},
    weights="MahmoodLab/UNI2-h pytorch_model.bin", feature_dim=1536, description="UNI2-h (ViT-H/14), 1536-d"))
_preset(EncoderSpec(
    "virchow2", "vit_huge_patch14_224",
    {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
     "global_pool": "", "dynamic_img_size": True, "@swiglu": True},
    weights="paige-ai/Virchow2 pytorch_model.bin", pooling="cls+mean",
    feature_dim=2560, description="Virchow2 (ViT-H/14), 2560-d: class token ‖ mean of patch tokens"))
_preset(EncoderSpec(
    "phikon", "vit_base_patch16_224", {},
    weights="owkin/phikon, converted to timm keys", feature_dim=768, description="Phikon (ViT-B/16), 768-d"))
_preset(EncoderSpec(
    "h-optimus-0", "vit_giant_patch14_reg4_dinov2",
    {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
    weights="bioptimus/H-optimus-0 pytorch_model.bin", feature_dim=1536, description="H-optimus-0 (ViT-g/14), 1536-d"))
_preset(EncoderSpec(
    "gigapath", "vit_giant_patch14_dinov2",
    {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334},
    weights="prov-gigapath/prov-gigapath pytorch_model.bin",
    feature_dim=1536, description="Prov-GigaPath tile encoder (ViT-g/16), 1536-d"))
# tiny models for tests and the demo (random init is fine for plumbing)
_preset(EncoderSpec("tiny-cnn", "resnet10t", {}, input_size=64,
                    feature_dim=512, description="test model: ResNet-10t on 64 px, 512-d"))
_preset(EncoderSpec(
    "tiny-vit", "vit_tiny_patch16_224",
    {"img_size": 64, "depth": 2, "embed_dim": 48, "num_heads": 3},
    input_size=64, feature_dim=48, description="test model: 2-block ViT on 64 px, 48-d"))


@dataclass
class Encoder:
    """A built encoder: the model (eval mode), its spec and the sha256 of its weights."""

    spec: EncoderSpec
    model: nn.Module
    feature_dim: int
    weights_sha256: str | None
    preprocess: Callable[[torch.Tensor], torch.Tensor]


def list_encoders() -> list[EncoderSpec]:
    return [ENCODERS.create(n) for n in ENCODERS.names()]


def _resolve(name: str) -> EncoderSpec:
    if name in ENCODERS:
        return ENCODERS.create(name)
    return EncoderSpec(name, name, {}, description="timm model")


_WRAPPERS = ("state_dict", "model", "model_state_dict", "teacher", "student", "module")
_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "encoder.", "teacher.", "student.",
             "trunk.")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UsageError(f"weights file {path.name} not found", "check --weights")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GigamilError(f"cannot load {path.name} safely: {exc}",
                           "give a .safetensors file or a plain state_dict saved with torch.save") from exc
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner  # {"model": {...}}, {"teacher": {...}}, … (DINO, Lightning checkpoints)
    if not isinstance(state, dict):
        raise GigamilError(f"{path.name} does not hold a state_dict", "save model.state_dict()")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _match_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``backbone.``, …) while that matches more keys."""
    best = state
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            stripped = {k.removeprefix(prefix): v for k, v in best.items()}
            if sum(k in own for k in stripped) > sum(k in own for k in best):
                best, changed = stripped, True
    return best


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class _ClsMeanPool(nn.Module):
    """Virchow-style embedding: class token concatenated with the mean of the patch tokens."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.skip = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module.__getattr__ is typed Tensor | Module; a timm ViT's forward_features is a method
        forward_features = cast(Callable[[torch.Tensor], torch.Tensor], self.vit.forward_features)
        tokens = forward_features(x)
        return torch.cat([tokens[:, 0], tokens[:, self.skip:].mean(dim=1)], dim=-1)


def create_encoder(name: str, weights: str | os.PathLike[str] | None = None,
                   device: str | torch.device = "cpu") -> Encoder:
    """Build ``name`` (preset, timm name or ``hf-hub:`` name) and load ``weights`` if given."""
    import timm

    spec = _resolve(name)
    kwargs = {k: v for k, v in spec.kwargs.items() if not k.startswith("@")}
    if spec.kwargs.get("@swiglu"):
        kwargs.update(_swiglu())
    pretrained = spec.arch.startswith("hf-hub:") and weights is None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random init is reproducible: reruns and tests agree
            model = timm.create_model(spec.arch, pretrained=pretrained, num_classes=0, **kwargs)
    except Exception as exc:  # unknown name, no network for hf-hub, bad kwargs
        raise UsageError(f"timm cannot build encoder {name!r}: {type(exc).__name__}: {exc}",
                         "see `gigamil encoders` for presets, give a timm model name, or "
                         "--weights for a local file") from exc
    sha = None
    if weights is not None:
        path = Path(weights)
        own = model.state_dict()
        state = _match_keys(_load_weights(path), own)
        bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state]
        extra = [k for k in state if k not in own
                 and not k.startswith(("head.", "fc.", "classifier.", "head_drop."))]
        if bad or missing or extra:
            detail = (f"shape mismatch in {', '.join(bad[:3])}" if bad
                      else f"{len(missing)} of {len(own)} tensors missing, e.g. {missing[0]}"
                      if missing else f"unexpected tensors, e.g. {extra[0]}")
            raise UsageError(f"weights {path.name} do not fit encoder {name!r} ({spec.arch}): {detail}",
                             f"the {name} preset expects {spec.weights or 'weights for ' + spec.arch}")
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
        sha = sha256_file(path)
    elif not pretrained and not name.startswith("tiny-"):
        log.warning("encoder %s has no --weights: features come from a RANDOM initialization "
                    "(fine for plumbing tests, useless for science)", name)
    if name not in ENCODERS:  # a plain timm name: preprocessing from its own data config
        from timm.data import resolve_data_config

        dc = resolve_data_config({}, model=model)
        spec = dataclasses.replace(spec, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                                   input_size=int(dc["input_size"][-1]))
    if spec.pooling == "cls+mean":
        model = _ClsMeanPool(model)
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    with torch.no_grad():
        dim = int(model(torch.zeros(1, 3, spec.input_size, spec.input_size, device=device)).shape[-1])
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    size = spec.input_size

    def preprocess(batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) → normalized float (B, 3, size, size), channels_last."""
        x = batch.permute(0, 3, 1, 2).float()
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    return Encoder(spec, model, dim, sha, preprocess)
