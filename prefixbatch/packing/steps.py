"""What the step scheduler hands the model runner: plain, frozen descriptions of ids and counts.

Two kinds of work come out of `StepScheduler`, each answered by `report(finished)`:
- an `Admission`: a group's segments were reserved; members whose prompt's node already
  has logits draw their first token now (`starts`);
- a `Step`: one forward pass over a flat, unpadded batch of rows — decode rows first
  (`decode_rows`, rows 0..D-1), then prefill chunks (`prefill_chunks`, rows D..) — and the
  sequences that start from this step's node logits afterwards.

Ids: a tree node is its own segment id; request r's own segment is `num_nodes + r`.

in → out: the scheduler's decisions → the runner (tensors, sampling), with no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Admission", "DecodeRow", "PrefillChunk", "ScoredRows", "Segment", "Start", "Step"]


@dataclass(frozen=True, slots=True)
class Start:
    """A sequence drawing its first token from its prompt node's last-token logits."""

    request_id: int  # whose sampler draws (its own seeded generator)
    node_id: int  # the node its prompt ends at: the runner keeps that node's logits row


@dataclass(frozen=True, slots=True)
class DecodeRow:
    """A running sequence's newest token, fed back to get the next one's logits."""

    request_id: int  # the runner knows the token (it sampled it) and whose sampler draws next
    segment_id: int  # the sequence's own segment: the fed token's KV is written there
    offset: int  # the fed token's offset in that segment (tokens generated so far - 1)


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """Consecutive prompt tokens of one tree node, at consecutive rows of the batch."""

    node_id: int  # the node being prefilled (also its segment id)
    first_row: int  # row of the chunk's first token in the flat batch
    offset: int  # the first token's offset in the node: a long node resumes where it stopped
    num_tokens: int  # what fits of the node in the step's token budget
    token_start: int  # where the chunk's tokens are in the plan's token array


@dataclass(frozen=True, slots=True)
class ScoredRows:
    """Prompt tokens of one node whose logits are computed for prompt logprobs or scoring."""

    node_id: int
    offset: int  # the first row's token offset in the node
    num_tokens: int  # consecutive tokens (rows) from there


@dataclass(frozen=True, slots=True)
class Segment:
    """A live segment of the KV tree, as attention reads it in this step."""

    segment_id: int  # a node id, or num_nodes + request id
    parent_id: int | None  # the segment above it; None under the root (nothing to attend above)
    key_start: int  # its first slot in the store, the same in every layer
    num_keys: int  # tokens whose KV is stored once this step's rows are written


@dataclass(frozen=True)
class Admission:
    """A group admitted: its new nodes and its members' own segments hold slots from now on."""

    group_id: int  # the plan's group, admitted in the plan's order
    request_ids: tuple[int, ...]  # its members, in execution order: the runner makes their state
    starts: tuple[Start, ...]  # members whose prompt's node already has logits: first token now


@dataclass(frozen=True)
class Step:
    """One forward pass: rows, the attention tree they read, and what follows it."""

    admitted_group_ids: tuple[int, ...]  # groups admitted since the previous step, in order
    freed_segment_ids: tuple[int, ...]  # freed since the previous step: drop what they kept
    decode_rows: tuple[DecodeRow, ...]  # rows 0..D-1, every running sequence, in a stable order
    prefill_chunks: tuple[PrefillChunk, ...]  # rows D.., parents before children
    num_rows: int  # tokens in the flat batch: decodes + chunk tokens (decodes may pass the budget)
    # Rows whose logits are computed: 0..D-1, then each node's last (`logits_nodes`), then
    # the rows of `scored` in order.
    logits_rows: tuple[int, ...]
    logits_nodes: tuple[int, ...]  # node of each node-last logits row (kept for starts)
    starts: tuple[Start, ...]  # after this step's decode rows drew, these draw a first token
    segments: tuple[Segment, ...]  # every live segment: the tree attention reads, keys counted
    scored: tuple[ScoredRows, ...] = ()  # prompt rows whose logits give prompt logprobs

    @property
    def num_decode_rows(self) -> int:
        return len(self.decode_rows)
