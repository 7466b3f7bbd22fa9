"""Chaos, every stage: SIGKILL extract, embed, train and infer at seeded random moments.

For each stage (extract → embed → train → infer, each reading the previous stage's
reference output):

1. a reference: ``python -m gigamil STAGE ...`` run uninterrupted, in a fresh process;
2. the same command into another folder, uninterrupted, started by a fork server: it must
   give the reference's outputs too, and it times the stage's work;
3. ``KILLS`` runs, each on what the previous one left, each SIGKILLed (its whole process
   group, as a scheduler does) at a seeded random moment of its work: within the work time
   of (2) scaled by the share of work left, counted from the moment the run first changes
   its output folder. A run that ends before its kill is compared with the reference and
   the folder wiped, so that the next kills land in real work again;
4. a final run, a fresh ``python -m gigamil`` process, that finishes the job; its outputs
   must equal the reference's bitwise (patch bytes, features, weights, optimizer and RNG
   state, prediction tables but their timings).

After every kill, each file under the output folder that a reader would take as complete
(any name but the temporary ones: ``.NAME.tmp-*``, ``*.partial``, write probes and lock
files) is opened with the reader the package uses for it: a truncated file is never read
as complete.

Why a fork server: the killed runs are children forked from one process that has already
imported torch, timm and gigamil (5-10 s of CPU per fresh process on a slow core, more
than the work of a stage here), and run the CLI's ``main`` with their argv. So each kill
lands in the stage's work rather than in the interpreter's start-up, and the twenty-odd
runs take seconds, not minutes; the references and final runs are fresh processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KILLS = 5  # per stage
MAX_RUNS = KILLS + 6  # runs per stage (kills, runs that finished first) before giving up
RUN_TIMEOUT = 300.0  # seconds for one run
SLIDES = ("s000", "s001", "s002", "s003")
EPOCHS, STEPS_PER_EPOCH = 4, 2  # train: 2 folds of 2 training slides, batch size 1

#: One thread everywhere: float32 sums depend on the thread count, and the runs compared
#: bitwise must use the same one whatever the machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "OPENBLAS_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

#: Names that no reader opens: atomic writes' temporaries, unfinished stores, write probes
TEMPORARY = re.compile(r"^\..*\.tmp-|\.partial$|^\.gigamil-write-test-")
#: and the (empty) files that flocks are held on
LOCK = re.compile(r"\.lock$|\.partial-lock$")


# -- running and killing -----------------------------------------------------------------------

@dataclass
class Timing:
    first_change: float  # seconds from start until the run first changed its output folder
    total: float

    @property
    def work(self) -> float:
        return max(self.total - self.first_change, 0.3)


def _snapshot(root: Path) -> frozenset[tuple[str, int, int]] | None:
    """Every entry under ``root`` with its size and mtime (None: no folder yet)."""
    if not root.exists():
        return None
    items = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:  # renamed or removed while we looked
                continue
            items.add((path, st.st_size, st.st_mtime_ns))
    return frozenset(items)


#: A fork server: imports torch, timm and gigamil once (~5-10 s of CPU, most of a run's
#: start-up), then forks one child per request that runs the CLI (``gigamil.cli.main``)
#: with the request's argv, in a session of its own, its output to the request's log; the
#: child exits as ``python -m gigamil`` would (atexit handlers, then its status). The
#: server answers each request with the child's pid, then with its exit status.
FORK_SERVER = r"""
import atexit, json, os, random, sys, traceback
import numpy as np
import torch, timm, cv2, h5py, lmdb
import gigamil.cli.main
import gigamil.wsi.extract, gigamil.mil.embed, gigamil.mil.train, gigamil.mil.infer
import gigamil.cluster.launch, gigamil.cluster.infer
sys.stdout.write("ready\n")
sys.stdout.flush()
for line in sys.stdin:
    req = json.loads(line)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        random.seed()  # what a fresh interpreter would have: its own seeds
        np.random.seed()
        sys.argv = ["gigamil", *req["args"]]
        code = 0
        try:
            gigamil.cli.main.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    sys.stdout.write(json.dumps({"pid": pid}) + "\n")
    sys.stdout.flush()
    _, status = os.waitpid(pid, 0)
    sys.stdout.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
    sys.stdout.flush()
