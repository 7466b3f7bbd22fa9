"""SLURM through submitit, against a real slurmctld/slurmd on localhost (marker `slurm`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gigamil.cli.main import app
from gigamil.synth.bags import make_feature_bags
from gigamil.synth.slides import make_cohort
from gigamil.wsi.store import PatchStore

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
runner = CliRunner()
SLURM_ARGS = ["--executor", "slurm", "--cpus-per-task", "1", "--time", "00:15:00", "--wait"]


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("slurm_bags")
    make_feature_bags(out, n_slides=20, dim=64, bag_size=(600, 1200), seed=3)
    return out


def _train_args(bags: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--features", str(bags), "--labels", str(bags / "labels.csv"),
            "--out", str(out), "--folds", "2", "--epochs", "3", "--batch-size", "2",
            "--lr", "1e-3", "--bootstrap", "20", "--early-stop", "0", "--device", "cpu",
            "--checkpoint-every", "1", "-o", "hidden=128", *extra]


def _weights(run: Path, fold: int = 1) -> dict[str, torch.Tensor]:
    last = sorted((run / f"checkpoints/fold{fold}").glob("step_*.pt"))[-1]
    return torch.load(last, weights_only=True)["model"]


def _assert_same(a: Path, b: Path) -> None:
    for fold in (0, 1):
        assert (a / f"predictions_fold{fold}.csv").read_bytes() == \
            (b / f"predictions_fold{fold}.csv").read_bytes()
        wa, wb = _weights(a, fold), _weights(b, fold)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (fold, k)


@pytest.fixture(scope="module")
def local_two_ranks(bags: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same training as 2 local gloo ranks under torchrun."""
    out = tmp_path_factory.mktemp("local2") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(29700 + os.getpid() % 200), "-m", "gigamil",
           *_train_args(bags, out)]
    res = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_extract_array_equals_local_extraction(slurm_cluster: str, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_cohort(slides, n=6, width=3072, height=2048, seed=5, workers=1)
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--mpp", "1.0", "--patch-size", "128"]
    res = runner.invoke(app, ["extract", str(slides), "--out", str(local), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["extract", str(slides), "--out", str(remote), *common,
                              "--slides-per-job", "2", *SLURM_ARGS])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(remote / "extract.csv")))
    assert sorted(r["slide_id"] for r in rows) == [f"s{i:03d}" for i in range(6)]
    assert all(r["status"] == "ok" for r in rows) and not list(remote.glob("extract.shard*"))
    for store in sorted((local / "patches").glob("*.lmdb")):
        with PatchStore(store) as a, PatchStore(remote / "patches" / store.name) as b:
            assert len(a) == len(b) > 0
            assert (a.coords == b.coords).all()
            assert all((a[i] == b[i]).all() for i in range(0, len(a), 7))
    jobs = json.loads((remote / "jobs" / "jobs.json").read_text())
    assert len(jobs) == 3 and {j["kind"] for j in jobs} == {"extract"}
    # an embed array over the same stores: 2 shards of 3 (SLURM array task ids start at 0)
    res = runner.invoke(app, ["embed", str(remote), "--encoder", "tiny-cnn", "--workers", "0",
                              "--device", "cpu", "--slides-per-job", "3", *SLURM_ARGS])
    assert res.exit_code == 0, res.output
    feats = remote / "features" / "tiny-cnn"
    assert sorted(p.stem for p in feats.glob("*.h5")) == [f"s{i:03d}" for i in range(6)]
    assert sorted(p.name for p in feats.glob("embed.shard*.csv")) == [
        "embed.shard0of2.csv", "embed.shard1of2.csv"]


def test_ddp_job_equals_local_two_ranks(slurm_cluster: str, bags: Path, local_two_ranks: Path,
                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, [*_train_args(bags, out), *SLURM_ARGS, "--tasks-per-node", "2"])
    assert res.exit_code == 0, res.output
    _assert_same(local_two_ranks, out)
    log = (out / "train.log").read_text()
    assert "rank 0 of 2" in log and "start 1 (SLURM_RESTART_COUNT=0)" in log
    assert "rank 0 of 2, 1 torch threads" in log  # sized from --cpus-per-task 1


def test_two_node_ddp_job_equals_local_two_ranks(slurm_cluster: str, bags: Path,
                                                local_two_ranks: Path, tmp_path: Path) -> None:
    """--nodes 2 --tasks-per-node 1 on partition `multi` (slurmd n1, n2, n3): one rank
    per node, the rendezvous from submitit's environment, bitwise the 2-rank run."""
    out = tmp_path / "run"
    res = runner.invoke(app, [*_train_args(bags, out), *SLURM_ARGS, "--partition", "multi",
                              "--nodes", "2", "--tasks-per-node", "1"])
    assert res.exit_code == 0, res.output
    _assert_same(local_two_ranks, out)
    job_id = json.loads((out / "jobs" / "jobs.json").read_text())[0]["job_id"]
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                           text=True).stdout
    assert "NumNodes=2" in shown, shown
    log = (out / "train.log").read_text()
    assert "rank 0 of 2" in log


