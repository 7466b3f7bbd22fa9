"""Batch inference on Ray against a plain single-process loop over the same slides.

    .venv/bin/python benchmarks/infer.py [--slides 12] [--size 16384x12288] [--demo]

A small run is trained first (synthetic cohort → extract → tiny-cnn embed → abmil), then
the same new slides are predicted (patches cut on the fly, encoder, MIL, attention):

- one process, no Ray, pinned to one core (the baseline);
- Ray pinned to one core (one reading slot, one predictor actor): overhead against the
  baseline (target ≤ 10 %);
- Ray on both cores (two reading slots, two predictors) against one (target ≥ 1.6×).

Ray is timed from its workers being ready to the last slide written; start-up (ray.init,
actors loading the models, readers importing) and shut-down are paid once per run and
are reported apart. Prints slides/hour, patches/s and peak RSS of the one-process run,
of each predictor and of each reader. ``--demo`` also runs ``gigamil demo`` and reports
its wall time and AUROCs.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.cluster.launch import run_training
from gigamil.cluster.ray import infer_slides
from gigamil.memory import retain_freed_memory
from gigamil.mil.embed import embed_stores
from gigamil.mil.embed_config import EmbedConfig
from gigamil.mil.infer import SlidePredictor
from gigamil.mil.infer_spec import InferenceSpec
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.slides import make_cohort
from gigamil.wsi.discovery import discover_slides
from gigamil.wsi.extract_config import ExtractConfig


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


ALL_CORES = os.sched_getaffinity(0)


def pinned(cores: int) -> None:
    """Run this process, every thread of it, and what it starts (Ray's daemons and
    workers) on ``cores`` cores."""
    chosen = set(sorted(ALL_CORES)[:cores])
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), chosen)


def in_process(paths: list[Path], spec: InferenceSpec, out: Path) -> tuple[float, list[dict]]:
    """The baseline on one core: a plain loop over the slides, models loaded beforehand."""
    import cv2
    import torch

    pinned(1)
    retain_freed_memory()  # as `gigamil infer --ray-address none` does, and Ray's workers
    torch.set_num_threads(spec.threads)
    cv2.setNumThreads(spec.threads)
    predictor = SlidePredictor(spec)
    predictor.warm_up()
    t = time.perf_counter()
    rows = [predictor.predict_to(p, out) for p in paths]
    return time.perf_counter() - t, rows


def on_ray(paths: list[Path], spec: InferenceSpec, out: Path, cores: int, workers: int
           ) -> dict[str, float]:
    """Seconds from the workers being ready to the last slide written; start-up and
    shut-down apart (they are paid once per run, not per slide)."""
    import ray

    pinned(cores)
    marks: dict[str, float] = {}

    def on_workers(actors: list) -> None:
        marks["ready"] = time.perf_counter()
        on_workers.actors = actors  # type: ignore[attr-defined]

    done: list[dict] = []

    def on_result(r: dict) -> None:
        done.append(r)
        if len(done) < len(paths):
            return
        marks["last"] = time.perf_counter()
        rss = ray.get([a.peak_rss_mb.remote() for a in on_workers.actors])  # type: ignore[attr-defined]
        marks["predictor_rss"] = max(rss)
        peak = ray.remote(num_cpus=1)(_peak_rss)
        readers = dict(ray.get([peak.remote() for _ in range(2 * cores)]))
        marks["reader_rss"] = max(readers.values())

    t0 = time.perf_counter()
    _, _, stats = infer_slides(paths, spec, out, workers=workers, cpus=cores,
                               on_workers=on_workers, on_result=on_result)
    end = time.perf_counter()
    return {"seconds": marks["last"] - marks["ready"], "startup": marks["ready"] - t0,
            "shutdown": end - marks["last"], "predictor_rss": marks["predictor_rss"],
            "reader_rss": marks["reader_rss"], "stats": stats}


def _peak_rss() -> tuple[int, float]:
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--size", default="16384x12288")
    ap.add_argument("--demo", action="store_true")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-infer-") as tmp:
        root = Path(tmp)
        run = trained_run(root)
        make_cohort(root / "new", n=args.slides, width=w, height=h, seed=7, workers=2)
        paths = discover_slides([root / "new"])
        spec = InferenceSpec.from_run(run)
        t_local, rows = in_process(paths, spec, root / "p0")
        rss_driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r1 = on_ray(paths, spec, root / "p1", cores=1, workers=1)
        r2 = on_ray(paths, spec, root / "p2", cores=2, workers=2)
    n = len(paths)
    n_patches = sum(r["n_patches"] for r in rows)
    print(f"{n} slides of {w}x{h} px at 0.25 µm/px, {n_patches} patches of 128 px at 1.0 µm/px, "
          f"encoder tiny-cnn + 2 abmil fold models, CPU; Ray: reading in CPU tasks, "
          f"encoder + MIL in predictor actors")
    print(f"{'path':36s} {'seconds':>8s} {'slides/h':>9s} {'patches/s':>10s}")
    for name, sec in (("one process, no Ray, 1 core", t_local),
                      ("Ray, 1 core, 1 predictor", r1["seconds"]),
                      ("Ray, 2 cores, 2 predictors", r2["seconds"])):
        print(f"{name:36s} {sec:8.2f} {3600 * n / sec:9.0f} {n_patches / sec:10.1f}")
    overhead = r1["seconds"] / t_local - 1
    speedup = r1["seconds"] / r2["seconds"]
    print(f"Ray start-up (ray.init, actors and readers warm): {r1['startup']:.1f} s (1 core), "
          f"{r2['startup']:.1f} s (2 cores); shut-down {r1['shutdown']:.1f} s, "
          f"{r2['shutdown']:.1f} s")
    print(f"Ray 1 worker vs one process: overhead {overhead * 100:+.1f}% (target ≤ 10%) -> "
          f"{'ok' if overhead <= 0.10 else 'SHORT'}")
    print(f"Ray 2 workers vs 1: {speedup:.2f}x (target ≥ 1.6x) -> "
          f"{'ok' if speedup >= 1.6 else 'SHORT'}")
    print(f"peak RSS: one process {rss_driver:.0f} MB; on Ray, each predictor "
          f"{max(r1['predictor_rss'], r2['predictor_rss']):.0f} MB, each reader "
          f"{max(r1['reader_rss'], r2['reader_rss']):.0f} MB")
    st = r2["stats"]
    print(f"pipeline (2 cores): {st['chunks_read']} chunks read, {st['encode_calls']} encoder "
          f"calls of {st['patches_per_encode_call']} patches on average, "
          f"{st['encode_calls_across_slides']} of them batching several slides; at most "
          f"{st['peak_chunks_held']} chunks held (bound {st['max_chunks_held']}), object store "
          f"{(st['object_store_bytes'] or 0) / 2**20:.0f} MB")
    if args.demo:
        from gigamil.demo import DemoConfig, run_demo

        with tempfile.TemporaryDirectory(prefix="gigamil-bench-demo-") as tmp:
            t = time.perf_counter()
            s = run_demo(DemoConfig(out=Path(tmp)))
            print(f"demo: {time.perf_counter() - t:.0f} s (goal < 180 s); cross-validated AUROC "
                  f"{s['cv_auroc']['value']:.3f}, held-out AUROC {s['heldout_auroc']:.3f}, "
                  f"attention vs planted tumour AUROC {s['attention_auroc']['mean']:.3f}; "
                  f"stages {s['timings']}")


if __name__ == "__main__":
    main()
