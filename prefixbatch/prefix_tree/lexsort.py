"""Sort a job's prompts lexicographically by token id and find each neighbour pair's LCP.

In: the flat prompt layout (`tokens` int32, `offsets` int64 of length n+1).
Out: `order` (request ids in lexicographic order, a prompt before every prompt it is a proper
prefix of) and `lcp` (length n+1: `lcp[i]` is the longest common prefix, in tokens, of
requests `order[i-1]` and `order[i]`; `lcp[0] = lcp[n] = -1` are sentinels). The radix tree
is read off these two arrays (`tree.py`).

Algorithm: most-significant-first refinement against a representative, `window` tokens at a
time, vectorised over every unfinished group at once. A group is a run of positions in
`order` whose prompts share their first `depth` tokens. Each round compares every member's
next `window` tokens with the group's first member (its representative) and finds `agree`,
the number of tokens it shares with the representative (capped by both lengths and the
window). Then:

- if every member agrees on the whole window, the group only moves `depth` on (the common
  case: a long shared system prompt costs one compare per token and no sort);
- otherwise the members are sorted by (side of the representative, where they diverge, the
  token they diverge with). Members below the representative come first, those diverging
  earliest first; members above it come last, those diverging latest first. That is exactly
  lexicographic order, with "prompt ended" as the smallest token. Each run of equal keys
  shares `depth + agree + 1` tokens and becomes a new group.

The LCP of two neighbours separated in a round is `depth + min(agree_left, agree_right)`;
positions never move again once separated, so that value is final. Everything is exact:
tokens are compared, never hashed. Each shared token is compared about once per member
(plus at most one window per divergence), so the cost is close to one pass over the
shared part of the job.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

DEFAULT_WINDOW = 64
_CHUNK_ROWS = (
    2048  # rows per compare chunk: small blocks stay in L1/L2 (measured ~2x faster than 32k)
)


@dataclass(frozen=True, eq=False)
class LexOrder:
    """Request ids in lexicographic order and the LCP of each neighbour pair."""

    order: np.ndarray  # [n] int64, request ids
    lcp: np.ndarray  # [n+1] int64, lcp[i] = LCP(order[i-1], order[i]); -1 at both ends


@dataclass(frozen=True, eq=False)
class _Groups:
    """Unfinished groups: position ranges [lo, hi) of `order` sharing `depth` tokens."""

    lo: np.ndarray
    hi: np.ndarray
    depth: np.ndarray


def sort_prompts(
    tokens: np.ndarray, offsets: np.ndarray, *, window: int = DEFAULT_WINDOW
) -> LexOrder:
    """Lexicographic order of the prompts and their neighbour LCPs (see the module docstring)."""
    n = len(offsets) - 1
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    order = np.arange(n, dtype=np.int64)
    lcp = np.full(n + 1, -1, dtype=np.int64)
    reader = _WindowReader(tokens, window)
    groups = _Groups(np.zeros(1, np.int64), np.full(1, n, np.int64), np.zeros(1, np.int64))
    groups = _keep_unfinished(groups)
    while len(groups.lo):
        groups = _refine(groups, order, lcp, starts, lengths, reader)
    return LexOrder(order=order, lcp=lcp)


@dataclass(frozen=True, eq=False)
class _Members:
    """One round's members of the unfinished groups, one entry per member."""

    pos: np.ndarray  # position in `order`
    group_of: np.ndarray  # index of the member's group in this round
    request: np.ndarray  # request id
    depth: np.ndarray  # tokens the group is known to share
    left_m: np.ndarray  # member tokens after `depth`
    left_r: np.ndarray  # representative tokens after `depth`
    agree: np.ndarray  # tokens after `depth` equal to the representative's, capped
    tok_m: np.ndarray  # member's token at `depth + agree` (valid when it has one)
    tok_r: np.ndarray  # representative's token there

    def take(self, idx: np.ndarray) -> _Members:
        return _Members(*(getattr(self, f.name)[idx] for f in fields(self)))


