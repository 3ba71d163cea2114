"""Plain data that crosses component boundaries: sampling settings, requests, completions.

No torch here: the planner and the pipeline use these without importing an executor.
A `Request` carries token ids only; text exists at the edges (tokenization, output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded, after per-row overrides were applied to the spec defaults."""

    max_tokens: int
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k cut
    seed: int = 0  # seeds this request's own generator, so batch mates never change its draws
    stop: tuple[str, ...] = ()  # output text is cut before the first of these
    stop_token_ids: tuple[int, ...] = ()  # generation ends at these ids (eos is added by executors)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Request:
    """One sample of one prompt to complete: its position in the job and its token ids.

    A row with `n` samples is `n` requests with the same `row_index` and token ids, told
    apart by `sample_index` (and each seeded on its own).
    """

    row_index: int  # 0-based index of the input row across all input files, in read order
    token_ids: tuple[int, ...]
    sampling: SamplingParams
    sample_index: int = 0  # which of the row's n samples, 0..n-1; unique with row_index

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Completion:
    """The result for one request (or an error row that never reached an executor).

    Executors copy `row_index` and `sample_index` from the request: together they name the
    output row.
    """

    row_index: int
    token_ids: tuple[int, ...]  # generated ids; eos / stop ids excluded
    text: str  # decode(token_ids), cut before a matched stop string
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused, not computed
    error: str | None = None  # "code: message" for error rows
    sample_index: int = 0  # the request's sample_index; 0 for error rows (one per input row)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids)


def error_completion(row_index: int, code: str, message: str, num_prompt_tokens: int = 0) -> Completion:
    """An error row: the job goes on, the row is accounted for."""
    return Completion(
        row_index=row_index,
        token_ids=(),
        text="",
        finish_reason="error",
        num_prompt_tokens=num_prompt_tokens,
        error=f"{code}: {message}",
    )


__all__ = ["Completion", "FinishReason", "Request", "SamplingParams", "error_completion"]
