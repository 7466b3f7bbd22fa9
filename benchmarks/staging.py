"""Slide staging (``--stage-dir``): extraction from a slow shared filesystem, with and without
copying the next slides to local disk ahead of the reader.

    .venv/bin/python benchmarks/staging.py [--slides 4] [--size 12288x9728]
                                           [--latency-ms 20] [--bandwidth-mb 400]

The slow filesystem is real: a FUSE passthrough (``mfusepy`` over libfuse3, served by a
child process of this script) mounted read-only over the folder of synthetic slides,
that answers every read request after ``--latency-ms`` (requests in flight overlap, like
RPCs to a Lustre OST) and moves its bytes through one shared link of ``--bandwidth-mb``
MB/s. The kernel's page cache and readahead work as on any network filesystem client
(the page cache is dropped at each open, as NFS's close-to-open does); ``--readahead-kb``
sets the mount's readahead (the default, 128 KiB, makes nearly every tile read its own
round trip; a large one, like Lustre's, streams a slide that is read in file order).
Needs /dev/fuse, libfuse3 (``apt-get install fuse3``) and ``pip install mfusepy``;
gigamil itself does not use it.

The slides are extracted with ``extract_slides(slides, out, ExtractConfig(…), workers=1)``
(one pool for all of them, as ``gigamil extract`` runs):

- (a) local: the slides on local disk;
- (b) slow: the same slides through the slow mount;
- (c) staged: through the slow mount, with ``--stage-dir`` (:class:`~gigamil.cluster.staging.SlideStager`)
  copying the next slides to a local stage dir while the current one is extracted.

The three runs are interleaved ``--repeat`` times (the machine is shared) and the best of
each is kept. It prints the times, the read requests the mount served, and the ratios
(c)/(a), which approaches 1 as the cohort grows (only the first
copy is not hidden), and (b)/(a).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

STATS = ".stats"  # a virtual file at the mount's root: the server's counters, as JSON


# -- the slow filesystem (runs in a child process: python staging.py --serve …) -------------

def serve(root: str, mountpoint: str, latency_s: float, bandwidth: float) -> None:
    import mfusepy  # type: ignore[import-not-found, unused-ignore]

    class Throttled(mfusepy.Operations):  # type: ignore[misc, unused-ignore]
        """Read-only passthrough of ``root``: latency per request, one shared link."""

        use_ns = True

        def __init__(self) -> None:
            self.link = threading.Lock()
            self.count = threading.Lock()
            self.stats = {"reads": 0, "bytes": 0, "opens": 0}

        def _path(self, path: str) -> str:
            return os.path.join(root, path.lstrip("/"))

        def _stats(self) -> bytes:
            return json.dumps(self.stats).encode().ljust(4096)

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            if path == "/" + STATS:
                return {"st_mode": 0o100444, "st_size": 4096, "st_nlink": 1}
            try:
                st = os.lstat(self._path(path))
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None
            keys = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_atime_ns",
                    "st_mtime_ns", "st_ctime_ns")
            attrs = {k.removesuffix("_ns"): getattr(st, k) for k in keys}
            return attrs

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._path(path))]

        def open(self, path: str, flags: int) -> int:
            if path == "/" + STATS:
                return 0
            time.sleep(latency_s)  # a metadata round trip
            with self.count:
                self.stats["opens"] += 1
            return os.open(self._path(path), os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            if path == "/" + STATS:
                return self._stats()[offset:offset + size]
            time.sleep(latency_s)  # the request's round trip: overlaps with others
            data = os.pread(fh, size, offset)
            with self.link:  # the bytes share one link
                time.sleep(len(data) / bandwidth)
            with self.count:
                self.stats["reads"] += 1
                self.stats["bytes"] += len(data)
            return data

        def release(self, path: str, fh: int) -> int:
            if path != "/" + STATS:
                os.close(fh)
            return 0

    mfusepy.FUSE(Throttled(), mountpoint, foreground=True, ro=True, fsname="gigamil-slow")


class SlowMount:
    """Mount :func:`serve` over ``root`` at ``mountpoint`` (a child process) while in use."""

    def __init__(self, root: Path, mountpoint: Path, latency_s: float, bandwidth: float,
                 readahead_kb: int) -> None:
        self.root, self.mountpoint, self.readahead_kb = root, mountpoint, readahead_kb
        self.args = [sys.executable, __file__, "--serve", str(root), str(mountpoint),
                     str(latency_s), str(bandwidth)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SlowMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.__exit__()
                raise RuntimeError(f"the FUSE mount did not come up: {err.strip()[-500:]}")
            time.sleep(0.05)
        if self.readahead_kb:
            self._readahead()
        return self

    def _readahead(self) -> None:
        """Give the mount a network-filesystem client's readahead (Lustre's default is up
        to 64 MiB per file; the FUSE default of 128 KiB would make a sequential copy pay
        one round trip per 128 KiB)."""
        dev = os.stat(self.mountpoint).st_dev
        knob = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        try:
            knob.write_text(str(self.readahead_kb))
        except OSError as exc:
            print(f"    (cannot set {knob}: {exc.strerror}; the mount keeps "
                  f"{knob.read_text().strip() if knob.exists() else '?'} KiB readahead)")

    def stats(self) -> dict[str, int]:
        with open(self.mountpoint / STATS, "rb") as fh:
            return dict(json.loads(fh.read().decode().strip()))

    def __exit__(self, *exc: object) -> None:
        if os.path.ismount(self.mountpoint):
            for cmd in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"]):
                if shutil.which(cmd[0]) and subprocess.run(
                        [*cmd, str(self.mountpoint)], capture_output=True).returncode == 0:
                    break
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fuse_unavailable() -> str | None:
    """Why a FUSE mount cannot be made here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (a container without FUSE)"
    try:
        import mfusepy  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as exc:
        return f"mfusepy cannot be imported ({exc}): pip install mfusepy; apt-get install fuse3"
    return None