def _refine(groups, order, lcp, starts, lengths, reader) -> _Groups:
    """One round over every unfinished group; writes final LCPs, returns the next groups."""
    window = reader.window
    size = groups.hi - groups.lo
    group_of = np.repeat(np.arange(len(size)), size)
    pos = _ranges(groups.lo, size)
    request = order[pos]
    rep = order[groups.lo][group_of]
    depth = groups.depth[group_of]
    left_m = lengths[request] - depth
    left_r = lengths[rep] - depth
    limit = np.minimum(np.minimum(left_m, left_r), window)
    agree, tok_m, tok_r = reader.compare(starts[request] + depth, starts[rep] + depth, limit)
    m = _Members(pos, group_of, request, depth, left_m, left_r, agree, tok_m, tok_r)
    equal = (agree == window) | ((agree == left_m) & (agree == left_r))
    dirty = np.zeros(len(size), bool)
    dirty[group_of[~equal]] = True
    is_dirty = dirty[group_of]

    done_equal = ~is_dirty & (agree < window)  # whole group identical and ended
    _write_run_lcp(lcp, pos, group_of, depth + agree, done_equal)
    moving = ~dirty & (agree[_first_of(size)] == window)
    nxt = [_Groups(groups.lo[moving], groups.hi[moving], groups.depth[moving] + window)]
    if dirty.any():
        dirty_members = m if is_dirty.all() else m.take(np.flatnonzero(is_dirty))
        nxt.append(_split(dirty_members, order, lcp, window))
    merged = _Groups(*(np.concatenate([getattr(g, f) for g in nxt]) for f in ("lo", "hi", "depth")))
    return _keep_unfinished(merged)


def _split(m: _Members, order, lcp, window: int) -> _Groups:
    """Sort the members of groups that diverged; write separated LCPs; return subgroups."""
    agree = m.agree
    equal = (agree == window) | ((agree == m.left_m) & (agree == m.left_r))
    member_ended = (agree == m.left_m) & (agree < m.left_r)
    rep_ended = (agree == m.left_r) & (agree < m.left_m)
    has_token = ~equal & ~member_ended  # the member has a real token at `agree`
    below = member_ended | (has_token & ~rep_ended & (m.tok_m < m.tok_r))
    side = np.where(equal, 1, np.where(below, 0, 2))
    # Below the rep: diverge earliest first; above: diverge latest first (lexicographic order).
    where = np.where(side == 0, agree, np.where(side == 2, window - agree, 0))
    token_key = np.zeros(len(agree), np.int64)
    if has_token.any():
        low = m.tok_m[has_token].min()
        token_key[has_token] = m.tok_m[has_token] - low + 1  # 0 is "prompt ended"
    ended = (equal & (agree < window)) | member_ended  # identical prompts, nothing left to sort
    perm = _sort_keys(m.group_of, side, where, token_key, window)
    # Positions stay put: members are only permuted within their own group's range.
    pos = m.pos
    order[pos] = m.request[perm]
    group_of, side, where, token_key = m.group_of[perm], side[perm], where[perm], token_key[perm]
    depth, agree, equal, ended = m.depth[perm], agree[perm], equal[perm], ended[perm]

    new_run = np.ones(len(agree), bool)
    new_run[1:] = (
        (group_of[1:] != group_of[:-1])
        | (side[1:] != side[:-1])
        | (where[1:] != where[:-1])
        | (token_key[1:] != token_key[:-1])
    )
    same_group = np.zeros(len(agree), bool)
    same_group[1:] = group_of[1:] == group_of[:-1]
    # A boundary's LCP is final when it separates two runs, or lies inside a finished run.
    final = np.flatnonzero(same_group & (new_run | ended))
    lcp[pos[final]] = depth[final] + np.minimum(agree[final], agree[final - 1])

    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], len(agree))
    keep = ~ended[run_start]
    first = run_start[keep]
    grown = np.where(equal[first], depth[first] + window, depth[first] + agree[first] + 1)
    return _Groups(pos[first], pos[run_end[keep] - 1] + 1, grown)


def _sort_keys(group_of, side, where, token_key, window) -> np.ndarray:
    """Stable permutation sorting by (group, side, where, token_key)."""
    bits_t = int(token_key.max()).bit_length()
    bits_w = int(window).bit_length()
    bits_g = int(group_of.max()).bit_length()
    if bits_g + 2 + bits_w + bits_t <= 63:
        key = (((group_of << 2 | side) << bits_w | where) << bits_t) | token_key
        return np.argsort(key, kind="stable")
    return np.lexsort((token_key, where, side, group_of))


