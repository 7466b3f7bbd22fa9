"""Batch inference on Ray against a plain single-process loop over the same slides.

    .venv/bin/python benchmarks/infer.py [--slides 8] [--size 8192x6144] [--demo]

A small run is trained first (synthetic cohort → extract → tiny-cnn embed → abmil), then
the same new slides are predicted (patches cut on the fly, encoder, MIL, attention):

- one process, no Ray (the baseline);
- Ray with 1 worker: overhead against the baseline (target ≤ 10 %), counted from the
  moment the worker is ready (the ~4 s of `ray.init` are reported apart);
- Ray with 2 workers against 1 (target ≥ 1.6× on this 2-core machine).

Prints slides/hour, patches/s and peak RSS of the driver and of each worker. ``--demo``
also runs ``gigamil demo`` and reports its wall time and AUROCs.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from gigamil.cluster.launch import run_training
from gigamil.cluster.ray import infer_slides, infer_slides_local
from gigamil.mil.embed import EmbedConfig, embed_stores
from gigamil.mil.infer import InferenceSpec
from gigamil.mil.train import TrainConfig
from gigamil.wsi.extract import ExtractConfig, discover_slides, extract_slides
from gigamil.wsi.synthetic import make_cohort


def trained_run(root: Path) -> Path:
    make_cohort(root / "train", n=6, width=4096, height=3072, seed=1, workers=2)
    extract_slides([root / "train"], root / "data", ExtractConfig(mpp=1.0, patch_size=128),
                   workers=2)
    embed_stores(root / "data", EmbedConfig(encoder="tiny-cnn", workers=0, device="cpu"))
    run_training(TrainConfig(features=str(root / "data/features/tiny-cnn"),
                             labels=str(root / "train/labels.csv"), out=str(root / "run"),
                             folds=2, epochs=3, batch_size=2, val_frac=0.0, bootstrap=20,
                             device="cpu"))
    return root / "run"


def on_ray(paths: list[Path], spec: InferenceSpec, out: Path, workers: int
           ) -> tuple[float, float]:
    """(seconds from the workers being ready to the last slide, seconds of start-up)."""
    import ray

    ready: list[float] = []

    def on_workers(actors: list) -> None:
        ray.get([a.pid.remote() for a in actors])
        ready.append(time.perf_counter())

    t0 = time.perf_counter()
    infer_slides(paths, spec, out, workers=workers, on_workers=on_workers)
    return time.perf_counter() - ready[0], ready[0] - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", default="8192x6144")
    ap.add_argument("--demo", action="store_true")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-infer-") as tmp:
        root = Path(tmp)
        run = trained_run(root)
        make_cohort(root / "new", n=args.slides, width=w, height=h, seed=7, workers=2)
        paths = discover_slides([root / "new"])
        spec = InferenceSpec.from_run(run)
        t = time.perf_counter()
        rows, _ = infer_slides_local(paths, spec, root / "p0")
        t_local = time.perf_counter() - t
        n_patches = sum(r["n_patches"] for r in rows)
        rss_driver_local = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t1, init1 = on_ray(paths, spec, root / "p1", 1)
        t2, init2 = on_ray(paths, spec, root / "p2", 2)
        worker_rss = _worker_rss(paths[:2], spec, root / "p3")
    n = len(paths)
    print(f"{n} slides of {w}x{h} px at 0.25 µm/px, {n_patches} patches of 128 px at 1.0 µm/px, "
          f"encoder tiny-cnn + 2 abmil fold models, CPU")
    print(f"{'path':28s} {'seconds':>8s} {'slides/h':>9s} {'patches/s':>10s}")
    for name, sec in (("one process, no Ray", t_local), ("Ray, 1 worker", t1),
                      ("Ray, 2 workers", t2)):
        print(f"{name:28s} {sec:8.2f} {3600 * n / sec:9.0f} {n_patches / sec:10.1f}")
    overhead = t1 / t_local - 1
    print(f"Ray start-up (ray.init + actors ready): {init1:.1f} s (1 worker), {init2:.1f} s (2)")
    print(f"Ray 1 worker vs one process: overhead {overhead * 100:+.1f}% (target ≤ 10%) -> "
          f"{'ok' if overhead <= 0.10 else 'SHORT'}")
    print(f"Ray 2 workers vs 1: {t1 / t2:.2f}x (target ≥ 1.6x) -> "
          f"{'ok' if t1 / t2 >= 1.6 else 'SHORT'}")
    print(f"peak RSS: driver {rss_driver_local:.0f} MB, each worker {worker_rss:.0f} MB")
    if args.demo:
        from gigamil.demo import DemoConfig, run_demo

        with tempfile.TemporaryDirectory(prefix="gigamil-bench-demo-") as tmp:
            t = time.perf_counter()
            s = run_demo(DemoConfig(out=Path(tmp)))
            print(f"demo: {time.perf_counter() - t:.0f} s (goal < 180 s); cross-validated AUROC "
                  f"{s['cv_auroc']['value']:.3f}, held-out AUROC {s['heldout_auroc']:.3f}, "
                  f"attention vs planted tumour AUROC {s['attention_auroc']['mean']:.3f}; "
                  f"stages {s['timings']}")


def _worker_rss(paths: list[Path], spec: InferenceSpec, out: Path) -> float:
    import ray

    peak: list[float] = []

    def on_workers(actors: list) -> None:
        peak.append(0.0)
        on_workers.actors = actors  # type: ignore[attr-defined]

    def on_result(_r: dict) -> None:
        peak[0] = max(peak[0], max(ray.get([a.peak_rss_mb.remote()
                                            for a in on_workers.actors])))  # type: ignore[attr-defined]

    infer_slides(paths, spec, out, workers=1, on_workers=on_workers, on_result=on_result)
    return peak[0]


if __name__ == "__main__":
    main()
