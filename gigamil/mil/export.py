"""ONNX export of a trained MIL model, with a dynamic bag length.

    export_onnx(state, "model.onnx")          # state: a fold's best.pt
    session = OnnxMIL("model.onnx")           # onnxruntime only: no torch model in memory
    probs, attention = session(features)      # features (N, D) float32

The graph takes one bag ``features`` (1, N, D) and returns ``logits`` (1, C) and
``attention`` (1, N). Parity with torch is checked at export on bags of several lengths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gigamil.errors import UsageError
from gigamil.io import atomic_path

__all__ = ["export_onnx", "export_run", "OnnxMIL", "PARITY_LENGTHS"]

PARITY_LENGTHS = (1, 7, 64, 513)


def export_run(run: str | os.PathLike[str], fold: int, path: str | os.PathLike[str]
               ) -> dict[str, Any]:
    """Export fold ``fold`` of the run directory ``run`` to ``path``; the parity report."""
    from gigamil.layout import RunDir

    return export_onnx(RunDir(run).load_best(fold), path)


class _OneBag(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(features)
        attention = out.attention if out.attention.dim() == 2 else out.attention.mean(1)
        return out.logits, attention


def export_onnx(state: dict[str, Any], path: str | os.PathLike[str], check: bool = True,
                atol: float | None = None) -> dict[str, Any]:
    """Write ``path`` (atomically) from a ``best.pt`` state; returns the parity report.

    ``atol`` (relative once outputs exceed 1) defaults to 1e-5 for one classification
    head, and 1e-4 for survival, regression or several heads, whose wider output layers
    (and standardized regression outputs) accumulate more float32 rounding."""
    import warnings

    from gigamil.mil.predict import load_model

    model, meta = load_model(state, "cpu")
    wrapper = _OneBag(model).eval()
    example = torch.randn(1, 16, meta["in_dim"])
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the all-valid mask branch
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=["features"],
                          output_names=["logits", "attention"], dynamo=False,
                          dynamic_axes={"features": {1: "n"}, "attention": {1: "n"}},
                          opset_version=17)
        if check:
            report = _parity(wrapper, str(tmp), meta["in_dim"], atol or _tolerance(meta))
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {"gigamil": json.dumps(meta)})
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return report if check else {}


def _tolerance(meta: dict[str, Any]) -> float:
    targets = meta.get("targets") or []
    single = len(targets) <= 1 and all(t["kind"] == "classification" for t in targets)
    return 1e-5 if single else 1e-4


def _parity(wrapper: nn.Module, path: str, dim: int, atol: float) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in PARITY_LENGTHS:
        x = torch.randn(1, n, dim, generator=gen)
        with torch.no_grad():
            ref = [t.numpy() for t in wrapper(x)]
        try:
            got = session.run(None, {"features": x.numpy()})
        except Exception:  # noqa: BLE001 - a graph that only runs at the traced length
            worst = float("inf")
            break
        # relative to the outputs' scale once they exceed 1 (standardized features and
        # regression heads give logits in the tens)
        worst = max(worst, *(float(np.abs(a - b).max() / max(1.0, float(np.abs(a).max())))
                             for a, b in zip(ref, got)))
    if worst >= atol:
        raise UsageError(f"the ONNX graph differs from torch by {worst:.2e} (≥ {atol:g}) on bags "
                         f"of {PARITY_LENGTHS} instances",
                         "this model does not export with a dynamic bag length; use abmil, "
                         "abmil_gated, clam or mean/max, or --engine torch")
    return {"max_abs_diff": worst, "lengths": list(PARITY_LENGTHS)}


class OnnxMIL:
    """A MIL model run by onnxruntime (no torch model): features (N, D) → probs, attention
    (:meth:`run`: the raw logits of every head)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnx
        import onnxruntime as ort

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
                 .metadata_props}
        self.meta = json.loads(props.get("gigamil", "{}"))
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        from gigamil.mil.predict import temperature_of

        self.temperature = temperature_of(self.meta)  # calibrated on the inner validation split

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (C,), attention (N,)) of one bag: every target's head, uncalibrated."""
        logits, attention = self.session.run(
            None, {"features": np.ascontiguousarray(features[None], np.float32)})
        return logits[0], attention[0]

    def __call__(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, attention) of a single-classification model's bag."""
        logits, attention = self.run(features)
        z = logits / self.temperature
        z = z - z.max()
        probs = np.exp(z) / np.exp(z).sum()
        return probs, attention
