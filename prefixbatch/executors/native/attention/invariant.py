"""Batch-invariant numerics: a row's logits depend on its own tokens only, to the last bit.

The default engine's rounding depends on what a token is computed with: the BLAS picks
another kernel for a matmul of 5 rows than of 64, tree attention splits a row's keys into
spans by the shape of the prefix tree and of the step, a prefill chunk attends through
another kernel than a decode token, and a vectorised activation takes a scalar path for the
last few elements of a thread's range. Each is exact arithmetic up to fp32 rounding
(~1e-5), and greedy decoding does not notice; a seeded sample does, about once in ten
thousand tokens, when its uniform number lands within that rounding of a boundary between
two tokens. Then the same request draws another completion when its batch mates differ, or
when a resumed run recomputes its checkpointed tokens by prefill instead of decode.

With `executor.native.batch_invariant`, every operation a token goes through is made
independent of the step around it:
- every matrix product has a row count that is a multiple of `ROW_MULTIPLE` (padding rows
  are computed and dropped): MKL then computes each row with the same kernel and the same
  summation order whatever the row count (checked for 16 to 2,048 rows, 1 to 4 threads);
- attention: each *query group* (the tokens of one run, a prefill chunk or a decode token,
  which see one list of keys: their ancestor segments whole, then their own segment) takes
  its keys in position order, cut into blocks of `KEY_BLOCK` keys aligned to position 0.
  Each block is one fixed-shape product for all the group's queries (its kv heads' query
  heads stacked, rounded up to `ROW_MULTIPLE` rows), masked per row, and a row's blocks are
  merged by a running sum in position order (`cumsum` adds left to right; blocks a row does
  not see add exact zeros). A row's keys, blocks and summation order are the same in a
  prefill chunk and in decode, alone or beside others;
- SiLU is x / (1 + exp(-x)), whose every element is computed alike (`F.silu` takes another
  path for the tail of a vector).
The price: decode tokens read their prefix's keys on their own (no shared-prefix product;
the prefix's KV is still computed and stored once), and products compute padding rows.
Exact on the CPU for a given thread count; CUDA's BLAS picks split-K kernels by shape, so
the setting is refused there (see `executor.config`).

in → out: the step's `AttentionPlan` → query groups; q + the layer's KV → out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prefixbatch.executors.native.attention.plan import AttentionPlan
from prefixbatch.executors.native.kv import KVStore

__all__ = ["KEY_BLOCK", "ROW_MULTIPLE", "Blocks", "InvariantAttention", "attend_blocks", "query_groups", "silu"]

ROW_MULTIPLE = 16  # rows of every matrix product are a multiple of this
KEY_BLOCK = 64  # keys per attention block (a multiple of every SIMD width)
# Most fp32 elements of the keys gathered (or scores computed) at once: a long prompt's
# chunk or many long decode rows are cut into pieces of rows (each row alike either way).
MAX_ELEMENTS = 1 << 24
CHUNK_PIECE_ROWS = 128  # a prefill chunk's rows per piece: each piece skips the blocks it cannot see


def padded(count: int, multiple: int) -> int:
    return -(-count // multiple) * multiple


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU with every element computed alike, wherever it falls in the tensor."""
    return x / (1.0 + torch.exp(-x))


@dataclass(frozen=True)
class QueryGroup:
    """Consecutive rows of the step that see one key list: row i its first `visible[i]` keys.

    The list is the slots of the group's ancestor segments, root first, then of its own."""

    first_row: int
    ancestors: tuple[range, ...]  # slot ranges, root first
    own: range  # slots of its own segment, up to its last row
    visible: np.ndarray  # [n] int64 keys each row sees (its position + 1)

    @property
    def num_rows(self) -> int:
        return len(self.visible)

    @property
    def num_ancestor_keys(self) -> int:
        return sum(len(r) for r in self.ancestors)

    def slots(self, skip: int = 0) -> np.ndarray:
        """[L] int64 the key list's slots from its `skip`-th on, padded with 0 to whole blocks."""
        slots = np.concatenate([np.arange(r.start, r.stop, dtype=np.int64) for r in (*self.ancestors, self.own)])
        slots = slots[skip:]
        return np.pad(slots, (0, padded(max(len(slots), 1), KEY_BLOCK) - len(slots)))


