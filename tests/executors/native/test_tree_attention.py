"""Tree (shared-prefix) attention over a `KVStore` equals plain full causal attention, fp32.

Each case is a random segment tree (1..4 levels, GQA or MQA, odd and single-token
segments) and a random step on it: prefill chunks, whole-segment prefills and decode tokens,
in random row order. The truth is `reference_attention` over each run's materialised
context (its ancestors' KV, then its own segment's), computed from the same random tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.executors.native.attention import torch_spans as tree_attention
from prefixbatch.executors.native.attention.parts import reference_attention
from prefixbatch.executors.native.attention.plan import KeySpan, QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.tree import TreeAttention
from prefixbatch.executors.native.kv import KVStore

TOL = 1e-5
HEADS = [(4, 4), (4, 2), (4, 1), (6, 3), (2, 1)]
HEAD_DIM = 8
NUM_LAYERS = 2


@dataclass(frozen=True)
class Case:
    parents: tuple[int | None, ...]  # segment i's parent (an earlier segment) or None
    lengths: tuple[int, ...]  # full length of each segment
    runs: tuple[tuple[int, int, int], ...]  # (segment, offset, num_tokens), in row order
    heads: tuple[int, int]


@st.composite
def cases(draw) -> Case:
    num_segments = draw(st.integers(1, 9))
    parents: list[int | None] = []
    depth: list[int] = []
    for i in range(num_segments):
        candidates = [j for j in range(i) if depth[j] < 4]  # at most 4 levels
        parent = draw(st.none() | st.sampled_from(candidates)) if candidates else None
        parents.append(parent)
        depth.append(1 if parent is None else depth[parent] + 1)
    lengths = [draw(st.integers(1, 9)) for _ in range(num_segments)]
    with_runs = draw(st.sets(st.integers(0, num_segments - 1), min_size=1))
    runs = []
    for segment in sorted(with_runs):
        offset = draw(st.integers(0, lengths[segment] - 1))
        num_tokens = draw(st.integers(1, lengths[segment] - offset))
        if _has_run_below(segment, with_runs, parents):
            num_tokens = lengths[segment] - offset  # an ancestor must end complete this step
        runs.append((segment, offset, num_tokens))
    order = draw(st.permutations(runs))
    return Case(tuple(parents), tuple(lengths), tuple(order), draw(st.sampled_from(HEADS)))


def _has_run_below(segment: int, with_runs: set[int], parents: list[int | None]) -> bool:
    return any(segment in _ancestors(other, parents) for other in with_runs)


def _ancestors(segment: int, parents) -> list[int]:
    chain = []
    while parents[segment] is not None:
        segment = parents[segment]
        chain.append(segment)
    return chain[::-1]


def run_case(
    case: Case,
    *,
    seed: int = 0,
    device: str = "cpu",
    tol: float = TOL,
    fused: bool | None = None,
    kernel="auto",
    head_dim: int = HEAD_DIM,
    backend: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """kernel: TreeAttention's (a `SpanKernel` to force it, None for PyTorch's kernels);
    backend: a name of `backends.TABLE` to force (then kernel and fused are not used); dtype:
    the store's and the queries' (the truth stays fp32, from the same rounded tensors)."""
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = case.heads
    # The true KV of every segment ([layer, token, Hkv, D]), and the step's queries.
    truth_k = [_randn(NUM_LAYERS, n, num_kv_heads, head_dim, generator=generator) for n in case.lengths]
    truth_v = [_randn(NUM_LAYERS, n, num_kv_heads, head_dim, generator=generator) for n in case.lengths]
    num_rows = sum(n for _, _, n in case.runs)
    q = 3 * _randn(NUM_LAYERS, num_rows, num_heads, head_dim, generator=generator)
    if dtype != torch.float32:  # the truth from the values the store holds
        truth_k, truth_v = [t.to(dtype).float() for t in truth_k], [t.to(dtype).float() for t in truth_v]
        q = q.to(dtype).float()

    store = KVStore(
        num_layers=NUM_LAYERS,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        capacity_tokens=sum(case.lengths) + 7,
        dtype=dtype,
        device=device,
    )
    store.allocate(-1, 3)  # keep segments off slot 0, so a slot mix-up cannot hide there
    stored = _stored_lengths(case)
    segments = []
    for i, length in enumerate(case.lengths):
        slots = store.allocate(i, length)
        segments.append(SegmentKV(i, case.parents[i], slots.start, stored[i]))
        # Garbage everywhere, then the truth where the store holds it before the step:
        # the run's own tokens must come from this step's writes.
        store.keys[:, slots.start : slots.stop] = 1e3
        store.values[:, slots.start : slots.stop] = -1e3
        before = stored[i] - sum(n for s, _, n in case.runs if s == i)
        store.keys[:, slots.start : slots.start + before] = truth_k[i][:, :before].to(device)
        store.values[:, slots.start : slots.start + before] = truth_v[i][:, :before].to(device)

    runs, row = [], 0
    for segment, offset, num_tokens in case.runs:
        runs.append(QueryRun(segment, row, offset, num_tokens))
        row += num_tokens
    plan = plan_attention(segments, runs)
    scale = head_dim**-0.5
    if backend is not None:
        attention = TreeAttention(store, plan, scale=scale, backend=backend)
    else:
        attention = TreeAttention(store, plan, scale=scale, fused=fused, kernel=kernel)
    if kernel not in ("auto", None) and backend is None:
        assert attention.kernel is kernel, "the span kernel was asked for and not used"

    for layer in range(NUM_LAYERS):
        step_k = torch.cat([truth_k[s][layer, o : o + n] for s, o, n in case.runs])
        step_v = torch.cat([truth_v[s][layer, o : o + n] for s, o, n in case.runs])
        out = attention(layer, *(x.to(device, dtype) for x in (q[layer], step_k, step_v))).cpu().float()
        for run in runs:
            rows = slice(run.first_row, run.first_row + run.num_tokens)
            k, v = _context(case, run, truth_k, layer), _context(case, run, truth_v, layer)
            # The run's first token follows its ancestors' tokens and its offset.
            first = k.shape[0] - run.num_tokens
            expected = reference_attention(q[layer, rows], k, v, scale=scale, causal_offset=first)
            torch.testing.assert_close(out[rows], expected, atol=tol, rtol=0)
            assert list(plan.positions[rows]) == list(range(first, first + run.num_tokens))


def _randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _context(case: Case, run: QueryRun, truth: list[torch.Tensor], layer: int) -> torch.Tensor:
    """The run's whole context of one layer: its ancestors, then its segment up to its end."""
    ancestors = _ancestors(run.segment_id, case.parents)
    parts = [truth[s][layer] for s in ancestors]
    parts.append(truth[run.segment_id][layer, : run.offset + run.num_tokens])
    return torch.cat(parts)


