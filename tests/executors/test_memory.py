"""Freed host memory stays in the process: repeated step-sized allocations take no new page faults.

Measured in fresh processes (a test process's heap depends on every test before it), with
and without `keep_freed_memory`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

ALLOCATE = """
import resource, sys, torch
from prefixbatch.executors.memory import keep_freed_memory
tuned = sys.argv[1] == "tuned" and keep_freed_memory()

def step():  # like an engine step: many activation-sized blocks alive at once, then freed
    blocks = [torch.ones(256 << 10) for _ in range(64)]  # 64 blocks of 1 MiB
    del blocks

for _ in range(2):  # the heap grows to its size
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATE, mode], capture_output=True, text=True, check=True).stdout
    tuned, count = out.split()
    return tuned == "1", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_repeated_steps_reuse_memory():
    tuned, count = faults("tuned")
    assert tuned  # glibc here: the tuning took effect
    # 10 steps of 64 MiB (16,384 pages each) take almost no fresh pages. Without the tuning
    # glibc usually hands the freed heap top back after every step (~160,000 faults here),
    # though not always (where the heap lies decides), so only the tuned run is asserted.
    assert count < 10 * 16384 // 20, count
