"""The end-to-end demo on a synthetic cohort made on the fly.

Today: synthetic slides → ``extract`` → store summaries and a patch montage.
Later stages (embed, train, infer) extend :func:`run_demo` as they land.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gigamil.io import write_json
from gigamil.wsi.extract import ExtractConfig, extract_slides
from gigamil.wsi.preview import patch_montage, save_png
from gigamil.wsi.store import PatchStore
from gigamil.wsi.synthetic import make_cohort

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("gigamil-demo")
    n_slides: int = 6
    width: int = 12000
    height: int = 9600
    mpp: float = 0.25
    seed: int = 0
    workers: int = 2
    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(mpp=0.5, patch_size=256))


def run_demo(cfg: DemoConfig, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage, write ``<out>/demo_summary.json`` and return the summary."""
    stage = on_stage or (lambda _msg: None)
    out = Path(cfg.out)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    stage(f"synth: {cfg.n_slides} slides of {cfg.width}x{cfg.height} px at {cfg.mpp} µm/px")
    make_cohort(out / "slides", n=cfg.n_slides, width=cfg.width, height=cfg.height,
                mpp=cfg.mpp, seed=cfg.seed, workers=cfg.workers)
    timings["synth_s"] = time.perf_counter() - t

    t = time.perf_counter()
    stage(f"extract: {cfg.extract.patch_size} px patches at {cfg.extract.mpp} µm/px")
    results = extract_slides([out / "slides"], out / "data", cfg.extract, workers=cfg.workers)
    timings["extract_s"] = time.perf_counter() - t

    stores = []
    for res in results:
        if res.status in ("ok", "skipped"):
            with PatchStore(out / "data" / "patches" / f"{res.slide_id}.lmdb") as store:
                stores.append({"slide_id": res.slide_id, "n_patches": len(store),
                               "tissue_fraction": store.meta.get("tissue_fraction")})
                if len(stores) == 1:
                    save_png(out / "montage.png", patch_montage(store))
    summary = {
        "config": dataclasses.asdict(cfg) | {"out": str(out)},
        "slides": [r.row() for r in results],
        "stores": stores,
        "n_failed": sum(r.status == "failed" for r in results),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    write_json(out / "demo_summary.json", summary)
    return summary
