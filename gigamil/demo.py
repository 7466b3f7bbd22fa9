"""The end-to-end demo on a synthetic cohort made on the fly.

synthetic slides with planted tumour regions → ``extract`` → ``embed`` → ``train``
(k folds) → ``infer`` on held-out slides (on Ray) → AUROC on the held-out slides, how
well attention finds the planted tumour (AUROC of patch attention against the masks),
heatmaps, and a patch montage. Every stage reuses what a previous run left.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.io import write_json
from gigamil.layout import ExtractDir, PredictionsDir
from gigamil.synth.slides import load_masks, make_cohort
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.preview import patch_montage, save_png
from gigamil.wsi.store import PatchStore

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("gigamil-demo")
    n_slides: int = 12  # training cohort (cross-validated)
    n_heldout: int = 6  # new slides for `infer`
    width: int = 6144
    height: int = 4864
    mpp: float = 0.25
    seed: int = 0
    workers: int = 2
    encoder: str = "tiny-cnn"  # random init: no weights are downloaded
    folds: int = 3
    epochs: int = 25
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(mpp=1.0, patch_size=128))


def _localization(pred_dir: Path, masks_dir: Path, ids: list[str], mpp0: float,
                  size0: float) -> dict[str, float]:
    """Per slide: AUROC of patch attention against 'the patch centre is in the planted
    tumour' (the saved ground-truth mask)."""
    from gigamil.mil.metrics import binary_auroc

    out = {}
    for sid in ids:
        npz, mask_file = PredictionsDir(pred_dir).slide_npz(sid), masks_dir / f"{sid}.npz"
        if not npz.exists() or not mask_file.exists():
            continue
        with np.load(npz) as data:
            coords, attention = data["coords"], data["attention"]
        masks, mask_mpp = load_masks(mask_file)
        tumor = masks["tumor"]
        centre = (coords + size0 / 2) * mpp0 / mask_mpp
        xs = np.clip(centre[:, 0].astype(int), 0, tumor.shape[1] - 1)
        ys = np.clip(centre[:, 1].astype(int), 0, tumor.shape[0] - 1)
        inside = tumor[ys, xs]
        auc = binary_auroc(inside, attention)
        if not np.isnan(auc):
            out[sid] = auc
    return out


def run_demo(cfg: DemoConfig, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage, write ``<out>/demo_summary.json`` and return the summary."""
    from gigamil.cluster.infer import todo
    from gigamil.cluster.launch import run_training
    from gigamil.cluster.ray import infer_slides
    from gigamil.mil.embed import embed_stores
    from gigamil.mil.embed_config import EmbedConfig
    from gigamil.mil.infer_config import InferConfig
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.mil.metrics import binary_auroc
    from gigamil.mil.train_config import TrainConfig
    from gigamil.wsi.discovery import discover_slides

    stage = on_stage or (lambda _msg: None)
    out = Path(cfg.out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    stage(f"synth: {cfg.n_slides} + {cfg.n_heldout} held-out slides of {cfg.width}x{cfg.height} "
          f"px at {cfg.mpp} µm/px, half with planted tumour")
    make_cohort(out / "slides", n=cfg.n_slides, width=cfg.width, height=cfg.height,
                mpp=cfg.mpp, seed=cfg.seed, workers=cfg.workers)
    make_cohort(out / "heldout", n=cfg.n_heldout, width=cfg.width, height=cfg.height,
                mpp=cfg.mpp, seed=cfg.seed + 1000, workers=cfg.workers)
    timings["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(f"extract: {cfg.extract.patch_size} px patches at {cfg.extract.mpps[0]} µm/px")
    results = extract_slides([out / "slides"], out / "data", cfg.extract, workers=cfg.workers)
    timings["extract_s"] = time.perf_counter() - t
    stores = []
    for res in results:
        if res.status in ("ok", "skipped"):
            with PatchStore(ExtractDir(out / "data").store(res.slide_id)) as store:
                stores.append({"slide_id": res.slide_id, "n_patches": len(store)})
                if len(stores) == 1:
                    save_png(out / "montage.png", patch_montage(store))

    t = time.perf_counter()
    stage(f"embed: {cfg.encoder} (random init)")
    embed_stores(out / "data", EmbedConfig(encoder=cfg.encoder, workers=0, device="cpu",
                                           batch_size=128))
    timings["embed_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(f"train: abmil, {cfg.folds}-fold cross-validation, {cfg.epochs} epochs")
    run = out / "run"
    train_cfg = TrainConfig(features=str(ExtractDir(out / "data").features(cfg.encoder).root),
                            labels=str(out / "slides" / "labels.csv"), out=str(run),
                            folds=cfg.folds, epochs=cfg.epochs, lr=1e-3, batch_size=4,
                            val_frac=0.0, early_stop=None, bootstrap=200, device="cpu",
                            seed=cfg.seed)
    summary_train = run_training(train_cfg, resume=True)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(f"infer: {cfg.n_heldout} held-out slides on Ray ({cfg.workers} CPUs: readers and "
          "a predictor per core), heatmaps")
    spec = InferenceSpec.from_run(run, InferConfig(heatmaps=True))
    preds = out / "preds"
    paths = discover_slides([out / "heldout"])
    _, failures, stats = infer_slides(todo(paths, preds), spec, preds, cpus=cfg.workers) \
        if todo(paths, preds) else ([], [], {})
    write_outputs(preds, spec, failures, stats)
    timings["infer_s"] = time.perf_counter() - t

    with open(out / "heldout" / "labels.csv", newline="") as fh:
        truth = {r["slide_id"]: r["label"] for r in csv.DictReader(fh)}
    with open(PredictionsDir(preds).predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([truth[r["slide_id"]] == "tumor" for r in rows])
    score = np.array([float(r["prob_tumor"]) for r in rows])
    tumour_ids = [r["slide_id"] for r in rows if truth[r["slide_id"]] == "tumor"]
    size0 = cfg.extract.patch_size * cfg.extract.mpps[0] / cfg.mpp
    loc = _localization(preds, out / "heldout" / "masks", tumour_ids, cfg.mpp, size0)
    timings["total_s"] = time.perf_counter() - t_all
    summary = {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg) | {"out": str(out)},
                                        default=str)),
        "slides": [r.row() for r in results],
        "stores": stores,
        "n_failed": sum(r.status == "failed" for r in results) + len(failures),
        "cv_auroc": summary_train.get("pooled", {}).get("metrics", {}).get("auroc"),
        "heldout_auroc": binary_auroc(y, score),
        "heldout_accuracy": float(np.mean((score > 0.5) == y)) if len(y) else float("nan"),
        "attention_auroc": {"per_slide": loc,
                            "mean": float(np.mean(list(loc.values()))) if loc else None},
        "predictions": str(PredictionsDir(preds).predictions),
        "heatmaps": str(PredictionsDir(preds).heatmaps),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    write_json(out / "demo_summary.json", summary)
    return summary
