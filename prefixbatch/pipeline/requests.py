"""Per-row sampling settings and the `Request`s handed to executors.

A row's settings are the spec's `sampling` defaults, overridden by any non-null value in an
input column of the same name, validated by the same pydantic model as the spec, so a bad
per-row value gets the same message a bad spec value would, as an error row.

Seeds: a row without its own `seed` gets one derived from the job seed and the row's id,
so its sample depends on neither its batch mates nor the order rows run in. A row with
`n > 1` becomes n requests (`sample_index` 0..n-1) with the same token ids: sample 0 keeps
the row's seed, sample k > 0 gets `row_seed(row's seed, k)`, so the samples differ under
temperature > 0 and a row's sample k is the same in every run.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from typing import Any, Literal

from pydantic import ValidationError

from prefixbatch.pipeline.config import SAMPLING_FIELDS, SamplingSpec
from prefixbatch.pipeline.tokenize import RowError
from prefixbatch.types import Request, SamplingParams


def row_seed(job_seed: int, row_id: Any) -> int:
    """A 63-bit seed from the job seed and the row id, stable across runs and machines."""
    digest = hashlib.blake2b(f"{job_seed}\x00{row_id!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


CONSTRAINTS = frozenset({"json_schema", "regex", "choice"})  # structured output: one per row at most


def row_sampling(defaults: SamplingSpec, overrides: dict[str, Any]) -> SamplingSpec | RowError:
    """The defaults with the row's non-null override values, validated."""
    given = {name: value for name, value in overrides.items() if value is not None}
    if not given:
        return defaults
    merged = defaults.model_dump()
    if CONSTRAINTS.intersection(given):  # a row's own constraint replaces the spec's, whichever kind
        merged.update(dict.fromkeys(CONSTRAINTS))
    try:
        return SamplingSpec.model_validate({**merged, **given})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        return RowError("invalid_sampling", problems)


_PARAMS = tuple(f.name for f in fields(SamplingParams))


def request_params(sampling: SamplingSpec) -> dict[str, Any]:
    """The spec fields a request carries (all but `n`, which makes n requests), by name."""
    return {name: getattr(sampling, name) for name in _PARAMS}


def sample_seed(base_seed: int, sample_index: int) -> int:
    """Sample 0 keeps the row's seed (so n = 1 rows are seeded as before); sample k > 0 gets
    one derived from the row's seed and k."""
    return base_seed if sample_index == 0 else row_seed(base_seed, sample_index)


def make_requests(
    row_index: int,
    row_id: Any,
    token_ids: list[int],
    sampling: SamplingSpec,
    *,
    job_seed: int,
    has_row_seed: bool,
    context_length: int | None,
    truncate: Literal["none", "left", "right"] = "none",
    overflow: Literal["clamp", "error"] = "clamp",
    vocab_size: int | None = None,
) -> list[Request] | RowError:
    """The row's `sampling.n` requests, fitted to the model's context: the prompt truncated
    (`truncate` left / right) until `max_tokens` fits, then `max_tokens` clamped to the room
    left (`overflow` clamp) or the row refused (`overflow` error). A `logit_bias` id past
    `vocab_size` refuses the row too."""
    max_tokens = sampling.max_tokens
    if context_length is not None:
        if truncate != "none" and len(token_ids) + max_tokens > context_length:
            keep = max(context_length - max_tokens, 1)
            token_ids = token_ids[-keep:] if truncate == "left" else token_ids[:keep]
        room = context_length - len(token_ids)
        if room < 1:
            msg = f"the prompt has {len(token_ids)} tokens; the model's context is {context_length}"
            return RowError("prompt_too_long", msg)
        if max_tokens > room and overflow == "error":
            msg = (
                f"the prompt has {len(token_ids)} tokens and max_tokens is {max_tokens}, more than"
                f" the model's context of {context_length} (input.max_tokens_overflow: error)"
            )
            return RowError("max_tokens_over_context", msg)
        max_tokens = min(max_tokens, room)
    outside = [token for token, _ in sampling.logit_bias if vocab_size is not None and token >= vocab_size]
    if outside:
        msg = f"logit_bias names token {outside[0]}, outside the model's vocabulary of {vocab_size} ids (0–{vocab_size - 1})"
        return RowError("invalid_logit_bias", msg)
    seed = sampling.seed if has_row_seed else row_seed(job_seed, row_id)
    # A clamped max_tokens lowers min_tokens with it: the context holds no more.
    min_tokens = min(sampling.min_tokens, max_tokens)
    params = SamplingParams(
        **{**request_params(sampling), "max_tokens": max_tokens, "min_tokens": min_tokens, "seed": seed}
    )
    prompt = tuple(token_ids)
    return [
        Request(row_index, prompt, replace(params, seed=sample_seed(seed, k)), sample_index=k)
        for k in range(sampling.n)
    ]


__all__ = ["SAMPLING_FIELDS", "make_requests", "row_sampling", "row_seed", "sample_seed"]
