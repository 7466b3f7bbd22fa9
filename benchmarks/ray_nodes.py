"""Ray inference across nodes against one node with the same total CPUs: the overhead of
spreading `gigamil slurm template infer` over two nodes.

    eval $(bash tests/slurm_cluster.sh start)       # or a cluster login node
    .venv/bin/python benchmarks/ray_nodes.py [--slides 8] [--size 6144x4096]
        [--one debug] [--two multi] [--cpus 2]

Trains a tiny-cnn run on synthetic slides, then submits the rendered infer template twice:
on one node of partition ``--one`` with ``--cpus`` CPUs, and on two nodes of partition
``--two`` with half of them each. Prints each job's wall time (sbatch to exit, Ray start-up
included), the predictions' agreement, and the ratio.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gigamil.synth.slides import make_cohort


def _gigamil(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gigamil", *args], check=True,
                   stdout=subprocess.DEVNULL)


def _submit(root: Path, slides: Path, run: Path, name: str, nodes: int, cpus: int,
            partition: str) -> tuple[float, dict[str, str]]:
    preds = root / f"preds-{name}"
    script = root / f"{name}.sbatch"
    text = subprocess.run(
        [sys.executable, "-m", "gigamil", "slurm", "template", "infer", "--slides", str(slides),
         "--out", str(preds), "--nodes", str(nodes), "--cpus-per-task", str(cpus),
         "--partition", partition, "--time", "00:30:00", "--", "--run", str(run)],
        check=True, capture_output=True, text=True).stdout
    script.write_text(text)
    t0 = time.perf_counter()
    subprocess.run(["sbatch", "--wait", "--chdir", str(root), str(script)], check=True,
                   capture_output=True)
    wall = time.perf_counter() - t0
    rows = {r["slide_id"]: r["pred"] for r in csv.DictReader(open(preds / "predictions.csv"))}
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", default="6144x4096")
    ap.add_argument("--one", default="debug", help="partition for the one-node run")
    ap.add_argument("--two", default="multi", help="partition for the two-node run")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs in all, in either run")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-ray-", dir=Path.cwd()) as tmp:
        root = Path(tmp)
        slides, data, run = root / "slides", root / "data", root / "run"
        make_cohort(slides, n=args.slides, width=width, height=height, seed=0, workers=1)
        _gigamil("extract", str(slides), "--out", str(data), "--mpp", "1.0",
                 "--patch-size", "128")
        _gigamil("embed", str(data), "--encoder", "tiny-cnn", "--workers", "0",
                 "--device", "cpu")
        _gigamil("train", "--features", str(data / "features/tiny-cnn"), "--labels",
                 str(slides / "labels.csv"), "--out", str(run), "--folds", "2", "--epochs",
                 "1", "--batch-size", "2", "--bootstrap", "10", "--val-frac", "0")
        one, rows1 = _submit(root, slides, run, "one", 1, args.cpus, args.one)
        two, rows2 = _submit(root, slides, run, "two", 2, max(1, args.cpus // 2), args.two)
    print(f"{args.slides} slides {args.size}, {args.cpus} CPUs in all")
    print(f"  one node ({args.cpus} CPUs):       {one:6.1f} s  sbatch → exit")
    print(f"  two nodes ({args.cpus // 2} CPU(s) each): {two:6.1f} s")
    print(f"  two nodes / one node: {two / one:.2f}×; same predictions: {rows1 == rows2}")


if __name__ == "__main__":
    main()