def query_groups(plan: AttentionPlan) -> list[QueryGroup]:
    """One group per run of the plan (its causal span), with its ancestors' keys first.

    Ancestor spans come first in the plan, root first, so a run's ancestors in plan order
    are in position order."""
    ancestors_of: dict[int, list[range]] = {}  # row → its ancestors' slots
    for span in plan.spans:
        if span.causal_offset is None:
            for row in span.rows:
                ancestors_of.setdefault(row, []).append(range(span.key_start, span.key_start + span.num_keys))
    groups = []
    for span in plan.spans:
        if span.causal_offset is None:
            continue
        first = span.rows[0]
        ancestors = tuple(ancestors_of.get(first, ()))
        above = sum(len(r) for r in ancestors)
        visible = above + span.causal_offset + 1 + np.arange(len(span.rows), dtype=np.int64)
        # A row sees exactly the tokens before it, and itself.
        assert visible[0] == plan.positions[first] + 1, (span, visible[0], plan.positions[first])
        groups.append(QueryGroup(first, ancestors, range(span.key_start, span.key_start + span.num_keys), visible))
    return groups


@dataclass(frozen=True)
class Blocks:
    """Per-block attention partials of some rows, each row's blocks in position order.

    max [R, Hkv, nb, G, 1] (a block's top score, 0 where none), sum [R, Hkv, nb, G, 1]
    (Σ exp(score − max)), out [R, Hkv, nb, G, D] (Σ exp(score − max) · v), seen [R, 1, nb, G, 1]
    (the row sees a key of the block). Blocks of one row may come from several calls: a
    block's partials depend on the row's query and the block's keys only."""

    max: torch.Tensor
    sum: torch.Tensor
    out: torch.Tensor
    seen: torch.Tensor

    def then(self, later: Blocks) -> Blocks:
        """These blocks followed by `later`'s, row by row (same rows)."""
        return Blocks(*(torch.cat([a, b], dim=2) for a, b in zip(self.fields(), later.fields(), strict=True)))

    def fields(self) -> tuple[torch.Tensor, ...]:
        return self.max, self.sum, self.out, self.seen

    def rows(self, index: torch.Tensor | slice) -> Blocks:
        return Blocks(*(field[index] for field in self.fields()))

    def merged(self) -> torch.Tensor:
        """The attention output [R, H, D] fp32: blocks merged by a running sum, left to right."""
        top = torch.where(self.seen, self.max, float("-inf")).amax(dim=2, keepdim=True)  # [R, Hkv, 1, G, 1]
        weight = torch.where(self.seen, torch.exp(self.max - top), 0.0)
        # The last entry of a running sum is the total: ≥ 1 for a row with keys (its top
        # block's weight is 1); blocks a row does not see add exact zeros.
        total = torch.cumsum(weight * self.sum, dim=2)[:, :, -1].clamp_min(1.0)  # [R, Hkv, G, 1]
        out = torch.cumsum(weight * self.out, dim=2)[:, :, -1] / total  # [R, Hkv, G, D]
        return out.flatten(1, 2)  # [R, H, D]: query head h = kv head · G + g


