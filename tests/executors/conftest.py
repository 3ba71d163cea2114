"""Fixtures for executor tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny matmuls gain nothing from a second thread, and on a busy 2-core machine OpenMP's
    spinning threads make each step up to 40x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