def _write_run_lcp(lcp, pos, group_of, value, mask) -> None:
    """Inside finished identical groups every boundary's LCP is their common length."""
    inner = np.zeros(len(pos), bool)
    inner[1:] = group_of[1:] == group_of[:-1]
    inner &= mask
    lcp[pos[inner]] = value[inner]


def _keep_unfinished(groups: _Groups) -> _Groups:
    keep = groups.hi - groups.lo >= 2
    return _Groups(groups.lo[keep], groups.hi[keep], groups.depth[keep])


def _first_of(size: np.ndarray) -> np.ndarray:
    """Index of each group's first member in the concatenated member arrays."""
    return np.cumsum(size) - size


def _ranges(lo: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Concatenation of arange(lo[i], lo[i] + size[i]) for all i."""
    total = int(size.sum())
    shift = np.repeat(lo - _first_of(size), size)
    return shift + np.arange(total, dtype=np.int64)


class _WindowReader:
    """Reads `window` consecutive tokens from any start, past the array's end included.

    A row is one item of a zero-copy view whose items are `window`-token byte strings
    starting at every token (stride 4 bytes), so a gather copies one block per row: about
    2x faster than a sliding-window view and 3x faster than element-wise fancy indexing.
    Starts too close to the end read from a small zero-padded copy of the tail; callers
    never trust tokens past a prompt's end.
    """

    def __init__(self, tokens: np.ndarray, window: int):
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)  # the block view needs this
        self.tokens = tokens
        self.window = window
        self._last = len(tokens) - window  # largest start the main view can serve
        self._view = _block_view(tokens, window) if self._last >= 0 else None
        self._tail_base = max(self._last, 0)
        tail = np.zeros(len(tokens) - self._tail_base + window, np.int32)
        tail[: len(tokens) - self._tail_base] = tokens[self._tail_base :]
        self._tail = _block_view(tail, window)

    def rows(self, starts: np.ndarray) -> np.ndarray:
        """[len(starts), window] int32 tokens."""
        if len(starts) and starts.max() <= self._last:
            blocks = self._view[starts]
        else:
            blocks = np.empty(len(starts), self._tail.dtype)
            safe = starts <= self._last
            if self._view is not None:
                blocks[safe] = self._view[starts[safe]]
            blocks[~safe] = self._tail[starts[~safe] - self._tail_base]
        return blocks.view(np.int32).reshape(len(starts), self.window)

    def compare(self, a: np.ndarray, b: np.ndarray, limit: np.ndarray):
        """Per row: how many tokens from a and b agree (at most `limit`), and the tokens there.

        Returns (agree, tok_a, tok_b); tok_a/tok_b are the tokens at a+agree and b+agree
        when agree < window (meaningless past a prompt's end; callers check the lengths).
        Reading them from the rows already gathered avoids a random access per member.
        """
        agree = np.empty(len(a), np.int64)
        tok_a = np.empty(len(a), np.int64)
        tok_b = np.empty(len(a), np.int64)
        for lo in range(0, len(a), _CHUNK_ROWS):
            hi = min(lo + _CHUNK_ROWS, len(a))
            rows_a = self.rows(a[lo:hi])  # [rows, window]
            rows_b = self.rows(b[lo:hi])
            every = np.arange(hi - lo)
            first = _first_difference(rows_a, rows_b, every)
            # Tokens past a prompt's end may match by chance: the limit cuts them off.
            agree[lo:hi] = np.minimum(first, limit[lo:hi])
            at = np.minimum(agree[lo:hi], self.window - 1)
            tok_a[lo:hi] = rows_a[every, at]
            tok_b[lo:hi] = rows_b[every, at]
        return agree, tok_a, tok_b


def _first_difference(rows_a: np.ndarray, rows_b: np.ndarray, every: np.ndarray) -> np.ndarray:
    """First column where two [rows, window] int32 blocks differ (window if none)."""
    neq = rows_a != rows_b
    first = neq.argmax(axis=1)
    return np.where(neq[every, first], first, rows_a.shape[1])


def _block_view(tokens: np.ndarray, window: int) -> np.ndarray:
    """[len - window + 1] items of `window` int32 tokens each, item i starting at token i."""
    item = np.dtype((np.void, 4 * window))
    count = len(tokens) - window + 1
    return np.ndarray(shape=(count,), dtype=item, buffer=tokens, offset=0, strides=(4,))
