"""The Triton span kernel meets the span contract, without a GPU.

On CPU tensors the kernel runs in Triton's interpreter (in this process: it is written with
builtins only, so TRITON_INTERPRET need not be set before triton is imported). Each case is a
random segment tree and step, as in `test_tree_attention`, with some segments long enough for
several key blocks and several tiles per span: the kernel's parts equal `reference.attend_spans`'
and, merged by `spans.merge_entries`, equal full causal attention over each run's context.
fp32, fp16, and bf16 (upcast to fp32 in the interpreter); head sizes 8 (padded to 16) and 64;
MHA, GQA and MQA. Then the kernel is compiled for an H100 (sm_90) and must not spill.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from prefixbatch.executors.native.attention import reference, triton_span  # noqa: E402
from prefixbatch.executors.native.attention.parts import reference_attention  # noqa: E402
from prefixbatch.executors.native.attention.plan import (  # noqa: E402
    KeySpan,
    QueryRun,
    SegmentKV,
    plan_attention,
)
from prefixbatch.executors.native.attention.spans import SpanBatch, merge_entries  # noqa: E402
from tests.executors.native.test_tree_attention import _ancestors  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp16: the kernel rounds its probabilities to fp16 for the value product (as on a GPU);
# bf16: upcast in the interpreter, so fp32 products of the same bf16 values as the reference.
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-4}
HEADS = [(4, 4), (4, 2), (8, 1), (6, 2)]  # (H, Hkv): MHA, GQA, MQA, a group of 3 (padded to 4)
GARBAGE = 1e3  # in every slot the step's keys do not come from: a wrong slot shows


@dataclass(frozen=True)
class Case:
    parents: tuple[int | None, ...]  # segment i's parent (an earlier segment) or None
    lengths: tuple[int, ...]  # tokens of each segment stored after the step
    gaps: tuple[int, ...]  # free slots before each segment (0: right after the previous one)
    runs: tuple[tuple[int, int, int], ...]  # (segment, offset, num_tokens), in row order
    heads: tuple[int, int]
    head_dim: int


@st.composite
def cases(draw, max_length: int = 9) -> Case:
    num_segments = draw(st.integers(1, 6))
    parents: list[int | None] = []
    for i in range(num_segments):
        parents.append(draw(st.none() | st.integers(0, i - 1)) if i else None)
    # Mostly short segments; some past a key block (64) and a tile (16..64 entries).
    lengths = [draw(st.integers(1, 9) | st.integers(60, max_length)) for _ in range(num_segments)]
    gaps = [draw(st.sampled_from([0, 0, 2])) for _ in range(num_segments)]
    with_runs = draw(st.sets(st.integers(0, num_segments - 1), min_size=1))
    runs = []
    for segment in sorted(with_runs):
        offset = draw(st.integers(0, lengths[segment] - 1))
        num_tokens = draw(st.integers(1, lengths[segment] - offset))
        if any(segment in _ancestors(other, parents) for other in with_runs):
            num_tokens = lengths[segment] - offset  # an ancestor ends complete this step
        runs.append((segment, offset, num_tokens))
    order = draw(st.permutations(runs))
    heads = draw(st.sampled_from(HEADS))
    return Case(tuple(parents), tuple(lengths), tuple(gaps), tuple(order), heads, draw(st.sampled_from([8, 64])))


def run_case(case: Case, dtype_name: str, *, seed: int = 0) -> None:
    dtype, tol = DTYPES[dtype_name], TOL[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = case.heads
    truth_k = [torch.randn(n, num_kv_heads, case.head_dim, generator=generator).to(dtype) for n in case.lengths]
    truth_v = [torch.randn(n, num_kv_heads, case.head_dim, generator=generator).to(dtype) for n in case.lengths]
    num_rows = sum(n for _, _, n in case.runs)
    q = (3 * torch.randn(num_rows, num_heads, case.head_dim, generator=generator)).to(dtype)

    capacity = 3 + sum(case.lengths) + sum(case.gaps)
    keys = torch.full((capacity, num_kv_heads, case.head_dim), GARBAGE, dtype=dtype)
    values = torch.full_like(keys, -GARBAGE)
    segments, slot = [], 3  # keep segments off slot 0, so a slot mix-up cannot hide there
    for i, length in enumerate(case.lengths):
        slot += case.gaps[i]
        segments.append(SegmentKV(i, case.parents[i], slot, length))
        keys[slot : slot + length], values[slot : slot + length] = truth_k[i], truth_v[i]
        slot += length
    runs, row = [], 0
    for segment, offset, num_tokens in case.runs:
        runs.append(QueryRun(segment, row, offset, num_tokens))
        row += num_tokens
    batch = SpanBatch.of(plan_attention(segments, runs), "cpu")
    scale = case.head_dim**-0.5

    part_out, part_lse = triton_span.attend_spans(q, keys, values, batch, scale=scale)
    expected_out, expected_lse = reference.attend_spans(q, keys, values, batch, scale=scale)
    torch.testing.assert_close(part_out, expected_out, atol=tol, rtol=0)
    torch.testing.assert_close(part_lse, expected_lse, atol=tol, rtol=0)

    out, _ = merge_entries(part_out, part_lse, batch)
    for run in runs:
        rows = slice(run.first_row, run.first_row + run.num_tokens)
        chain = [*_ancestors(run.segment_id, case.parents), run.segment_id]
        stop = run.offset + run.num_tokens  # the run's own segment, up to its last token
        k = torch.cat([truth_k[s] if s != run.segment_id else truth_k[s][:stop] for s in chain])
        v = torch.cat([truth_v[s] if s != run.segment_id else truth_v[s][:stop] for s in chain])
        truth = reference_attention(q[rows], k, v, scale=scale, causal_offset=k.shape[0] - run.num_tokens)
        torch.testing.assert_close(out[rows], truth, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@settings(max_examples=10, deadline=None)
@given(case=cases(max_length=140))
def test_triton_span_kernel_equals_reference_and_full_attention(case, dtype_name):
    run_case(case, dtype_name)


@pytest.mark.parametrize(("dtype_name", "heads", "head_dim"), [("fp32", (8, 1), 8), ("bf16", (4, 2), 64)])
def test_decode_of_many_sequences_under_a_long_prompt(dtype_name, heads, head_dim):
    # 70 samples of one 130-token prompt, each 3 tokens into its output: an ancestor span of
    # 70 entries (several tiles) over 130 keys (three key blocks, the last one partial).
    parents = (None, *[0] * 70)
    lengths = (130, *[4] * 70)
    runs = tuple((i, 3, 1) for i in range(70, 0, -1))
    run_case(Case(parents, lengths, (0,) * 71, runs, heads, head_dim), dtype_name)


@pytest.mark.parametrize("heads", HEADS)
def test_chunked_prefill_of_a_private_chain_skips_key_blocks_past_each_tile(heads):
    # One 150-token causal span (root and child absorbed): its first tiles see fewer keys
    # than its last, so they stop early; a decode under another root rides along.
    parents = (None, 0, None, 2)
    lengths = (40, 110, 5, 3)
    runs = ((1, 0, 110), (3, 2, 1))
    run_case(Case(parents, lengths, (0, 0, 1, 0), runs, heads, 64), "fp16")


def test_an_entry_that_sees_no_key_gets_zero_and_minus_infinity():
    # Plans never make such a span (SpanBatch.of drops it); the contract still says what it gives.
    span = KeySpan((0, 1), key_start=2, num_keys=0, causal_offset=None)
    rows = torch.tensor([0, 1])
    batch = SpanBatch(
        num_rows=2, spans=(span,), entry_rows=rows, span_first=torch.tensor([0, 2]),
        key_start=torch.tensor([2]), num_keys=torch.tensor([0]), causal=torch.tensor([-1]),
        row_entries=rows[:, None], max_span_rows=2, max_span_keys=0,
    )
    q, keys = torch.randn(2, 4, 8), torch.randn(5, 2, 8)
    part_out, part_lse = triton_span.attend_spans(q, keys, keys, batch, scale=1.0)
    assert torch.equal(part_out, torch.zeros(2, 4, 8))
    assert torch.equal(part_lse, torch.full((2, 4), float("-inf")))


def test_rejects_keys_of_another_dtype():
    batch = SpanBatch.of(plan_attention([SegmentKV(0, None, 0, 1)], [QueryRun(0, 0, 0, 1)]), "cpu")
    q, keys = torch.randn(1, 2, 8), torch.randn(1, 1, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="`keys` and `values` must be torch.float32"):
        triton_span.attend_spans(q, keys, keys, batch, scale=1.0)


@pytest.mark.parametrize(("head_dim", "group"), [(128, 4), (64, 8), (8, 1)])
def test_compiles_for_sm90_without_spills(head_dim, group):
    # head size 8 is padded to 16: the GPU compiler rejects smaller dots (the interpreter does not).
    variants = triton_span.compile_for_sm90(head_dim=head_dim, group=group)
    assert [v.dtype for v in variants] == ["bf16", "fp16"]
    for variant in variants:
        print(f"sm_90 {variant}")
        assert variant.num_spills == 0, variant
        assert 0 < variant.num_regs <= 255, variant