def _stored_lengths(case: Case) -> list[int]:
    """Tokens each segment holds after the step: its run's end, else all of it."""
    stored = list(case.lengths)
    for segment, offset, num_tokens in case.runs:
        stored[segment] = offset + num_tokens
    return stored


@settings(max_examples=150, deadline=None)
@given(cases())
def test_tree_attention_equals_full_attention(case):
    run_case(case)  # the fused kernel on the CPU


@settings(max_examples=100, deadline=None)
@given(cases())
def test_tree_attention_on_the_matmul_path_equals_full_attention(case):
    run_case(case, fused=False)


@settings(max_examples=100, deadline=None)
@given(cases(), st.booleans())
def test_tree_attention_with_every_span_its_own_product_equals_full_attention(case, fused):
    # The tiny segments above mostly go to the batched gather; here none does.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tree_attention, "GATHER_MAX_KEYS", 0)
        run_case(case, fused=fused)


def test_decode_of_many_sequences_under_one_node_is_one_span():
    # 12 samples of one 7-token prompt, each 3 tokens into its output, decoding together.
    parents = (None, *[0] * 12)
    lengths = (7, *[4] * 12)
    runs = tuple((i, 3, 1) for i in range(1, 13))
    case = Case(parents, lengths, runs, (4, 1))
    run_case(case)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    segments = [SegmentKV(i, p, s, n) for i, (p, s, n) in enumerate(zip(parents, starts, lengths))]
    plan = plan_attention(segments, [QueryRun(s, row, o, n) for row, (s, o, n) in enumerate(runs)])
    assert plan.spans[0] == KeySpan(tuple(range(12)), 0, 7, None)  # all 12 queries, one product
    assert len(plan.spans) == 13


