"""The planner's input: a job's prompts as one flat token array plus offsets.

This is an Arrow ListArray's layout: request i is `tokens[offsets[i]:offsets[i+1]]`, with
`tokens` int32 and `offsets` int64 of length n+1 (non-decreasing; `offsets[0]` may be > 0
for a sliced array). Request ids are positions 0..n-1; callers map them to rows.
`max_tokens[i]` is request i's expected decode length.

`check_prompts` validates and normalises (contiguous int32 tokens, int64 offsets and
max_tokens) without copying arrays that are already right: a job's tokens can be GBs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from prefixbatch.errors import PrefixbatchError


class PlanInputError(PrefixbatchError, ValueError):
    """The arrays handed to the planner do not describe a valid set of prompts."""


class Prompts(NamedTuple):
    tokens: np.ndarray  # [num_tokens] int32, contiguous
    offsets: np.ndarray  # [n+1] int64
    max_tokens: np.ndarray  # [n] int64


def check_prompts(tokens, offsets, max_tokens) -> Prompts:
    """Validated, normalised prompt arrays; raises `PlanInputError` naming the bad argument."""
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets)
    max_tokens = np.asarray(max_tokens)
    _require(tokens.ndim == 1 and _is_int(tokens), "tokens", "a 1-D integer array", tokens)
    _require(
        offsets.ndim == 1 and len(offsets) >= 1 and _is_int(offsets),
        "offsets",
        "a 1-D integer array of length n+1 >= 1",
        offsets,
    )
    n = len(offsets) - 1
    _require(
        max_tokens.ndim == 1 and len(max_tokens) == n and _is_int(max_tokens),
        "max_tokens",
        f"a 1-D integer array of length {n} (one per request)",
        max_tokens,
    )
    if tokens.dtype != np.int32:
        if len(tokens) and (
            tokens.min() < np.iinfo(np.int32).min or tokens.max() > np.iinfo(np.int32).max
        ):
            raise PlanInputError(
                f"`tokens` must fit in int32, got values in [{tokens.min()}, {tokens.max()}]"
            )
        tokens = tokens.astype(np.int32)
    tokens = np.ascontiguousarray(tokens)
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] < 0 or offsets[-1] > len(tokens):
        msg = (
            f"`offsets` must lie in [0, {len(tokens)}] (len(tokens)), "
            f"got [{offsets[0]}, {offsets[-1]}]"
        )
        raise PlanInputError(msg)
    if n and (np.diff(offsets) < 0).any():
        bad = int(np.flatnonzero(np.diff(offsets) < 0)[0])
        msg = (
            f"`offsets` must be non-decreasing, "
            f"got offsets[{bad}]={offsets[bad]} > offsets[{bad + 1}]={offsets[bad + 1]}"
        )
        raise PlanInputError(msg)
    max_tokens = max_tokens.astype(np.int64, copy=False)
    if n and max_tokens.min() < 0:
        bad = int(np.argmin(max_tokens))
        raise PlanInputError(f"`max_tokens` must be >= 0, got max_tokens[{bad}]={max_tokens[bad]}")
    return Prompts(tokens, offsets, max_tokens)


def prompts_from_arrow(token_ids) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) of a pyarrow list<int> (Large)ListArray or ChunkedArray.

    Zero-copy for an unchunked array without nulls; a slice keeps its parent's offsets.
    """
    import pyarrow as pa

    if isinstance(token_ids, pa.ChunkedArray):
        token_ids = token_ids.combine_chunks()
    if not (pa.types.is_list(token_ids.type) or pa.types.is_large_list(token_ids.type)):
        raise PlanInputError(f"token ids must be a list<int> array, got type {token_ids.type}")
    if token_ids.null_count:
        raise PlanInputError(f"token ids must have no null lists, got {token_ids.null_count}")
    offsets = token_ids.offsets.to_numpy().astype(np.int64, copy=False)
    tokens = token_ids.values.to_numpy(zero_copy_only=False)
    return tokens, offsets


def _is_int(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.integer) or (a.size == 0 and a.dtype == np.float64)


def _require(ok: bool, name: str, expected: str, got: np.ndarray) -> None:
    if not ok:
        raise PlanInputError(
            f"`{name}` must be {expected}, got shape {got.shape} dtype {got.dtype}"
        )