# -- the benchmark ----------------------------------------------------------------------------

def extract_staged(paths: list[Path], out: Path, stage: Path | None) -> tuple[float, int]:
    """``gigamil extract [--stage-dir STAGE]`` over all the slides: (seconds, patches)."""
    from gigamil.cluster.extract_cohort import extract_slides
    from gigamil.wsi.extract_config import ExtractConfig

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cfg = ExtractConfig(stage_dir=None if stage is None else str(stage))
    results = extract_slides(paths, out, cfg, workers=1, overwrite=True)
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise RuntimeError(f"{bad[0].slide_id}: {bad[0].status} {bad[0].error}")
    return time.perf_counter() - t0, sum(r.n_patches for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", default="12288x9728", help="level-0 WxH of each synthetic slide")
    ap.add_argument("--latency-ms", type=float, default=20.0,
                    help="round trip of one read request on the slow mount")
    ap.add_argument("--bandwidth-mb", type=float, default=400.0,
                    help="MB/s of the slow mount's link, shared by all requests")
    ap.add_argument("--readahead-kb", type=int, default=0,
                    help="set the mount's readahead (0: the kernel's default, 128 KiB)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs")
    ap.add_argument("--ahead", type=int, default=2)
    ap.add_argument("--work", default=None, help="keep slides here between runs")
    ap.add_argument("--serve", nargs=4, metavar=("ROOT", "MNT", "LATENCY_S", "BYTES_PER_S"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], float(args.serve[2]), float(args.serve[3]))
        return
    why = fuse_unavailable()
    if why is not None:
        sys.exit(f"no slow filesystem can be made here: {why}")

    from gigamil.synth.slides import make_cohort

    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(args.work or Path(tempfile.gettempdir()) / "gigamil-bench-staging")
    cohort = work / f"cohort-{args.slides}-{width}x{height}"
    t = time.perf_counter()
    paths = make_cohort(cohort, n=args.slides, width=width, height=height, mpp=0.25, seed=3,
                        workers=2)
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{args.slides} synthetic slides {width}x{height} ({size_mb / args.slides:.0f} MB "
          f"each), ready in {time.perf_counter() - t:.0f} s", flush=True)
    mnt = work / "slow"
    stage = work / "stage"
    latency, bandwidth = args.latency_ms / 1e3, args.bandwidth_mb * 1e6

    ra = f"{args.readahead_kb} KiB" if args.readahead_kb else "the kernel's default"
    print(f"slow mount: {args.latency_ms:g} ms per read request, {args.bandwidth_mb:g} MB/s "
          f"shared, {ra} readahead; stage ahead {args.ahead}; best of {args.repeat}",
          flush=True)
    best: dict[str, float] = {}
    counts: dict[str, set[int]] = {}
    with tempfile.TemporaryDirectory(dir=work) as tmp, \
            SlowMount(cohort, mnt, latency, bandwidth, args.readahead_kb) as slow:
        out = Path(tmp)
        slow_paths = [mnt / p.name for p in paths]
        extract_staged(paths[:1], out / "warm", None)  # imports, page cache of the local files

        def record(mode: str, seconds: float, patches: int, what: str) -> None:
            best[mode] = min(best.get(mode, float("inf")), seconds)
            counts.setdefault("patches", set()).add(patches)
            print(f"  {mode} {seconds:6.2f} s  {patches} patches  {what}", flush=True)

        for _ in range(args.repeat):  # the modes interleaved: the machine is shared
            t, n = extract_staged(paths, out / "a", None)
            record("(a) local disk:        ", t, n, "")
            s0 = slow.stats()
            t, n = extract_staged(slow_paths, out / "b", None)
            s1 = slow.stats()
            record("(b) slow mount:        ", t, n,
                   f"{s1['reads'] - s0['reads']} read requests, "
                   f"{(s1['bytes'] - s0['bytes']) / 1e6:.0f} MB")
            t, n = extract_staged(slow_paths, out / "c", stage)
            s2 = slow.stats()
            record("(c) slow mount, staged:", t, n,
                   f"{s2['reads'] - s1['reads']} read requests, "
                   f"{(s2['bytes'] - s1['bytes']) / 1e6:.0f} MB (extract --stage-dir)")
    if len(counts["patches"]) != 1:
        sys.exit(f"the runs stored different patch counts: {sorted(counts['patches'])}")
    t_a, t_b, t_c = (v for _k, v in sorted(best.items()))
    print(f"ratio (c)/(a) staged / local:   {t_c / t_a:5.2f}")
    print(f"ratio (b)/(a) slow   / local:   {t_b / t_a:5.2f}")

if __name__ == "__main__":
    main()
