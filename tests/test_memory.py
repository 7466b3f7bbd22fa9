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