"""


class ForkServer:
    """Starts ``gigamil`` runs as children of :data:`FORK_SERVER` (no start-up each)."""

    def __init__(self, log: Path) -> None:
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=ENV)
        self._buf = b""
        self._ready = False

    def _line(self, timeout: float | None) -> str | None:
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            assert self.proc.stdout is not None
            if not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"the fork server died (rc {self.proc.poll()})"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, args: list[str], log: Path) -> ForkedRun:
        if not self._ready:
            assert self._line(RUN_TIMEOUT) == "ready", "the fork server did not start"
            self._ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"args": args, "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(RUN_TIMEOUT)
        assert line is not None, "the fork server does not answer"
        return ForkedRun(self, json.loads(line)["pid"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class ForkedRun:
    """The parts of :class:`subprocess.Popen` that :func:`_run` uses, for a forked run."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self, timeout: float = 0.0) -> int | None:
        if self.returncode is None:
            line = self.server._line(timeout)
            if line is not None:
                self.returncode = int(json.loads(line)["status"])
        return self.returncode

    def wait(self) -> int:
        rc = self.poll(RUN_TIMEOUT)
        assert rc is not None, "a forked run does not end"
        return rc


def _run(args: list[str], out: Path, log: Path, kill_after: float | None,
         forks: ForkServer | None = None) -> tuple[int, Timing]:
    """Run ``gigamil *args`` (a fresh ``python -m gigamil``, or a child of ``forks``); with
    ``kill_after``, SIGKILL its process group that many seconds after it first changes
    ``out``. The exit status (-9: killed) and the timing."""
    before = _snapshot(out)
    t0 = time.monotonic()
    proc: subprocess.Popen[bytes] | ForkedRun
    if forks is not None:
        proc = forks.start(args, log)
    else:
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "gigamil", *args], stdout=fh,
                                    stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    changed: float | None = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if changed is None and _snapshot(out) != before:
                changed = now
            if kill_after is not None and changed is not None and now - changed >= kill_after:
                _kill(proc.pid)
                break
            assert now - t0 < RUN_TIMEOUT, f"gigamil {args[0]} hangs: {_tail(log)}"
            time.sleep(0.01)
    finally:
        if proc.poll() is None:  # killed above, or the test failed: nothing stays behind
            _kill(proc.pid)
        rc = proc.wait()
    total = time.monotonic() - t0
    return rc, Timing(total if changed is None else changed - t0, total)


def _kill(pid: int) -> None:
    """SIGKILL the run's whole process group (its session: it and any children)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # no group (yet): the run alone; or it has just ended
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:]


# -- what a reader would see between kills ----------------------------------------------------

def _check_file(path: Path) -> str | None:
    """Open ``path`` as the package's readers do; why it is not complete, or None."""
    import cv2
    import h5py
    import torch

    from gigamil.cluster.checkpoint import CheckpointManager
    from gigamil.wsi.features import read_bag
    from gigamil.wsi.store import PatchStore

    suffix = path.suffix
    if suffix == ".json":
        obj = json.loads(path.read_text())
        if path.parent.name == "slides":  # infer: the json marks the slide done, written last
            with np.load(path.with_suffix(".npz")) as z:
                if len(z["coords"]) != int(obj["n_patches"]):
                    return f"{len(z['coords'])} coords for {obj['n_patches']} patches"
            if not (path.parent.parent / "heatmaps" / f"{path.stem}.png").exists():
                return "slide marked done without its heatmap"
        if path.name == "result.json":  # train: a finished fold, written after its predictions
            fold = path.parent.name.removeprefix("fold")
            if not (path.parent.parent.parent / f"predictions_fold{fold}.csv").exists():
                return "fold marked finished without its predictions"
    elif suffix == ".csv":
        rows = list(csv.reader(open(path, newline="")))
        if not rows or not rows[0]:
            return "no header"
        bad = [i for i, r in enumerate(rows) if len(r) != len(rows[0])]
        if bad:
            return f"rows {bad[:5]} have a number of cells other than the header's"
    elif suffix == ".lmdb":
        with PatchStore(path) as store:
            n, size = len(store), store.patch_size
            if store.coords.shape != (n, 2):
                return f"coords {store.coords.shape} for {n} patches"
            for i, patch in enumerate(store):
                if patch.shape != (size, size, 3):
                    return f"patch {i} decodes to {patch.shape}"
    elif suffix == ".h5":
        if (path.parent / "embed_config.json").exists() or path.parent.parent.name == "features":
            bag = read_bag(path)
            expected = int(bag.attrs["store_count"]) - int(bag.attrs["n_bad"])
            if len(bag) != expected:
                return f"{len(bag)} features for {expected} patches"
        else:
            with h5py.File(path, "r") as f:
                f.visititems(_read_dataset)
    elif suffix == ".pt":
        torch.load(path, map_location="cpu", weights_only=True)  # written atomically
        # a sidecar that does not match (the .pt replaced, the .json not yet) makes the
        # readers skip the checkpoint: incomplete to them, never read as complete
        CheckpointManager(path.parent).verify(path)
    elif suffix == ".npz":
        with np.load(path) as z:
            for k in z.files:
                _ = z[k]
    elif suffix == ".png":
        if cv2.imread(str(path)) is None:
            return "does not decode"
    else:
        return None
    return None


