"""Every on-disk convention of gigamil, in one place: which file goes where.

    data = ExtractDir("data/")            # data/patches/<id>.lmdb, extract.csv, …
    feats = data.features("resnet50")     # data/features/resnet50/<id>.h5
    run = RunDir("runs/crc1")             # config.json, checkpoints/fold<k>/, predictions…
    preds = PredictionsDir("preds/")      # slides/<id>.json|npz, heatmaps/, predictions.csv

No other module builds one of these paths by hand; they ask these classes. The classes
are plain frozen dataclasses over a root folder; they create nothing on construction.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gigamil.errors import UsageError

__all__ = ["ExtractDir", "FeatureDir", "RunDir", "PredictionsDir", "JOBS", "safe_name",
           "shard_suffix", "pseudonyms_beside"]

#: Where submitted jobs (submitit's logs and pickles, ``jobs.json``) go, under any output.
JOBS = "jobs"


def safe_name(name: str) -> str:
    """An encoder or model name as a folder name (``hf-hub:org/x`` → ``hf-hub_org_x``)."""
    return name.replace("/", "_").replace(":", "_")


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """``.shard3of16`` for share 3 of 16 (0-based), else ``""``."""
    return f".shard{shard[0]}of{shard[1]}" if shard is not None else ""


def _read_json(path: Path, what: str, hint: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: not {what}", hint) from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})", hint) from None



def pseudonyms_beside(root: Path) -> Path:
    """``<root>.pseudonyms.json`` in the folder that holds ``root`` (never inside it)."""
    return root.resolve().parent / f"{root.resolve().name}.pseudonyms.json"

@dataclass(frozen=True)
class FeatureDir:
    """``<extract>/features/<encoder>/``: one ``<slide_id>.h5`` per slide, plus manifests."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    def h5(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.h5"

    @property
    def config(self) -> Path:
        """``embed_config.json``: the resolved embedding options, encoder and versions."""
        return self.root / "embed_config.json"

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*.h5"))

    def manifest(self, part: str = "") -> Path:
        """``embed.csv``, or ``embed<part>.csv`` for one shard or rank of a parallel run."""
        return self.root / f"embed{part}.csv"

    @property
    def extract_dir(self) -> ExtractDir:
        """The extraction these features came from (``features/<encoder>`` sits inside it)."""
        return ExtractDir(self.root.parent.parent)


