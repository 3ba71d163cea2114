"""Per-row stopping inside one `generate` call: each row ends at its own limit, ids and strings.

`generate` runs a batch to its largest `max_tokens`; `RowStopper`, a stopping criterion
returning one bool per row, ends each row at the first of:
- a stop id (the row's `stop_token_ids` plus the model's eos ids): finish "stop", the id is
  not kept;
- a stop string in the decoded generated text: finish "stop", the tokens up to and including
  the one that completed it are kept, the text is cut before it (`cut_at_stop`);
- `max_tokens` generated tokens: finish "length".
It records how each row ended (`RowFinish`) the step it ends, so the pad tokens `generate`
appends to finished rows are never read as output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from prefixbatch.types import FinishReason, SamplingParams

__all__ = ["RowFinish", "RowStopper", "StopRule", "cut_at_stop", "row_finish"]


@dataclass(frozen=True)
class StopRule:
    """When one row ends."""

    max_tokens: int
    stop_token_ids: frozenset[int]  # the request's stop ids and the model's eos ids
    stop: tuple[str, ...]  # stop strings, matched on the decoded generated text

    @classmethod
    def of(cls, params: SamplingParams, eos_token_ids: Sequence[int]) -> StopRule:
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos_token_ids)
        # An empty stop string would match before any text; it means nothing, so it is dropped.
        return cls(params.max_tokens, stop_ids, tuple(s for s in params.stop if s))


@dataclass(frozen=True)
class RowFinish:
    """How one row ended."""

    num_tokens: int  # generated tokens kept as output (a final stop id is not kept)
    reason: FinishReason


class RowStopper(StoppingCriteria):
    """Ends each row of a left-padded batch by its own `StopRule`; `finishes` records how."""

    def __init__(
        self, rules: Sequence[StopRule], prompt_len: int, decode: Callable[[list[int]], str]
    ) -> None:
        self.rules = list(rules)
        self.prompt_len = prompt_len  # padded prompt length: generated ids start here
        self.decode = decode
        self.finishes: list[RowFinish | None] = [None] * len(rules)

    def __call__(
        self, input_ids: torch.LongTensor, scores: object, **kwargs: object
    ) -> torch.BoolTensor:
        # input_ids: [B, prompt_len + num_generated]
        num_generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        open_rows = [row for row, finish in enumerate(self.finishes) if finish is None]
        needs_text = any(self.rules[row].stop for row in open_rows)
        generated = input_ids[:, self.prompt_len :].tolist() if needs_text else None
        for row in open_rows:
            rule = self.rules[row]
            text = self.decode(generated[row]) if rule.stop else ""
            self.finishes[row] = row_finish(rule, num_generated, last[row], text)
        done = [finish is not None for finish in self.finishes]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def row_finish(rule: StopRule, num_generated: int, last_token: int, text: str) -> RowFinish | None:
    """How a row ends after `num_generated` tokens, the last being `last_token`; None: not yet."""
    if last_token in rule.stop_token_ids:
        return RowFinish(num_generated - 1, "stop")
    if any(stop in text for stop in rule.stop):
        return RowFinish(num_generated, "stop")
    if num_generated >= rule.max_tokens:
        return RowFinish(num_generated, "length")
    return None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    positions = [index for index in (text.find(s) for s in stop) if index >= 0]
    return text[: min(positions)] if positions else text
