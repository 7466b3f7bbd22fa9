"""retain_freed_memory: freed activations stay in the process, so a loop stops faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOOP = """
import resource, sys
if sys.argv[1] == "retain":
    from gigamil.memory import retain_freed_memory
    assert retain_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    a = bytearray(40 * 2**20)  # 40 MB, zero-filled: above glibc's largest mmap threshold
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_a_reallocated_buffer_faults_once_not_every_time() -> None:
    default, retained = _faults("default"), _faults("retain")
    pages = 40 * 2**20 // 4096
    assert default > 10 * pages  # every iteration maps and faults 40 MB afresh
    assert retained < 2 * pages  # the first iteration faults it in; the rest reuse it


RELEASE = """
import numpy as np, psutil
from gigamil.memory import release_freed_memory
big = np.ones(30 * 2**20, np.uint8); del big  # glibc raises its mmap threshold to 30 MB
blocks = [np.ones(2**20, np.uint8) for _ in range(120)]  # now served from the heap
del blocks[:-1]  # the last one keeps the heap's top in use: no automatic trim
rss = psutil.Process().memory_info().rss
print(release_freed_memory(), (rss - psutil.Process().memory_info().rss) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_release_hands_freed_heap_memory_back() -> None:
    """What tissue detection frees on a large slide leaves the process before its patches
    are read (glibc otherwise keeps it in the heap)."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) > 80  # of the ~119 MB freed


PINNED = """
import sys, numpy as np, psutil
from gigamil.memory import mmap_threshold
if sys.argv[1] == "pinned":
    assert mmap_threshold(4 << 20)
big = np.ones(30 * 2**20, np.uint8); del big  # unpinned, glibc's threshold rises to 30 MB
rss = psutil.Process().memory_info().rss
masks = [np.ones(8 * 2**20, np.uint8) for _ in range(6)]  # 48 MB of thumbnail-sized arrays
keep = np.ones(2**20, np.uint8)  # allocated after them: the heap's top stays in use
del masks
print((psutil.Process().memory_info().rss - rss) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_pinned_mmap_threshold_returns_large_arrays_when_freed() -> None:
    """While a slide is planned, its masks go back to the kernel when freed; left to glibc,
    they stay in the heap once a larger block has been freed."""
    def kept(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PINNED, mode], capture_output=True,
                             text=True, check=True)
        return float(out.stdout.split()[-1])
    assert kept("default") > 40
    assert kept("pinned") < 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise only")
def test_dropping_a_files_mapped_pages_lowers_rss_and_keeps_its_bytes(tmp_path) -> None:
    """What the store writer does to LMDB's map of the store it writes."""
    import mmap

    import psutil

    from gigamil.memory import drop_mapped_pages

    path = tmp_path / "store.bin"
    path.write_bytes(bytes(range(256)) * (64 * 4096))  # 64 MB
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
        total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
        before = psutil.Process().memory_info().rss
        assert drop_mapped_pages(str(path.resolve())) >= len(m)
        after = psutil.Process().memory_info().rss
        assert before - after > 48 * 2**20
        assert sum(m[i] for i in range(0, len(m), 4096)) == total  # mapped back on access