def test_a_node_that_fails_mid_training_requeues_onto_the_others_and_ends_equal(
        slurm_cluster: str, bags: Path, local_two_ranks: Path, tmp_path: Path) -> None:
    """One rank's node goes DOWN during a 2-node run: SLURM kills the job (NODE_FAIL) and,
    as the job carries --requeue, queues it again; it starts on the two nodes left,
    resumes from the last checkpoint and finishes bitwise equal to the 2-rank run."""
    out = tmp_path / "run"
    res = runner.invoke(app, [*_train_args(bags, out), "--executor", "slurm", "--cpus-per-task",
                              "1", "--time", "00:15:00", "--partition", "multi", "--nodes", "2",
                              "--tasks-per-node", "1"])
    assert res.exit_code == 0, res.output
    job_id = json.loads((out / "jobs" / "jobs.json").read_text())[0]["job_id"]
    _wait_past_step(out, 6, time.time())

    def show() -> str:
        return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                              text=True).stdout

    first = next(t for t in show().split() if t.startswith("NodeList=")).split("=", 1)[1]
    failed = subprocess.run(["scontrol", "show", "hostnames", first], capture_output=True,
                            text=True).stdout.split()[-1]
    subprocess.run(["scontrol", "update", f"nodename={failed}", "state=down",
                    "reason=gigamil-test"], check=True)  # kills the job: NODE_FAIL
    # kept out of service (ReturnToService=2 would take it back as soon as its slurmd
    # registers again, as a node that was really repaired would)
    subprocess.run(["scontrol", "update", f"nodename={failed}", "state=drain",
                    "reason=gigamil-test"], check=True)
    try:
        _wait_finished(out, job_id)
        shown = show()
    finally:
        subprocess.run(["scontrol", "update", f"nodename={failed}", "state=resume"],
                       capture_output=True)
    assert "Restarts=1" in shown, shown
    again = next(t for t in shown.split() if t.startswith("NodeList=")).split("=", 1)[1]
    assert failed not in subprocess.run(["scontrol", "show", "hostnames", again],
                                        capture_output=True, text=True).stdout.split()
    script = next((out / "jobs").glob(f"{job_id}*/*submission.sh"))
    assert "#SBATCH --requeue" in script.read_text()
    log = (out / "train.log").read_text()
    assert "start 2 (SLURM_RESTART_COUNT=1)" in log and "resumes from step_" in log
    _assert_same(local_two_ranks, out)