@pytest.mark.parametrize("heads", HEADS)
def test_prefill_of_a_four_level_chain_with_single_token_segments(heads):
    # Every level prefilled in the same step: children attend to keys written this step.
    run_case(
        Case((None, 0, 1, 2), (1, 3, 1, 5), ((0, 0, 1), (1, 0, 3), (2, 0, 1), (3, 0, 5)), heads)
    )


@pytest.mark.parametrize("heads", HEADS)
def test_chunked_prefill_next_to_decodes_in_shuffled_rows(heads):
    # Rows interleave two subtrees, so the root's rows are not consecutive (gathered).
    parents = (None, 0, 0, None, 3, 1)
    lengths = (5, 4, 6, 3, 9, 2)
    runs = ((4, 2, 5), (2, 5, 1), (3, 0, 3), (5, 1, 1), (1, 0, 4))
    run_case(Case(parents, lengths, runs, heads), seed=1)


def test_plan_spans_positions_and_slots():
    segments = [SegmentKV(10, None, 100, 4), SegmentKV(11, 10, 200, 3), SegmentKV(12, 10, 300, 1)]
    runs = [QueryRun(11, 0, 1, 2), QueryRun(12, 2, 0, 1)]
    plan = plan_attention(segments, runs)
    assert plan.spans == (
        KeySpan((0, 1, 2), 100, 4, None),
        KeySpan((0, 1), 200, 3, 1),
        KeySpan((2,), 300, 1, 0),
    )
    assert plan.write_slots == (201, 202, 300)
    assert plan.positions == (5, 6, 4)


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([QueryRun(1, 0, 2, 2)], "within the 3 stored tokens"),
        ([QueryRun(9, 0, 0, 1)], "segment 9, which is not among"),
        ([QueryRun(1, 0, 0, 1), QueryRun(1, 0, 1, 1)], "belongs to two runs"),
        ([QueryRun(1, 1, 0, 1)], "within the step's 1 rows"),
    ],
)
def test_plan_rejects_inconsistent_runs(runs, message):
    segments = [SegmentKV(0, None, 0, 4), SegmentKV(1, 0, 4, 3)]
    with pytest.raises(ValueError, match=message):
        plan_attention(segments, runs)


def test_plan_rejects_cycles():
    segments = [SegmentKV(0, 1, 0, 4), SegmentKV(1, 0, 4, 3)]
    with pytest.raises(ValueError, match="cycle"):
        plan_attention(segments, [QueryRun(1, 0, 0, 1)])


def test_private_ancestors_stored_right_before_a_run_join_its_span():
    # 10 (shared by both runs) → 11 (only run 0's) → 12, stored back to back; 13 under 10 elsewhere.
    segments = [SegmentKV(10, None, 0, 4), SegmentKV(11, 10, 4, 3), SegmentKV(12, 11, 7, 2),
                SegmentKV(13, 10, 50, 2)]
    plan = plan_attention(segments, [QueryRun(12, 0, 1, 1), QueryRun(13, 1, 0, 2)])
    assert plan.spans == (
        KeySpan((0, 1, 2), 0, 4, None),  # the shared root: one product for all three rows
        KeySpan((0,), 4, 5, 4),  # 11's 3 keys and 12's first 2, one causal range
        KeySpan((1, 2), 50, 2, 0),
    )
    # Not right before it: a span of its own, merged as before.
    moved = [*segments[:2], SegmentKV(12, 11, 20, 2)]
    assert plan_attention(moved, [QueryRun(12, 0, 1, 1)]).spans == (
        KeySpan((0,), 0, 4, None), KeySpan((0,), 4, 3, None), KeySpan((0,), 20, 2, 1))
    # With the whole chain private and contiguous, the run is one causal range from slot 0.
    assert plan_attention(segments[:3], [QueryRun(12, 0, 1, 1)]).spans == (KeySpan((0,), 0, 9, 8),)
