"""Freed host memory stays in the process: repeated step-sized allocations take no new page faults."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from prefixbatch.executors.memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_repeated_large_allocations_reuse_memory():
    assert keep_freed_memory() is True  # glibc here
    for _ in range(3):  # the heap grows once
        torch.ones(2 << 20)  # 8 MiB, an activation-sized block
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.ones(2 << 20)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 20 * 2048 // 10  # without the tuning every block faults in its 2,048 pages