@dataclass(frozen=True)
class ExtractDir:
    """The ``--out`` of ``gigamil extract``."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @staticmethod
    def store_folder(data: str | os.PathLike[str]) -> Path:
        """Where ``embed DATA`` finds stores: ``DATA/patches/`` if it exists, else ``DATA``."""
        data = Path(data)
        return data / "patches" if (data / "patches").is_dir() else data

    @property
    def patches(self) -> Path:
        return self.root / "patches"

    @property
    def coords(self) -> Path:
        return self.root / "coords"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def config(self) -> Path:
        return self.root / "extract_config.json"

    @property
    def pseudonyms(self) -> Path:
        """The id → slide mapping of ``--pseudonymize`` (mode 0600), beside the output
        folder rather than in it, so that sharing the outputs never shares it."""
        return pseudonyms_beside(self.root)

    def geojson(self, slide_id: str) -> Path:
        """Tissue contours and kept patches of ``--geojson``, for QuPath."""
        return self.root / "geojson" / f"{slide_id}.geojson"

    @property
    def jobs(self) -> Path:
        return self.root / JOBS

    def store(self, slide_id: str) -> Path:
        return self.patches / f"{slide_id}.lmdb"

    def stores(self) -> list[Path]:
        return sorted(self.patches.glob("*.lmdb"))

    def coords_h5(self, slide_id: str) -> Path:
        return self.coords / f"{slide_id}.h5"

    def preview(self, slide_id: str) -> Path:
        return self.previews / f"{slide_id}.png"

    def manifest(self, shard: tuple[int, int] | None = None) -> Path:
        """``extract.csv``, or ``extract.shard<k>of<n>.csv`` for one array task."""
        return self.root / f"extract{shard_suffix(shard)}.csv"

    def shard_manifests(self) -> list[Path]:
        return sorted(self.root.glob("extract.shard*.csv"))

    def features(self, encoder: str) -> FeatureDir:
        return FeatureDir(self.root / "features" / safe_name(encoder))

    def load_config(self) -> dict[str, Any]:
        """``extract_config.json``: the resolved extraction options and versions."""
        return dict(_read_json(self.config, "an extraction",
                               "keep extract_config.json beside patches/ and features/"))


@dataclass(frozen=True)
class RunDir:
    """The ``--out`` of ``gigamil train``."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def reliability(self) -> Path:
        return self.plot("reliability.png")

    def plot(self, name: str) -> Path:
        """A picture of the pooled test predictions (reliability, Kaplan–Meier)."""
        return self.root / name

    def fold_plot(self, fold: int, name: str) -> Path:
        """A picture of one fold's test predictions: ``reliability_fold<k>.png``."""
        stem, dot, ext = name.partition(".")
        return self.root / f"{stem}_fold{fold}{dot}{ext}"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def jobs(self) -> Path:
        return self.root / JOBS

    def checkpoints(self, fold: int) -> Path:
        return self.root / "checkpoints" / f"fold{fold}"

    def best(self, fold: int) -> Path:
        """The fold's model (``best.pt``, written by the checkpoint manager)."""
        return self.checkpoints(fold) / "best.pt"

    def predictions(self, fold: int | str) -> Path:
        return self.root / f"predictions_fold{fold}.csv"

    def embeddings(self, fold: int | str) -> Path:
        """The test fold's attention-pooled slide vectors (``slide_id``, ``embedding``)."""
        return self.root / f"embeddings_fold{fold}.h5"

    @property
    def ensemble_predictions(self) -> Path:
        """``predictions.csv`` of the folds' ensemble (``gigamil eval`` of another cohort)."""
        return self.root / "predictions.csv"

    def prediction_files(self) -> dict[str, Path]:
        """``predictions_fold<k>.csv`` by fold name."""
        return {p.stem.removeprefix("predictions_fold"): p
                for p in sorted(self.root.glob("predictions_fold*.csv"))}

    def trained_folds(self) -> list[int]:
        """Folds that have a ``best.pt``, in order."""
        folds = [int(p.parent.name.removeprefix("fold"))
                 for p in self.root.glob("checkpoints/fold*/best.pt")]
        return sorted(folds)

    def fold_models(self) -> list[Path]:
        """The ``best.pt`` of every trained fold, by fold (a clear error if there is none)."""
        folds = self.trained_folds()
        if not folds:
            raise UsageError(f"{self.root} has no trained fold (no best model in checkpoints/)",
                             "train it first, or finish it with `gigamil train … --resume auto`")
        return [self.best(k) for k in folds]

    def load_config(self) -> dict[str, Any]:
        """``config.json``: ``{"config": {...resolved TrainConfig...}, "classes": …}``."""
        if not self.config.exists():
            raise UsageError(f"{self.root} is not a gigamil run (no config.json)",
                             "pass the --out directory of `gigamil train`")
        return dict(_read_json(self.config, "a run directory",
                               "give the --out of `gigamil train`"))

    def load_best(self, fold: int) -> dict[str, Any]:
        """The fold's ``best.pt`` state, loaded safely (``weights_only``: no pickled code)."""
        import torch

        path = self.best(fold)
        if not path.exists():
            raise UsageError(f"{path} does not exist",
                             "train the run first, or pick another --fold")
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state

    def eval_dir(self, name: str) -> Path:
        """Where ``gigamil eval`` of an external cohort writes by default."""
        return self.root / "eval" / name

    def onnx(self, fold: int) -> Path:
        """The fold's model exported for ``--engine onnx``."""
        return self.root / "onnx" / f"fold{fold}.onnx"


@dataclass(frozen=True)
class PredictionsDir:
    """The ``--out`` of ``gigamil infer``."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def pseudonyms(self) -> Path:
        """The id → slide mapping of ``infer --pseudonymize``, beside the output folder."""
        return pseudonyms_beside(self.root)

    @property
    def slides(self) -> Path:
        return self.root / "slides"

    @property
    def heatmaps(self) -> Path:
        return self.root / "heatmaps"

    def slide_json(self, slide_id: str) -> Path:
        return self.slides / f"{slide_id}.json"

    def slide_npz(self, slide_id: str) -> Path:
        return self.slides / f"{slide_id}.npz"

    def heatmap(self, slide_id: str) -> Path:
        return self.heatmaps / f"{slide_id}.png"

    def geojson(self, slide_id: str) -> Path:
        """Patches with attention and probabilities as measurements, for QuPath."""
        return self.root / "geojson" / f"{slide_id}.geojson"

    def top_patches(self, slide_id: str) -> Path:
        """The montage of the highest- and lowest-attention patches."""
        return self.root / "top_patches" / f"{slide_id}.png"

    @property
    def embeddings(self) -> Path:
        """``embeddings.h5``: every slide's attention-pooled vector of each fold model."""
        return self.root / "embeddings.h5"

    def slide_results(self) -> list[Path]:
        return sorted(self.slides.glob("*.json"))

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def failures(self) -> Path:
        return self.root / "failures.csv"

    @property
    def config(self) -> Path:
        return self.root / "infer_config.json"
