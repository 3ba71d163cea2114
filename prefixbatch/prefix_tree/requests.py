"""Requests → the planner's input arrays: one flat token array, offsets, and max_tokens.

A request resumed mid-generation plans its prompt plus the tokens already generated, and
only the tokens still to generate (`max_new_tokens`).

Request i of the list is request i of the plan (its prompt is `tokens[offsets[i]:offsets[i+1]]`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefixbatch.types import Request


def prompt_arrays(requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64 [n+1], max_tokens int32 [n]) for `requests`, in order."""
    lengths = np.fromiter((len(r.token_ids) for r in requests), np.int64, len(requests))
    offsets = np.zeros(len(requests) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for r in requests for t in r.token_ids), np.int32, int(offsets[-1]))
    max_tokens = np.fromiter((r.max_new_tokens for r in requests), np.int32, len(requests))
    return tokens, offsets, max_tokens
