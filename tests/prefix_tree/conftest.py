"""A small prompt set used by the exact tests; its tree is drawn in test_tree.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.prefix_tree.naive import flat

# Request:        0           1           2 (= 1)     3 (prefix)  4 (alone)  5 (extends 0)
EXAMPLE = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 5], [1, 2], [7, 8], [1, 2, 3, 4, 9]]
EXAMPLE_MAX_TOKENS = np.array([3, 3, 3, 100, 2, 2])


@pytest.fixture
def example() -> tuple[np.ndarray, np.ndarray]:
    return flat(EXAMPLE)