def _read_dataset(_: str, obj: Any) -> None:
    import h5py

    if isinstance(obj, h5py.Dataset):
        _ = obj[()]  # (returning anything but None would stop the visit)


@dataclass
class Scan:
    checked: int = 0
    temporary: int = 0
    problems: list[str] = field(default_factory=list)


def _scan(root: Path) -> Scan:
    scan = Scan()
    if not root.exists():
        return scan
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if TEMPORARY.search(path.name):
            scan.temporary += 1
            continue
        if LOCK.search(path.name):
            continue
        if path.suffix not in (".json", ".csv", ".lmdb", ".h5", ".pt", ".npz", ".png"):
            continue
        scan.checked += 1
        try:
            why = _check_file(path)
        except Exception as exc:  # noqa: BLE001 - any reader error is the finding
            why = f"{type(exc).__name__}: {exc}"
        if why:
            scan.problems.append(f"{path.relative_to(root)}: {why}")
    return scan


# -- comparing with the reference -------------------------------------------------------------

def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested containers of tensors, arrays and scalars."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


class Comparison:
    def __init__(self, ref: Path, out: Path) -> None:
        self.ref, self.out = ref, out
        self.compared = 0
        self.differences: list[str] = []

    def check(self, what: str, ok: bool) -> None:
        self.compared += 1
        if not ok:
            self.differences.append(what)

    def names(self, pattern: str) -> list[str]:
        a = sorted(str(p.relative_to(self.ref)) for p in self.ref.glob(pattern))
        b = sorted(str(p.relative_to(self.out)) for p in self.out.glob(pattern))
        self.check(f"{pattern}: {a} vs {b}", a == b and bool(a))
        return a

    def json(self, name: str, drop: tuple[str, ...] = ()) -> None:
        """Equal JSON but the ``drop`` keys (dotted: ``config.out``)."""
        a, b = (json.loads((d / name).read_text()) for d in (self.ref, self.out))
        for key in drop:
            *parents, last = key.split(".")
            for obj in (a, b):
                for k in parents:
                    obj = obj.get(k, {})
                obj.pop(last, None)
        self.check(name, _same(a, b))

    def bytes(self, name: str) -> None:
        self.check(name, (self.ref / name).read_bytes() == (self.out / name).read_bytes())

    def rows(self, name: str, key: str, drop: tuple[str, ...] = ("seconds",),
             either: tuple[str, ...] = ()) -> None:
        """CSV rows by ``key``, but the ``drop`` cells; ``either`` cells may say ok or
        skipped (a rerun skips what an earlier run finished, and notes why)."""
        def read(d: Path) -> dict[str, dict[str, str]]:
            return {r[key]: {k: v for k, v in r.items() if k not in drop}
                    for r in csv.DictReader(open(d / name, newline=""))}
        a, b = read(self.ref), read(self.out)
        for rows in (a, b):
            for r in rows.values():
                for k in either:
                    if r[k] == "skipped" and r.get("note", "").startswith("already"):
                        r["note"] = ""
                    if r[k] in ("ok", "skipped"):
                        r[k] = "done"
        diff = [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
        self.check(f"{name} {diff[:1]}", a == b and bool(a))

    def pixels(self, name: str) -> None:
        import cv2

        self.check(name, _same(cv2.imread(str(self.ref / name)), cv2.imread(str(self.out / name))))

    def h5(self, name: str) -> None:
        import h5py

        def read(path: Path) -> dict[str, Any]:
            found: dict[str, Any] = {}
            with h5py.File(path, "r") as f:
                found["/attrs"] = dict(f.attrs)
                f.visititems(lambda k, obj: found.update(
                    {k: obj[()], f"{k}/attrs": dict(obj.attrs)})
                    if isinstance(obj, h5py.Dataset) else None)
            return found
        self.check(name, _same(read(self.ref / name), read(self.out / name)))


def _compare_extract(ref: Path, out: Path) -> Comparison:
    from gigamil.wsi.store import PatchStore

    c = Comparison(ref, out)
    for name in c.names("patches/*.lmdb"):
        with PatchStore(ref / name) as a, PatchStore(out / name) as b:
            c.check(f"{name} meta", _same(a.meta, b.meta))
            c.check(f"{name} coords", _same(a.coords, b.coords))
            c.check(f"{name} patch bytes", list(a.iter_encoded()) == list(b.iter_encoded()))
    c.rows("extract.csv", "slide_id", either=("status",))
    c.json("extract_config.json")
    return c


def _compare_embed(ref: Path, out: Path) -> Comparison:
    from gigamil.wsi.features import read_bag

    c = Comparison(ref, out)
    for name in c.names("features/tiny-cnn/*.h5"):
        a, b = read_bag(ref / name), read_bag(out / name)
        c.check(f"{name} features", _same(a.features, b.features))
        c.check(f"{name} coords", _same(a.coords, b.coords))
        c.check(f"{name} attrs", _same(a.attrs, b.attrs))
    c.rows("features/tiny-cnn/embed.csv", "slide_id", either=("status",))
    c.json("features/tiny-cnn/embed_config.json")
    return c


def _compare_train(ref: Path, out: Path) -> Comparison:
    import torch

    def load(path: Path) -> dict[str, Any]:
        return torch.load(path, map_location="cpu", weights_only=True)

    c = Comparison(ref, out)
    for name in ("metrics.csv", "splits.csv", "predictions_fold0.csv", "predictions_fold1.csv"):
        c.bytes(name)
    c.json("config.json", drop=("config.out",))  # the one setting that differs
    for name in ("summary.json", "checkpoints/fold0/result.json",
                 "checkpoints/fold1/result.json"):
        c.json(name)
    for fold in (0, 1):
        c.h5(f"embeddings_fold{fold}.h5")
        best = f"checkpoints/fold{fold}/best.pt"
        c.check(f"{best} (weights, meta)", _same(load(ref / best), load(out / best)))
        steps = c.names(f"checkpoints/fold{fold}/step_*.pt")
        if steps:  # the latest: weights, optimizer, scheduler, progress, RNG, all of it
            c.check(f"{steps[-1]} (full state)",
                    _same(load(ref / steps[-1]), load(out / steps[-1])))
    c.pixels("reliability.png")
    return c


def _compare_infer(ref: Path, out: Path) -> Comparison:
    c = Comparison(ref, out)
    c.rows("predictions.csv", "slide_id")
    c.bytes("failures.csv")
    for name in c.names("slides/*.json"):
        c.json(name, drop=("seconds",))
    for name in c.names("slides/*.npz"):
        with np.load(ref / name) as a, np.load(out / name) as b:
            c.check(name, _same({k: a[k] for k in a.files}, {k: b[k] for k in b.files}))
    for name in c.names("heatmaps/*.png"):
        c.pixels(name)
    c.h5("embeddings.h5")
    a, b = (json.loads((d / "infer_config.json").read_text())["config"] for d in (ref, out))
    c.check("infer_config.json config", _same(a, b))
    return c


# -- the stages ---------------------------------------------------------------------------------

def _done_extract(out: Path) -> float:
    return len(list((out / "patches").glob("*.lmdb"))) / len(SLIDES)


def _done_embed(out: Path) -> float:
    return len(list((out / "features" / "tiny-cnn").glob("*.h5"))) / len(SLIDES)


def _done_train(out: Path) -> float:
    done = 0.0
    for fold in (0, 1):
        ckpt = out / "checkpoints" / f"fold{fold}"
        steps = [int(p.stem[5:]) for p in ckpt.glob("step_*.json")]
        done += 1.0 if (ckpt / "result.json").exists() else max(steps, default=0) / (
            EPOCHS * STEPS_PER_EPOCH)
    return done / 2


def _done_infer(out: Path) -> float:
    return len(list((out / "slides").glob("*.json"))) / len(SLIDES)


@dataclass
class Stage:
    name: str
    seed: int
    args: Callable[[Path], list[str]]  # the command, given its output folder
    done: Callable[[Path], float]  # share of the work finished in an output folder
    compare: Callable[[Path, Path], Comparison]


@dataclass
class Totals:
    kills: int = 0
    finished_first: int = 0  # runs that ended before their kill
    reruns: int = 0  # every run after the first one into the folder
    kill_delays: list[float] = field(default_factory=list)
    run_seconds: list[float] = field(default_factory=list)  # every run, the final one too
    forked_work: float = 0.0  # seconds from first output to the end, uninterrupted, forked
    scans: int = 0
    files_checked: int = 0
    temporary_seen: int = 0
    temporary_left: int = 0  # temporaries still there after the final run
    compared: int = 0
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    def line(self, name: str, ref: Timing) -> str:
        delays = ", ".join(f"{d:.1f}" for d in self.kill_delays)
        return (f"chaos {name:8s} reference={ref.total:.1f}s (first output at "
                f"{ref.first_change:.1f}s; forked: work {self.forked_work:.1f}s) "
                f"runs={len(self.run_seconds)} in "
                f"{sum(self.run_seconds):.1f}s kills={self.kills} (at {delays}s after the "
                "run's first output) "
                f"finished_before_kill={self.finished_first} reruns={self.reruns} "
                f"scans={self.scans} files_checked={self.files_checked} "
                f"temporaries_seen={self.temporary_seen} temporaries_left={self.temporary_left} "
                f"outputs_compared={self.compared} partial_read_as_complete={len(self.problems)} "
                f"differences={len(self.differences)}")


def _reference(stage: Stage, root: Path) -> tuple[Path, Timing]:
    out = root / stage.name
    rc, timing = _run(stage.args(out), out, root / f"{stage.name}.log", None)
    assert rc == 0, _tail(root / f"{stage.name}.log")
    return out, timing


def _chaos(stage: Stage, ref: Path, root: Path, forks: ForkServer) -> Totals:
    rng = random.Random(stage.seed)
    out = root / stage.name
    totals = Totals()

    def scan(after: str) -> None:
        s = _scan(out)
        totals.scans += 1
        totals.files_checked += s.checked
        totals.temporary_seen += s.temporary
        totals.problems += [f"after {after}: {p}" for p in s.problems]

    def compare(after: str) -> None:
        c = stage.compare(ref, out)
        totals.compared += c.compared
        totals.differences += [f"after {after}: {d}" for d in c.differences]

    # an uninterrupted forked run: it must equal the reference too, and it times the work
    # of a run that starts without importing anything (the reference's own is longer)
    log = root / f"{stage.name}-uninterrupted.log"
    rc, t = _run(stage.args(out), out, log, None, forks)
    totals.run_seconds.append(t.total)
    assert rc == 0, _tail(log)
    scan("an uninterrupted forked run")
    compare("an uninterrupted forked run")
    shutil.rmtree(out)
    work = totals.forked_work = t.work
    runs = 0
    while totals.kills < KILLS:
        assert runs < MAX_RUNS, f"{stage.name}: {totals.kills} kills in {runs} runs"
        left = max(1.0 - stage.done(out), 0.25)
        delay = rng.uniform(0.0, work * left)
        totals.reruns += int(out.exists())
        log = root / f"{stage.name}-{runs}.log"
        rc, t = _run(stage.args(out), out, log, delay, forks)
        totals.run_seconds.append(t.total)
        runs += 1
        if rc == -signal.SIGKILL:
            totals.kills += 1
            totals.kill_delays.append(delay)
            scan(f"kill {totals.kills}")
        else:
            assert rc == 0, _tail(log)
            totals.finished_first += 1
            scan(f"run {runs} (finished)")
            compare(f"run {runs} (finished)")
            shutil.rmtree(out)  # start over: the next kills land in real work again
    log = root / f"{stage.name}-final.log"
    totals.reruns += 1
    rc, t = _run(stage.args(out), out, log, None)
    totals.run_seconds.append(t.total)
    assert rc == 0, _tail(log)
    scan("the final run")
    compare("the final run")
    totals.temporary_left = _scan(out).temporary
    return totals


def _report(stage: Stage, totals: Totals, ref: Timing, summary: dict[str, Totals]) -> None:
    summary[stage.name] = totals
    print("\n" + totals.line(stage.name, ref))
    for p in totals.problems[:20]:
        print("  partial read as complete:", p)
    for d in totals.differences[:20]:
        print("  differs from the uninterrupted run:", d)
    assert totals.kills >= KILLS
    assert not totals.problems, totals.problems[:20]
    assert not totals.differences, totals.differences[:20]


# -- fixtures: the inputs and the uninterrupted references, stage by stage ----------------------

@pytest.fixture(scope="module")
def summary() -> Any:
    found: dict[str, Totals] = {}
    yield found
    if found:
        print("\nchaos totals: " + ", ".join(
            f"{k}: {t.kills} kills, {t.reruns} reruns, {t.compared} compared, "
            f"{len(t.problems) + len(t.differences)} differences" for k, t in found.items()))
        print(f"chaos overall: kills={sum(t.kills for t in found.values())} "
              f"reruns={sum(t.reruns for t in found.values())} "
              f"outputs_compared={sum(t.compared for t in found.values())} "
              f"differences={sum(len(t.problems) + len(t.differences) for t in found.values())}")


@pytest.fixture(scope="module")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Started first: it imports while the slides are made and the references run."""
    server = ForkServer(tmp_path_factory.mktemp("chaos_forks") / "server.log")
    yield server
    server.close()


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    root = tmp_path_factory.mktemp("chaos_ref")
    slides = root / "slides"
    slides.mkdir()
    for sid in SLIDES:
        shutil.copy(cohort / f"{sid}.svs", slides / f"{sid}.svs")
    shutil.copy(cohort / "labels.csv", slides / "labels.csv")
    return root


def _stages(refs: Path) -> dict[str, Stage]:
    slides = refs / "slides"
    return {
        "extract": Stage("extract", 1, lambda out: [
            "extract", str(slides), "--out", str(out), "--mpp", "2.0", "--patch-size", "64",
            "--format", "raw", "--backend", "openslide", "--workers", "1"],
            _done_extract, _compare_extract),
        # tiny-cnn's random init is seeded: every process builds the same encoder. The
        # default batch (256) holds every pending patch (~50 a slide), so no batch is ever
        # a few patches: on CPU a patch's features differ in their last bits when encoded
        # in a batch of fewer than ~16, and embed's batches run across slides, so with
        # small batches a rerun (other pending slides, other batches) is not bitwise equal
        "embed": Stage("embed", 2, lambda out: [
            "embed", str(refs / "extract"), "--encoder", "tiny-cnn", "--workers", "0",
            "--device", "cpu", "--out", str(out)], _done_embed, _compare_embed),
        "train": Stage("train", 3, lambda out: [
            "train", "--features", str(refs / "embed" / "features" / "tiny-cnn"), "--labels",
            str(slides / "labels.csv"), "--out", str(out), "--folds", "2", "--epochs",
            str(EPOCHS), "--batch-size", "1", "--val-frac", "0", "--checkpoint-every", "1",
            "--bootstrap", "20", "--resume", "auto"], _done_train, _compare_train),
        "infer": Stage("infer", 4, lambda out: [
            "infer", str(slides), "--run", str(refs / "train"), "--out", str(out),
            "--ray-address", "none", "--heatmaps"], _done_infer, _compare_infer),
    }


@pytest.fixture(scope="module")
def timings(refs: Path) -> dict[str, Timing]:
    """Filled stage by stage: each reference reads the one before."""
    return {}


def _ref(name: str, refs: Path, timings: dict[str, Timing]) -> tuple[Stage, Path, Timing]:
    stages = _stages(refs)
    order = list(stages)
    for earlier in order[: order.index(name) + 1]:
        if earlier not in timings:
            timings[earlier] = _reference(stages[earlier], refs)[1]
    return stages[name], refs / name, timings[name]


# -- the tests ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_extract(forks: ForkServer, refs: Path, timings: dict[str, Timing],
                       summary: dict[str, Totals], tmp_path: Path) -> None:
    stage, ref, timing = _ref("extract", refs, timings)
    _report(stage, _chaos(stage, ref, tmp_path, forks), timing, summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_embed(forks: ForkServer, refs: Path, timings: dict[str, Timing],
                     summary: dict[str, Totals], tmp_path: Path) -> None:
    stage, ref, timing = _ref("embed", refs, timings)
    _report(stage, _chaos(stage, ref, tmp_path, forks), timing, summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_train(forks: ForkServer, refs: Path, timings: dict[str, Timing],
                     summary: dict[str, Totals], tmp_path: Path) -> None:
    stage, ref, timing = _ref("train", refs, timings)
    _report(stage, _chaos(stage, ref, tmp_path, forks), timing, summary)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_infer(forks: ForkServer, refs: Path, timings: dict[str, Timing],
                     summary: dict[str, Totals], tmp_path: Path) -> None:
    stage, ref, timing = _ref("infer", refs, timings)
    _report(stage, _chaos(stage, ref, tmp_path, forks), timing, summary)
