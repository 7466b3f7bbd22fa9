"""Embedding throughput against the bare model forward, and memory against cohort size.

    .venv/bin/python benchmarks/embed.py [--slides 4] [--size 16000x12800] [--batch-size 64]

For resnet18 and vit_small (random init, fp32 on this CPU), 224 px patches at 0.5 µm/px:

- bare forward: the encoder on the same patches, already decoded and in memory, same
  batch size and precision;
- pipeline: ``gigamil embed`` (DataLoader workers decode JPEG from LMDB, main process
  normalizes and runs the model, writes HDF5), timed from the first batch to the last
  write (steady state) and in total (with worker start-up and model construction).

The target is pipeline / bare ≥ 0.85: data loading hidden behind compute.
Memory: peak RSS of ``gigamil embed`` on 2 and on 8 slides must not grow with the count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.mil.embed import embed_stores
from gigamil.mil.embed_config import EmbedConfig
from gigamil.mil.encoders import create_encoder
from gigamil.synth.slides import make_cohort
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.store import PatchStore


def bare_forward(stores: list[Path], encoder: str, batch: int) -> tuple[float, int]:
    enc = create_encoder(encoder)
    patches = []
    for p in stores:
        with PatchStore(p) as s:
            patches.extend(s)
    x_all = torch.from_numpy(np.stack(patches))
    n = len(x_all)
    with torch.inference_mode():
        enc.model(enc.preprocess(x_all[:batch]))  # warm-up
        t = time.perf_counter()
        for i in range(0, n, batch):
            enc.model(enc.preprocess(x_all[i : i + batch])).float().numpy()
        return time.perf_counter() - t, n


def pipeline(data: Path, encoder: str, batch: int, workers: int) -> tuple[float, float, int]:
    first: list[float] = []
    n = [0]
    first_n = [0]

    def on_batch(k: int) -> None:
        if not first:  # the clock starts after the first batch: do not count its patches
            first.append(time.perf_counter())
            first_n[0] = k
        n[0] += k

    t0 = time.perf_counter()
    cfg = EmbedConfig(encoder=encoder, batch_size=batch, workers=workers, device="cpu",
                      overwrite=True)
    embed_stores(data, cfg, on_batch=on_batch)
    t1 = time.perf_counter()
    return t1 - t0, (t1 - first[0]) * n[0] / max(n[0] - first_n[0], 1), n[0]


def peak_rss(cmd: list[str]) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from extract import peak_rss as measure  # the same process-tree sampler

    return measure(cmd)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", default="16000x12800")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--workdir", default=os.environ.get("GIGAMIL_BENCH_DIR", "/tmp/gigamil-bench"))
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    work = Path(args.workdir) / f"embed_{args.slides}x{w}x{h}"
    if not (work / "data" / "extract.csv").exists():
        make_cohort(work / "slides", n=max(args.slides, 8), width=w, height=h, seed=5, workers=2)
        extract_slides([work / "slides"], work / "data",
                       ExtractConfig(mpp=0.5, patch_size=224), workers=2)
    stores = sorted((work / "data" / "patches").glob("*.lmdb"))[: args.slides]
    print(f"embedding benchmark: {len(stores)} slides, batch {args.batch_size}, fp32, CPU "
          f"({torch.get_num_threads()} torch threads), {args.workers} loader worker(s)", flush=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        sub = Path(tmp) / "data"
        (sub / "patches").mkdir(parents=True)
        for s in stores:
            shutil.copy(s, sub / "patches" / s.name)
        for encoder in ("resnet18", "vit_small"):
            t_bare, n = bare_forward(stores, encoder, args.batch_size)
            t_total, t_steady, n2 = pipeline(sub, encoder, args.batch_size, args.workers)
            assert n2 == n, (n, n2)
            bare, steady, total = n / t_bare, n / t_steady, n / t_total
            print(f"  {encoder:10s} bare forward {bare:7.1f} patches/s | pipeline {steady:7.1f} "
                  f"steady, {total:7.1f} with start-up | ratio {steady / bare:.2f} steady "
                  f"(≥ 0.85: {'PASS' if steady / bare >= 0.85 else 'SHORT'}), "
                  f"{total / bare:.2f} total", flush=True)
    if args.no_memory:
        return
    print("peak RSS of `gigamil embed` (process tree), resnet18:", flush=True)
    rss = {}
    for k in (2, 8):
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            sub = Path(tmp) / "data"
            (sub / "patches").mkdir(parents=True)
            for s in sorted((work / "data" / "patches").glob("*.lmdb"))[:k]:
                shutil.copy(s, sub / "patches" / s.name)
            rss[k] = peak_rss([sys.executable, "-m", "gigamil", "embed", str(sub), "--encoder",
                               "resnet18", "--workers", str(args.workers), "--device", "cpu",
                               "--batch-size", str(args.batch_size)])
        print(f"  {k} slides: {rss[k]:7.0f} MB", flush=True)
    print(f"  growth from 2 to 8 slides: {rss[8] / rss[2] - 1:+.1%}")


if __name__ == "__main__":
    main()