def attend_blocks(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, *, scale: float
) -> Blocks:
    """Groups of rows, each group against its own keys, cut into blocks.

    q [Gn, n, H, D]; keys, values [Hkv, Gn, L, D] (kv head first: each block a contiguous
    matrix), L a multiple of KEY_BLOCK; visible [Gn, n] (how many of its group's keys each row
    sees, from the first) → the Gn·n rows' `Blocks`. A row's partials depend on its query and
    the keys it sees, nothing else: not Gn, n, L, or the other rows (every product is a
    [M, D] × [D, B] or [M, B] × [B, D] matrix product with M a multiple of ROW_MULTIPLE)."""
    num_groups, num_rows, num_heads, head_dim = q.shape
    num_kv_heads, width = keys.shape[0], keys.shape[2]
    group, num_blocks = num_heads // num_kv_heads, width // KEY_BLOCK
    rows = num_rows * group  # a kv head's queries: row i's query heads at i·G … i·G + G − 1
    extra = padded(rows, ROW_MULTIPLE) - rows
    # [Hkv, Gn, 1, M, D], M = n·G rounded up
    q_rows = q.float().view(num_groups, num_rows, num_kv_heads, group, head_dim).permute(2, 0, 1, 3, 4)
    q_rows = F.pad(q_rows.reshape(num_kv_heads, num_groups, 1, rows, head_dim), (0, 0, 0, extra))
    block_shape = (num_kv_heads, num_groups, num_blocks, KEY_BLOCK, head_dim)
    k_blocks, v_blocks = keys.float().view(block_shape), values.float().view(block_shape)  # [Hkv, Gn, nb, B, D]
    scores = torch.matmul(q_rows, k_blocks.transpose(-1, -2)) * scale  # [Hkv, Gn, nb, M, B]
    # Key j of block b is visible to query row m when b·B + j < visible of m's row.
    row_visible = F.pad(visible.repeat_interleave(group, dim=1), (0, extra))  # [Gn, M]; padding: none
    key_index = torch.arange(width, device=q.device).view(num_blocks, 1, KEY_BLOCK)
    mask = key_index < row_visible[None, :, None, :, None]  # [1, Gn, nb, M, B]
    scores = scores.masked_fill(~mask, float("-inf"))
    seen = mask.any(dim=-1, keepdim=True)  # [1, Gn, nb, M, 1]
    block_max = torch.where(seen, scores.amax(dim=-1, keepdim=True), 0.0)
    exps = torch.exp(scores - block_max)  # hidden keys: exactly 0
    parts = (block_max, exps.sum(dim=-1, keepdim=True), torch.matmul(exps, v_blocks), seen)

    def per_row(part: torch.Tensor) -> torch.Tensor:  # [h, Gn, nb, M, X] → [Gn·n, h, nb, G, X]
        part = part[:, :, :, :rows].unflatten(3, (num_rows, group)).permute(1, 3, 0, 2, 4, 5)
        return part.flatten(0, 1)

    return Blocks(*(per_row(part) for part in parts))


@dataclass(frozen=True)
class _Decoding:
    """Decode tokens (groups of one row) under the same ancestors: the ancestors' whole
    blocks are computed once for all of them (one product per block, as a prefill chunk
    computes them), the rest of each row's keys gathered on its own."""

    rows: torch.Tensor  # [r] rows of the step
    shared: torch.Tensor | None  # [S] slots of the ancestors' whole blocks (None: none)
    own: torch.Tensor  # [r, Lo] each row's remaining slots, padded to whole blocks
    visible: torch.Tensor  # [r, 1] of its remaining keys


