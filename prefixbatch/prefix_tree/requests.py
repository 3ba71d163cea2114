"""Requests → the planner's input arrays: one flat token array, offsets, and max_tokens.

Request i of the list is request i of the plan (its prompt is `tokens[offsets[i]:offsets[i+1]]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefixbatch.types import Request


def prompt_arrays(requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64 [n+1], max_tokens int32 [n]) for `requests`, in order."""
    lengths = np.fromiter((r.num_prompt_tokens for r in requests), np.int64, len(requests))
    offsets = np.zeros(len(requests) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for r in requests for t in r.token_ids), np.int32, int(offsets[-1]))
    max_tokens = np.fromiter((r.sampling.max_tokens for r in requests), np.int32, len(requests))
    return tokens, offsets, max_tokens
