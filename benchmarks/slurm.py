"""SLURM overheads on the cluster at hand: submission to first training step, and requeue to
resume (after ``scontrol requeue``, after a USR2 pre-emption signal, and with ``--nodes 2``
or more after one of the job's nodes goes DOWN; a spare node is needed).

    .venv/bin/python benchmarks/slurm.py [--tasks 2] [--nodes 1] [--partition P]
    .venv/bin/python benchmarks/slurm.py --partition multi --nodes 2 --tasks 1   # test cluster

Needs sbatch (on a cluster login node, or the local test cluster:
``eval $(bash tests/slurm_cluster.sh start)``). Trains a small 2-fold run on synthetic bags
with a checkpoint every step, so "the first training step" is the first checkpoint on disk.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from gigamil.cluster.executor import ClusterOptions, run_stage
from gigamil.cluster.stages import TrainStage
from gigamil.mil.train_config import TrainConfig
from gigamil.synth.bags import make_feature_bags


def _log_time(log: Path, pattern: str, after: float) -> float | None:
    """The epoch time of the first train.log line matching ``pattern`` written after ``after``."""
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        if re.search(pattern, line):
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if stamp >= after - 1:
                return stamp
    return None


def _wait(cond, timeout: float = 600) -> float:  # noqa: ANN001
    t0 = time.time()
    while True:
        value = cond()
        if value:
            return value
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.05)


def one(feats: Path, out: Path, opts: ClusterOptions, interrupt: str) -> dict[str, float]:
    cfg = TrainConfig(features=str(feats), labels=str(feats / "labels.csv"), out=str(out),
                      folds=2, epochs=4, batch_size=2, device="cpu", checkpoint_every=1,
                      early_stop=None, bootstrap=20)
    t0 = time.time()
    job = run_stage(TrainStage(cfg), opts).jobs[0]
    ckpts = out / "checkpoints" / "fold0"
    _wait(lambda: list(ckpts.glob("step_*.json")))
    first_step = time.time() - t0
    _wait(lambda: (ckpts / "step_00000006.json").exists())
    failed = ""
    if interrupt == "node":  # one of its nodes goes DOWN (and stays out: drained)
        shown = subprocess.run(["scontrol", "show", "job", "-o", job.job_id],
                               capture_output=True, text=True).stdout
        nodes = next(t for t in shown.split() if t.startswith("NodeList=")).split("=", 1)[1]
        failed = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                                text=True).stdout.split()[-1]
        cmds = [["scontrol", "update", f"nodename={failed}", f"state={st}", "reason=bench"]
                for st in ("down", "drain")]
    else:
        cmds = [["scancel", "--signal=USR2", job.job_id] if interrupt == "usr2" else
                ["scontrol", "requeue", job.job_id]]
    t1 = time.time()
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True)
        resumed = _wait(lambda: _log_time(out / "train.log", "resumes from step_", t1))
        _wait(lambda: (out / "summary.json").exists())
    finally:
        if failed:
            subprocess.run(["scontrol", "update", f"nodename={failed}", "state=resume"])
    return {"submit_to_first_step": first_step, "requeue_to_resume": resumed - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--partition", default=None)
    args = ap.parse_args()
    opts = ClusterOptions(executor="slurm", tasks_per_node=args.tasks, cpus_per_task=1,
                          time="00:20:00", partition=args.partition, nodes=args.nodes)
    with tempfile.TemporaryDirectory(prefix="gigamil-bench-slurm-") as tmp:
        feats = Path(tmp) / "feats"
        make_feature_bags(feats, n_slides=20, dim=64, bag_size=(600, 1200), seed=0)
        kinds = ("requeue", "usr2", *(("node",) if args.nodes > 1 else ()))
        res = {kind: one(feats, Path(tmp) / kind, opts, kind) for kind in kinds}
    print(json.dumps(res, indent=2))
    for kind, r in res.items():
        print(f"{kind:8s}: submit → first training step {r['submit_to_first_step']:.1f} s; "
              f"{ {'requeue': 'scontrol requeue', 'usr2': 'USR2', 'node': 'node DOWN'}[kind]}"
              " → resumed "
              f"{r['requeue_to_resume']:.1f} s ({args.nodes} node(s) × {args.tasks} ranks)")


if __name__ == "__main__":
    main()
