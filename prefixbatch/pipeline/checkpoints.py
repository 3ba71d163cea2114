"""Checkpoints of generations in flight: a kill loses at most `output.checkpoint_seconds`.

A run (or each Dask shard attempt) writes, every `checkpoint_seconds` and when it stops
gracefully, one file `_checkpoints/<attempt>-<n>.json` holding, for every sample under way
whose row is not committed, the tokens generated so far. It is written whole or not at all
(the commit protocol's atomic write), and only then is that writer's previous file removed,
so a kill at any moment leaves a whole checkpoint; other writers' files stay (several shards
write side by side) until `_SUCCESS` removes the folder. A resumed run reads them all and keeps,
per (row, sample), the longest generation: generation is deterministic (greedy, or each
sample's own seeded generator), so a shorter one is a prefix of a longer one. It continues
each from there (`Request.num_generated`): the tokens are prefilled like the prompt, the
sampler is advanced past the draws they took, and stop strings and `max_tokens` count them.

Checkpoints never become output rows; `_SUCCESS` removes them. Rows committed meanwhile are
dropped from the next checkpoint, and ignored if an older one still names them.

in: (row, sample) → tokens → files; out: the same mapping, merged.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from prefixbatch.periodic import Periodic
from prefixbatch.pipeline.commits import CHECKPOINTS, OutputFolder
from prefixbatch.types import Request

Partials = dict[tuple[int, int], tuple[int, ...]]


class Checkpoints:
    """This run's checkpoint files in an output folder."""

    def __init__(self, output: OutputFolder) -> None:
        self.output = output
        self._num_written = 0

    def load(self) -> Partials:
        """Every generation the folder's checkpoints hold, the longest per (row, sample)."""
        partials: Partials = {}
        for name in self.output.list_files(CHECKPOINTS):
            if not _is_checkpoint(name):
                continue  # a temporary of a write that died
            try:
                entries = json.loads(self.output.read_file(name))["partials"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # cannot happen with atomic writes; never trust it if it does
            for row, sample, tokens in entries:
                if len(tokens) > len(partials.get((row, sample), ())):
                    partials[row, sample] = tuple(tokens)
        return partials

    def write(self, partials: Mapping[tuple[int, int], tuple[int, ...]]) -> None:
        """One new checkpoint of `partials`, then this writer's previous one removed."""
        name = f"{CHECKPOINTS}/{self.output.attempt}-{self._num_written:06d}.json"
        entries = [[row, sample, list(tokens)] for (row, sample), tokens in sorted(partials.items())]
        self.output.write_file(name, json.dumps({"partials": entries}, separators=(",", ":")).encode())
        if self._num_written:
            self.output.remove_file(f"{CHECKPOINTS}/{self.output.attempt}-{self._num_written - 1:06d}.json")
        self._num_written += 1


class Checkpointer(Periodic):
    """Every `every_s` (None: never) from a thread, and on `save()`: one checkpoint of what
    `in_flight()` returns, merged with `known` (an earlier run's that have not run again
    yet), less the rows `done_rows()` names (committed since)."""

    def __init__(
        self,
        in_flight: Callable[[], Partials],
        checkpoints: Checkpoints,
        every_s: float | None,
        *,
        known: Partials | None = None,
        done_rows: Callable[[], set[int]] = set,
    ) -> None:
        super().__init__(every_s, self.save, name="prefixbatch-checkpoint")
        self.in_flight, self.checkpoints, self.done_rows = in_flight, checkpoints, done_rows
        self.known = dict(known or {})
        self._lock = threading.Lock()

    def save(self) -> None:
        if self.every_s is None:
            return
        with self._lock:
            done = self.done_rows()
            merged = merge(self.known, self.in_flight())
            self.known = {key: tokens for key, tokens in merged.items() if key[0] not in done}
            self.checkpoints.write(self.known)


def continue_from(requests: Sequence[Request], partials: Partials) -> tuple[list[Request], Partials]:
    """The requests, each with its checkpointed tokens (if any) carried on as generated
    ones; the partial generations so used. A generation as long as its `max_tokens` is not
    used (the row had finished but was not committed: it runs again)."""
    out, used = [], {}
    for request in requests:
        tokens = partials.get((request.row_index, request.sample_index), ())
        if 0 < len(tokens) < request.sampling.max_tokens:
            request = replace(request, token_ids=request.token_ids + tokens, num_generated=len(tokens))
            used[request.row_index, request.sample_index] = tokens
        out.append(request)
    return out, used


def merge(older: Partials, newer: Partials) -> Partials:
    """Per (row, sample) the longer generation of the two."""
    merged = dict(older)
    for key, tokens in newer.items():
        if len(tokens) >= len(merged.get(key, ())):
            merged[key] = tokens
    return merged


def _is_checkpoint(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".json") and not base.startswith("_")


__all__ = ["Checkpointer", "Checkpoints", "Partials", "continue_from", "merge"]