class InvariantAttention:
    """The model's attention callback in batch-invariant mode (see the module docstring).

    Decode tokens are batched by ancestors (`_Decoding`); prefill chunks run one by one
    against their key list, gathered once. Each is cut into pieces of rows of at most
    `MAX_ELEMENTS` gathered keys or scores."""

    def __init__(self, store: KVStore, plan: AttentionPlan, *, scale: float) -> None:
        device = store.keys.device
        self.store = store
        self.num_rows = plan.num_rows
        self.scale = scale
        self.write_slots = torch.tensor(plan.write_slots, dtype=torch.int64, device=device)
        self.positions = torch.tensor(plan.positions, dtype=torch.int64, device=device)
        groups = query_groups(plan)
        self.chunks = [
            (g.first_row, torch.from_numpy(g.slots()).to(device), torch.from_numpy(g.visible).to(device)[None])
            for g in groups
            if g.num_rows > 1
        ]
        self.decoding = [_decoding(gs, n, device) for (n, _), gs in _by_shared_ancestors(groups).items()]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T', H, D], k, v: [T', Hkv, D]; rows past the plan's are the model's padding.
        self.store.write(layer, self.write_slots, k[: self.num_rows], v[: self.num_rows])
        keys, values = self.store.keys[layer], self.store.values[layer]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # padding rows: 0
        attend = _Attend(keys, values, self.scale)
        for d in self.decoding:
            own_width = d.own.shape[1] * keys.shape[1] * keys.shape[2]  # elements gathered per row
            shared_width = 0 if d.shared is None else len(d.shared) * q.shape[1]  # scores per row
            step = max(1, MAX_ELEMENTS // max(own_width, shared_width))
            shared = None if d.shared is None else attend.gather(d.shared[None])
            for piece in _pieces(len(d.rows), step):
                rows = d.rows[piece]
                blocks = attend.blocks(q[rows][:, None], attend.gather(d.own[piece]), d.visible[piece])
                if shared is not None:
                    everything = torch.full_like(d.visible[piece].T, len(d.shared))  # [1, r]
                    blocks = attend.blocks(q[None, rows], shared, everything).then(blocks)
                out[rows] = blocks.merged()
        for first_row, slots, visible in self.chunks:
            keys_, values_ = attend.gather(slots[None])  # one copy of the chunk's keys
            # Pieces of rows, each against the blocks its last row sees (a causal chunk's
            # first rows see few): blocks a row does not see would only add zeros.
            step = min(CHUNK_PIECE_ROWS, max(1, MAX_ELEMENTS // (len(slots) * q.shape[1])))
            for piece, seen in zip(_pieces(visible.shape[1], step), _seen_keys(visible, step), strict=True):
                rows = slice(first_row + piece.start, first_row + piece.stop)
                kv = keys_[:, :, :seen].contiguous(), values_[:, :, :seen].contiguous()
                out[rows] = attend.blocks(q[None, rows], kv, visible[:, piece]).merged()
        return out.to(q.dtype)


@dataclass(frozen=True)
class _Attend:
    """One layer's keys and values: gather slots, run `attend_blocks`."""

    keys: torch.Tensor  # [capacity, Hkv, D]
    values: torch.Tensor
    scale: float

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [G, L] → keys, values [Hkv, G, L, D] (kv head first, as `attend_blocks` takes them)."""
        shape = (*slots.shape, *self.keys.shape[1:])  # [G, L, Hkv, D]
        flat = slots.flatten()
        # A gather of whole slots (fast), then one reordering copy.
        return tuple(t.index_select(0, flat).view(shape).permute(2, 0, 1, 3).contiguous() for t in (self.keys, self.values))

    def blocks(self, q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], visible: torch.Tensor) -> Blocks:
        return attend_blocks(q, *kv, visible, scale=self.scale)


def _seen_keys(visible: torch.Tensor, step: int) -> list[int]:
    """Per piece of `step` rows: the keys its last row sees, rounded up to whole blocks."""
    last = visible[0, step - 1 :: step].tolist() + ([] if visible.shape[1] % step == 0 else [visible[0, -1].item()])
    return [padded(int(n), KEY_BLOCK) for n in last]


def _pieces(count: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _by_shared_ancestors(groups: list[QueryGroup]) -> dict[tuple[int, tuple[range, ...]], list[QueryGroup]]:
    """The decode tokens by (whole-block keys they share, the ancestors those lie in): each
    token's ancestors that another decode token of the step has too, root first, cut to
    whole blocks ((0, ()) for tokens that share nothing)."""
    singles = [g for g in groups if g.num_rows == 1]
    count: dict[range, int] = {}
    for g in singles:
        for r in g.ancestors:
            count[r] = count.get(r, 0) + 1
    by: dict[tuple[int, tuple[range, ...]], list[QueryGroup]] = {}
    for g in singles:
        depth = 0
        while depth < len(g.ancestors) and count[g.ancestors[depth]] > 1:
            depth += 1
        shared = g.ancestors[:depth]
        shared_keys = sum(len(r) for r in shared) // KEY_BLOCK * KEY_BLOCK
        by.setdefault((shared_keys, shared) if shared_keys else (0, ()), []).append(g)
    return by


def _decoding(groups: list[QueryGroup], shared_keys: int, device: torch.device) -> _Decoding:
    shared = None
    if shared_keys:
        shared = torch.from_numpy(groups[0].slots()[:shared_keys]).to(device)
    own = [g.slots(skip=shared_keys) for g in groups]
    width = max(len(slots) for slots in own)
    return _Decoding(
        rows=torch.tensor([g.first_row for g in groups], dtype=torch.int64, device=device),
        shared=shared,
        own=torch.from_numpy(np.stack([np.pad(s, (0, width - len(s))) for s in own])).to(device),
        visible=torch.tensor([[g.visible[0] - shared_keys] for g in groups], dtype=torch.int64, device=device),
    )
