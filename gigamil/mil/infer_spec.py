"""What inference on new slides needs from a trained run, resolved once.

    spec = InferenceSpec.from_run("runs/crc1", InferConfig(engine="onnx", folds="best"))

The spec holds plain values only (model file paths, the encoder, the extraction the
run's features were made with), so it is cheap to ship to Ray workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.errors import UsageError
from gigamil.layout import FeatureDir, RunDir
from gigamil.mil.infer_config import InferConfig
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.qc import QCConfig

__all__ = ["InferenceSpec"]


def best_fold(models: list[Path], monitor: str) -> int:
    """Index of the fold model whose validation ``monitor`` is best (from its ``.json``)."""
    scores = [json.loads(m.with_suffix(".json").read_text()).get("metric", 0.0) for m in models]
    sign = -1 if monitor == "loss" else 1
    return int(np.argmax([sign * s for s in scores]))


def _embed_config(features: FeatureDir) -> dict[str, Any]:
    """How the run's features were embedded (so new slides are embedded the same)."""
    if not features.config.exists():
        raise UsageError(f"{features.config} is missing",
                         "inference re-embeds new slides the way the run's features were made")
    return dict(json.loads(features.config.read_text())["config"])


def _extract_config(features: FeatureDir) -> ExtractConfig:
    """The extraction the run's features were made with (so new slides are cut the same)."""
    saved = features.extract_dir.config
    if saved.exists():
        cfg = json.loads(saved.read_text())["config"]
        cfg["qc"] = QCConfig(**cfg["qc"])
        cfg["mpp"] = tuple(cfg["mpp"])
        cfg.update(previews=False, coords_h5=False)
        return ExtractConfig(**{k: v for k, v in cfg.items()
                                if k in {f.name for f in dataclasses.fields(ExtractConfig)}})
    from gigamil.wsi.features import bag_header

    for h5 in features.files():
        header = bag_header(h5)
        if header and "mpp" in header[0]:
            attrs = header[0]
            return ExtractConfig(mpp=float(attrs["mpp"]), patch_size=int(attrs["patch_size"]))
    raise UsageError(f"cannot tell how the features in {features.root} were extracted",
                     "keep extract_config.json beside patches/ and features/")


@dataclass
class InferenceSpec:
    """Everything a worker needs to predict a slide (plain values: cheap to ship to Ray)."""

    run: str
    classes: list[str]
    model_files: list[str]  # best.pt per fold, or .onnx per fold with engine="onnx"
    encoder: str
    encoder_weights: str | None
    extract: ExtractConfig
    engine: str = "torch"
    device: str = "cpu"
    batch_size: int = 64
    chunk_patches: int = 512  # patches per read task (and per object-store chunk)
    threads: int = 1
    heatmaps: bool = False
    heatmap_values: str = "attention"  # or "probability": each patch scored as a bag of one
    heatmap_class: str | None = None  # the class whose probability is mapped [default: last]
    geojson: bool = False  # patches with attention and probabilities, for QuPath
    top_patches: int = 0  # montage of the K highest- and K lowest-attention patches
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)  # of the run (config.json)
    #: slide path → id where it is not the file's stem (a DICOM series folder; --pseudonymize)
    slide_ids: dict[str, str] = field(default_factory=dict)
    pseudonymized: bool = False  # no file name in any output

    def slide_id(self, path: str | os.PathLike[str]) -> str:
        """The id that outputs give the slide at ``path``."""
        from gigamil.wsi.metadata import slide_id

        return self.slide_ids.get(str(path)) or slide_id(Path(path))

    def shown_name(self, path: str | os.PathLike[str]) -> str:
        """What outputs call the slide's file: its name, or its id when pseudonymized."""
        return self.slide_id(path) if self.pseudonymized else Path(path).name

    @classmethod
    def from_run(cls, run: str | os.PathLike[str], cfg: InferConfig | None = None
                 ) -> InferenceSpec:
        """The spec of run directory ``run`` predicting as ``cfg`` says."""
        cfg = cfg or InferConfig()
        layout = RunDir(run)
        config = layout.load_config()
        features = FeatureDir(config["config"]["features"])
        embed = _embed_config(features)
        targets = list(config.get("targets") or [])
        single = len(targets) <= 1 and all(t["kind"] == "classification" for t in targets)
        if not single and cfg.heatmap_values == "probability":
            raise UsageError("--heatmap-values probability maps one class's probability",
                             "use --heatmap-values attention for this run")
        from gigamil.mil.models import bag_layout

        if bag_layout(config["config"]["model"]) != "instances":
            raise UsageError(f"infer embeds new slides at one scale; {config['config']['model']} "
                             "reads several",
                             "extract and embed the new slides with --scales all, then run "
                             "`gigamil eval RUN --features F --labels L`")
        models = layout.fold_models()
        if cfg.folds == "best":
            models = [models[best_fold(models, config["config"].get("monitor", "loss"))]]
        if cfg.engine == "onnx":
            models = [_ensure_onnx(m, layout) for m in models]
        spec = cls(run=str(layout.root), classes=config["classes"],
                   model_files=[str(m) for m in models], encoder=embed["encoder"],
                   encoder_weights=embed.get("weights"), extract=_extract_config(features),
                   engine=cfg.engine, device=cfg.device, batch_size=cfg.batch_size,
                   threads=cfg.threads, heatmaps=cfg.heatmaps,
                   heatmap_values=cfg.heatmap_values, heatmap_class=cfg.heatmap_class,
                   geojson=cfg.geojson, top_patches=cfg.top_patches,
                   model_name=config["config"]["model"], pseudonymized=cfg.pseudonymize,
                   targets=targets)
        spec.heatmap_class_index()  # an unknown --heatmap-class fails here, early
        return spec

    @property
    def single_classification(self) -> bool:
        """One classification target (the probabilities, ONNX and probability maps path)."""
        return len(self.targets) <= 1 and all(t["kind"] == "classification"
                                              for t in self.targets)

    @property
    def patch_probs(self) -> bool:
        """Whether per-patch probabilities are computed (and saved in the .npz): for
        probability maps, and for the QuPath measurements of a classification run."""
        return self.heatmap_values == "probability" or (self.geojson
                                                        and self.single_classification)

    def extra_outputs(self, out: str | os.PathLike[str], sid: str) -> list[Path]:
        """The per-slide files asked for besides the ``.json`` and ``.npz``."""
        from gigamil.layout import PredictionsDir

        preds = PredictionsDir(out)
        return [p for p, on in ((preds.heatmap(sid), self.heatmaps),
                                (preds.geojson(sid), self.geojson),
                                (preds.top_patches(sid), self.top_patches > 0)) if on]

    def heatmap_class_index(self) -> int:
        if self.heatmap_class is None:
            return len(self.classes) - 1
        if self.heatmap_class not in self.classes:
            raise UsageError(f"--heatmap-class {self.heatmap_class!r} is not one of the run's "
                             f"classes {self.classes}", "pick one of them")
        return self.classes.index(self.heatmap_class)

    def model_id(self) -> str:
        folds = ",".join(Path(m).parent.name if m.endswith(".pt") else Path(m).stem
                         for m in self.model_files)
        return f"{Path(self.run).name}:{self.model_name}:{folds}:{self.engine}"


def _ensure_onnx(best: Path, run: RunDir) -> Path:
    """The fold's ONNX file, exported (again) when missing or older than its model."""
    from gigamil.mil.export import export_run

    fold = int(best.parent.name.removeprefix("fold"))
    target = run.onnx(fold)
    if not target.exists() or target.stat().st_mtime < best.stat().st_mtime:
        export_run(run.root, fold, target)
    return target