def test_an_extract_array_spread_over_two_nodes_equals_local(slurm_cluster: str,
                                                             tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=2048, height=2048, seed=7, workers=1)
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--mpp", "1.0", "--patch-size", "128"]
    res = runner.invoke(app, ["extract", str(slides), "--out", str(local), *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["extract", str(slides), "--out", str(remote), *common,
                              "--slides-per-job", "1", "--partition", "multi", *SLURM_ARGS])
    assert res.exit_code == 0, res.output
    nodes = set()
    for job in json.loads((remote / "jobs" / "jobs.json").read_text()):
        shown = subprocess.run(["scontrol", "show", "job", "-o", job["job_id"]],
                               capture_output=True, text=True).stdout
        nodes |= {t.split("=", 1)[1] for t in shown.split() if t.startswith("NodeList=")}
    assert len(nodes) >= 2 and nodes <= {"n1", "n2", "n3"}, nodes  # spread over nodes
    for store in sorted((local / "patches").glob("*.lmdb")):
        with PatchStore(store) as a, PatchStore(remote / "patches" / store.name) as b:
            assert len(a) == len(b) > 0
            assert (a.coords == b.coords).all()
            assert all((a[i] == b[i]).all() for i in range(0, len(a), 5))


def _submit_and_wait_for_step(bags: Path, out: Path, step: int) -> tuple[str, float, float]:
    res = runner.invoke(app, [*_train_args(bags, out), "--executor", "slurm", "--cpus-per-task",
                              "1", "--time", "00:15:00", "--tasks-per-node", "2"])
    assert res.exit_code == 0, res.output
    t_submit = time.time()
    job_id = json.loads((out / "jobs" / "jobs.json").read_text())[0]["job_id"]
    first = _wait_past_step(out, step, t_submit)
    return job_id, t_submit, first


def _wait_past_step(out: Path, step: int, t0: float, timeout: float = 240) -> float:
    """Wait until training has checkpointed step `step` or later; returns the seconds from
    `t0` to the first checkpoint seen. Only the last few checkpoints are kept, so step
    `step` itself may be gone between two polls: any later one (or fold 1) counts."""
    first = None
    while True:
        steps = [int(p.stem.split("_")[1]) for p in out.glob("checkpoints/fold*/step_*.json")]
        if steps and first is None:
            first = time.time() - t0
        if (out / "checkpoints/fold1").is_dir() or (steps and max(steps) >= step):
            return first if first is not None else time.time() - t0
        assert time.time() - t0 < timeout, f"the job never reached step {step}"
        time.sleep(0.05)


def _wait_finished(out: Path, job_id: str, timeout: float = 300) -> None:
    t0 = time.time()
    while not (out / "summary.json").exists() or \
            "JobState=COMPLETED" not in subprocess.run(
                ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout:
        assert time.time() - t0 < timeout, (out / "train.log").read_text()
        time.sleep(0.5)


def test_usr2_checkpoints_requeues_and_finishes_equal(slurm_cluster: str, bags: Path,
                                                      local_two_ranks: Path, tmp_path: Path
                                                      ) -> None:
    out = tmp_path / "run"
    job_id, t_submit, first = _submit_and_wait_for_step(bags, out, 2)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    t_signal = time.time()
    _wait_finished(out, job_id)
    log = (out / "train.log").read_text()
    assert "pre-emption or time limit (USR2): checkpoint written, requeueing" in log
    assert "start 2 (SLURM_RESTART_COUNT=1)" in log and "resumes from step_" in log
    _assert_same(local_two_ranks, out)
    res = runner.invoke(app, ["jobs", str(out)])
    assert res.exit_code == 0 and "done" in res.output
    print(f"\nsubmit → first checkpoint {first:.1f} s; USR2 → finished "
          f"{time.time() - t_signal:.1f} s")


def test_scontrol_requeue_resumes_from_disk(slurm_cluster: str, bags: Path,
                                            local_two_ranks: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    job_id, _, _ = _submit_and_wait_for_step(bags, out, 2)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    _wait_finished(out, job_id)
    log = (out / "train.log").read_text()
    assert "start 2 (SLURM_RESTART_COUNT=1)" in log and "resumes from step_" in log
    _assert_same(local_two_ranks, out)


def test_a_failing_job_is_reported_with_its_log(slurm_cluster: str, bags: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, [*_train_args(bags, out, "-o", "nonsense=1"), *SLURM_ARGS])
    assert res.exit_code != 0 and "nonsense" in res.output
    res = runner.invoke(app, ["jobs", str(out)])
    assert res.exit_code == 1
    flat = " ".join(res.output.split())
    assert "failed" in flat and "_0_log.err" in flat.replace(" ", "")


def test_a_rendered_template_job_runs(slurm_cluster: str, tmp_path: Path) -> None:
    slides = tmp_path / "my slides"
    make_cohort(slides, n=2, width=3072, height=2048, seed=6, workers=1)
    out = tmp_path / "out dir"
    res = runner.invoke(app, ["slurm", "template", "extract", "--slides", str(slides), "--out",
                              str(out), "--n-tasks", "2", "--cpus-per-task", "1", "--",
                              "--mpp", "1.0", "--patch-size", "128"])
    assert res.exit_code == 0, res.output
    script = tmp_path / "extract.sbatch"
    script.write_text(res.output)
    done = subprocess.run(["sbatch", "--wait", "--chdir", str(tmp_path), str(script)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (out / "patches").glob("*.lmdb")) == ["s000.lmdb", "s001.lmdb"]


def _ray_processes() -> list[str]:
    res = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::|default_worker.py"],
                         capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if "pgrep" not in line]


def test_the_ray_template_on_two_nodes_predicts_every_slide_once_and_leaves_no_ray(
        slurm_cluster: str, tmp_path: Path) -> None:
    """`gigamil slurm template infer --nodes 2`, submitted with sbatch on partition `multi`:
    the head on n1, a worker on n2, the driver joins once both are up; every slide is
    predicted once, the job exits 0, and no Ray process or temp dir of it is left."""
    slides = tmp_path / "slides"
    make_cohort(slides, n=4, width=2048, height=2048, seed=8, workers=1)
    data, run, preds = tmp_path / "data", tmp_path / "run", tmp_path / "preds"
    for args in (["extract", str(slides), "--out", str(data), "--mpp", "1.0", "--patch-size",
                  "128"],
                 ["embed", str(data), "--encoder", "tiny-cnn", "--workers", "0", "--device",
                  "cpu"],
                 ["train", "--features", str(data / "features/tiny-cnn"), "--labels",
                  str(slides / "labels.csv"), "--out", str(run), "--folds", "2", "--epochs",
                  "1", "--batch-size", "2", "--bootstrap", "10", "--val-frac", "0"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    before = _ray_processes()
    stale = Path("/tmp/gigamil-ray-999999")  # left by a job killed too hard to clean up
    (stale / "session_x").mkdir(parents=True, exist_ok=True)
    res = runner.invoke(app, ["slurm", "template", "infer", "--slides", str(slides), "--out",
                              str(preds), "--nodes", "2", "--cpus-per-task", "1",
                              "--partition", "multi", "--time", "00:15:00", "--",
                              "--run", str(run)])
    assert res.exit_code == 0, res.output
    script = tmp_path / "infer.sbatch"
    script.write_text(res.output)
    done = subprocess.run(["sbatch", "--parsable", "--wait", "--chdir", str(tmp_path),
                           str(script)], capture_output=True, text=True, timeout=480)
    job_id = done.stdout.strip().split(";")[0]
    log = (tmp_path / f"gigamil-infer-{job_id}.out")
    assert done.returncode == 0, log.read_text()[-3000:] if log.exists() else done.stderr
    assert "ray: 2 nodes up" in log.read_text()
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                           text=True).stdout
    assert "NumNodes=2" in shown and "JobState=COMPLETED" in shown, shown
    rows = list(csv.DictReader(open(preds / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == [f"s{i:03d}" for i in range(4)]  # once each
    pipeline = json.loads((preds / "infer_config.json").read_text())["pipeline"]
    assert pipeline["engine"] == "ray" and pipeline["cpus"] == 2  # one CPU on each node
    for _ in range(40):  # the steps' teardown may take a moment after the job is COMPLETED
        if _ray_processes() == before:
            break
        time.sleep(0.5)
    assert _ray_processes() == before, _ray_processes()
    assert not list(Path("/tmp").glob(f"gigamil-ray-{job_id}*")) and not stale.exists()


def test_a_job_that_could_never_start_is_refused_at_submission(slurm_cluster: str,
                                                               tmp_path: Path) -> None:
    """Found as a new user: the default --cpus-per-task 8 on a 2-CPU partition pended for
    ever (reason PartitionConfig) and said nothing."""
    slides = tmp_path / "slides"
    make_cohort(slides, n=1, width=2048, height=2048, seed=7, workers=1)
    cpus = os.cpu_count() or 1
    out = tmp_path / "out"
    res = runner.invoke(app, ["extract", str(slides), "--out", str(out), "--executor", "slurm",
                              "--cpus-per-task", str(cpus + 6), "--mem", "100T",
                              "--time", "00:05:00", "--wait"])
    flat = " ".join(res.output.split())
    assert res.exit_code == 2 and "could never start" in flat, res.output
    assert f"no node of partition debug has more than {cpus}" in flat
    assert "--mem" in flat and not (out / "jobs").exists()  # nothing was submitted


def test_wait_ends_when_the_jobs_are_cancelled_and_jobs_shows_why_they_pend(
        slurm_cluster: str, tmp_path: Path) -> None:
    """Found as a new user: after `scancel` of a pending array, `extract --wait` waited on
    (accounting is off on the test cluster, as on many)."""
    slides = tmp_path / "slides"
    make_cohort(slides, n=1, width=2048, height=2048, seed=7, workers=1)
    cpus = os.cpu_count() or 1
    blocker = subprocess.run(["sbatch", "--parsable", "-c", str(cpus), "--chdir",
                              str(tmp_path), "--wrap", "sleep 300"],  # its log: not in the repo
                             capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gigamil", "extract", str(slides), "--out", str(out),
           "--mpp", "1.0", "--patch-size", "128", *SLURM_ARGS]
    waiter = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not (out / "jobs" / "jobs.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        job_id = json.loads((out / "jobs" / "jobs.json").read_text())[0]["job_id"]
        time.sleep(3)  # the controller gives the pending job its reason
        res = runner.invoke(app, ["jobs", str(out)])
        assert "pending" in res.output and "Resources" in " ".join(res.output.split()), \
            res.output
        subprocess.run(["scancel", job_id.split("_")[0]], check=True)
        output, _ = waiter.communicate(timeout=60)  # --wait ends
        assert waiter.returncode != 0 and "CANCELLED" in output, output
    finally:
        waiter.kill()
        subprocess.run(["scancel", blocker])
