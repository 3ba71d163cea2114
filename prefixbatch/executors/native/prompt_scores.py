"""Prompt logprobs in the native engine: each node's prompt tokens scored once, for every row under it.

A prompt token's logprob comes from the logits of the token before it. Inside a tree node,
those are the node's own rows, the same for every request through the node: the scheduler
computes them once (`ScoredRows`, from the first offset any request needs) and this keeps,
per node and offset, the next token's logprob and the top alternatives. The node's last row
predicts the first token of whichever child a request continues into, so its log-softmax
row is kept whole and read per child. A request's records are assembled from the nodes on
its path when it completes (its nodes are alive until then) and dropped with each node.

Used for `sampling.prompt_logprobs` (positions 1..P-1) and for scoring (the continuation's
positions), `Request.logprobs_from`.

in → out: the plan + requests → per node the first offset needing logits; each step's scored
logits → records; a request → its records, position by position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from prefixbatch.executors.sampling import RawLogprob, records_k, token_logprobs
from prefixbatch.packing import ScoredRows
from prefixbatch.prefix_tree import ROOT, Plan
from prefixbatch.types import Request

__all__ = ["PromptScores"]


class PromptScores:
    """Which node rows need logits, and the records they gave, for one plan's run."""

    def __init__(self, plan: Plan, requests: Sequence[Request], tokens: np.ndarray) -> None:
        self.plan, self.tokens = plan, tokens
        self._parent = plan.node_parent.tolist()
        self._depth = plan.node_depth.tolist()
        self._size = plan.node_num_tokens.tolist()
        self.logits_from: list[int | None] = [None] * plan.num_nodes
        self._k = [0] * plan.num_nodes  # alternatives each node's records keep
        for request_id, request in enumerate(requests):
            start = request.logprobs_from
            if start is None:
                continue
            first = start - 1  # the logits at position p give token p + 1's logprob
            for node in self._path(int(plan.request_node[request_id])):
                if first >= self._depth[node] + self._size[node]:
                    continue  # the node ends before the first position needed
                offset = max(first - self._depth[node], 0)
                known = self.logits_from[node]
                self.logits_from[node] = offset if known is None else min(known, offset)
                self._k[node] = max(self._k[node], records_k(request))
        self._records: dict[int, dict[int, RawLogprob]] = {}  # node → offset → record
        self._last: dict[int, tuple[torch.Tensor, tuple[tuple[int, float], ...]]] = {}  # node → (logp [V], top)

    def _path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node`."""
        path = []
        while node != ROOT:
            path.append(node)
            node = self._parent[node]
        return path[::-1]

    def record(self, scored: Sequence[ScoredRows], logits: torch.Tensor) -> None:
        """Keeps the records of a step's scored rows; logits: [rows of `scored`, V], in order."""
        row = 0
        for rows in scored:
            node, size, k = rows.node_id, self._size[rows.node_id], self._k[rows.node_id]
            part = logits[row : row + rows.num_tokens]
            row += rows.num_tokens
            inner = min(rows.num_tokens, size - 1 - rows.offset)  # rows whose next token is in the node
            if inner > 0:
                start = int(self.plan.node_token_start[node]) + rows.offset + 1
                found = token_logprobs(part[:inner], self.tokens[start : start + inner].tolist(), [k] * inner)
                self._records.setdefault(node, {}).update(zip(range(rows.offset, rows.offset + inner), found))
            if inner < rows.num_tokens:  # the node's last row: kept whole for its children
                logp = torch.log_softmax(part[-1].float(), dim=-1)
                values, ids = torch.topk(logp, k)
                self._last[node] = (logp, tuple(zip(ids.tolist(), values.tolist(), strict=True)))

    def records(self, request_id: int, request: Request) -> list[RawLogprob]:
        """Plan request `request_id`'s records from `logprobs_from` to its last prompt token."""
        prompt = request.token_ids[: request.num_prompt_tokens]
        found: list[RawLogprob] = []
        for node in self._path(int(self.plan.request_node[request_id])):
            depth, size = self._depth[node], self._size[node]
            for offset in range(max(request.logprobs_from - 1 - depth, 0), size):
                position = depth + offset
                if position + 1 >= len(prompt):
                    break
                if offset < size - 1:
                    found.append(self._records[node][offset])
                else:
                    logp, top = self._last[node]
                    token = prompt[position + 1]
                    found.append((token, float(logp[token]), top))
        return found

    def free(self, node: int) -> None:
        """Drops a freed node's records."""
        self._records.pop(node, None)
        self._last.pop(node, None)
