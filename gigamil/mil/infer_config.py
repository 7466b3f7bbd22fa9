"""The options of ``gigamil infer`` / ``heatmap``: what to predict with, and how (no torch at
import: the CLI derives its options from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gigamil.config import option
from gigamil.mil.train_config import check_choice

__all__ = ["Engine", "FoldChoice", "HeatmapValues", "InferConfig"]

Engine = Literal["torch", "onnx"]
FoldChoice = Literal["all", "best"]
HeatmapValues = Literal["attention", "probability"]


@dataclass(frozen=True)
class InferConfig:
    """How a trained run predicts new slides."""

    engine: Engine = option("torch", "torch, or onnx (onnxruntime; no torch MIL model in "
                            "memory).")
    folds: FoldChoice = option("all", "all: average every fold's model; best: the fold with "
                               "the best validation metric.", flag="--fold")
    device: str = option("cpu", "cpu, or cuda (on Ray: with --gpus-per-worker).")
    batch_size: int = option(64, "Patches per encoder batch.", min=1)
    threads: int = option(1, "Torch threads per predictor.", min=1)
    heatmaps: bool = option(False, "Also write heatmaps/<slide_id>.png.")
    heatmap_values: HeatmapValues = option(
        "attention", "attention (rank-scaled), or probability: each patch scored as a bag of "
                     "one (also saved in the .npz).", flag="--heatmap-values")
    heatmap_class: str | None = option(None, "The class whose probability is mapped "
                                             "[default: the last].", flag="--heatmap-class")
    geojson: bool = option(False, "Also write geojson/<slide_id>.geojson: every patch with "
                           "its attention and per-class probability (as a bag of one) as "
                           "measurements; QuPath opens it over the slide (File > Import "
                           "objects).")
    top_patches: int = option(0, "Also write top_patches/<slide_id>.png: the K patches with "
                              "the highest and the K with the lowest attention, read from the "
                              "slide (0 = none).", flag="--top-patches", min=0)
    pseudonymize: bool = option(False, "Salted-hash slide ids: no file name or path in any "
                                "output; the mapping goes to --pseudonym-map only (mode 0600).")
    pseudonym_map: str | None = option(None, "The id → slide mapping of --pseudonymize "
                                       "(default OUT.pseudonyms.json, beside OUT). Give "
                                       "extract's map to get the same ids.")

    def __post_init__(self) -> None:
        check_choice("--engine", self.engine, Engine)
        check_choice("--fold", self.folds, FoldChoice)
        check_choice("--heatmap-values", self.heatmap_values, HeatmapValues)
