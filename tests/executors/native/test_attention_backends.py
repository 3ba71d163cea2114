"""The attention seam: every span backend equals full attention on the tree cases, the merge is
exact, the table picks by device and dtype, and the reference's memory stays bounded.

The tree cases are `test_tree_attention`'s (random segment trees, prefill chunks and decode
rows in random order); the truth is plain full attention over each run's context. The CUDA
backends run only on a GPU (`benchmarks/gpu_check.py`); here FA2's packing runs through its
emulation (`flash_varlen.emulate`: the same sequences, each attended by PyTorch) and the
Triton kernel through Triton's interpreter (test_triton_span.py).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

from prefixbatch.executors.native.attention import backends, flash_varlen, reference
from prefixbatch.executors.native.attention.parts import merge, reference_attention
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.spans import SpanBatch, merge_entries

from .test_tree_attention import Case, cases, run_case


@settings(max_examples=60, deadline=None)
@given(cases())
def test_the_reference_backend_equals_full_attention(case):
    run_case(case, backend="reference")


@settings(max_examples=60, deadline=None)
@given(cases())
def test_flash_varlen_packing_equals_full_attention(case):
    # The spans as FA2 sequences over the store in place, gaps as query-less sequences.
    run_case(case, backend="flash-emulated")


@pytest.mark.parametrize("backend", ["reference", "flash-emulated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stores_attend_within_rounding(backend, dtype):
    case = Case((None, 0, 0, 1, 1), (7, 5, 1, 3, 9), ((3, 0, 3), (2, 0, 1), (4, 2, 7)), (4, 2))
    run_case(case, backend=backend, dtype=dtype, tol=2e-2)


def test_varlen_sequences_read_the_store_in_place_with_gaps_between():
    # Segment 0 (slots 0-6) shared by two decode rows; segments 1, 2 after a gap of free slots.
    segments = [SegmentKV(0, None, 0, 7), SegmentKV(1, 0, 10, 4), SegmentKV(2, 0, 20, 3)]
    plan = plan_attention(segments, [QueryRun(1, 0, 3, 1), QueryRun(2, 1, 2, 1)])
    batch = SpanBatch.of(plan, "cpu")
    [shared] = flash_varlen.VarlenCall.of(batch, causal=False)
    [own] = flash_varlen.VarlenCall.of(batch, causal=True)
    assert shared.cu_q.tolist() == [0, 2] and shared.cu_k.tolist() == [0, 7]
    # Slots 0-9 (the shared segment and the gap) hold no query of the causal call.
    assert own.cu_q.tolist() == [0, 0, 1, 1, 2] and own.cu_k.tolist() == [0, 10, 14, 20, 23]
    assert own.q_rows.tolist() == [0, 1]


def test_merge_entries_equals_the_pairwise_merge():
    generator = torch.Generator().manual_seed(0)
    parts = [(torch.randn(5, 3, 4, generator=generator), torch.randn(5, 3, generator=generator)) for _ in range(3)]
    parts[1][1][2] = float("-inf")  # a part that saw no key weighs nothing
    segments = [SegmentKV(0, None, 0, 4), SegmentKV(1, 0, 5, 4), SegmentKV(2, 1, 10, 5)]  # apart: not joined
    plan = plan_attention(segments, [QueryRun(2, 0, 0, 5)])
    batch = SpanBatch.of(plan, "cpu")
    assert batch.row_entries.shape == (5, 3)  # every row in the two ancestor spans and its own
    # Entries in span order: each span's 5 rows.
    part_out = torch.cat([out for out, _ in parts])
    part_lse = torch.cat([lse for _, lse in parts])
    out, lse = merge_entries(part_out, part_lse, batch)
    expected_out, expected_lse = merge(parts)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, expected_lse, atol=1e-6, rtol=0)


class _PeakMemory(TorchDispatchMode):
    """The most bytes that tensors made by ops inside were alive at once (views not counted
    twice: only tensors with storage of their own)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor._base is None and not func._schema.is_mutable:
                size = tensor.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(tensor, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def test_a_long_prefill_chunk_needs_memory_bounded_by_blocks_not_rows_times_keys():
    # 4,096 rows of a prompt's chunk after 4,096 keys of its shared prefix: 8,192 keys in all.
    heads, kv_heads, head_dim, rows, prefix = 8, 2, 16, 4096, 4096
    segments = [SegmentKV(0, None, 0, prefix), SegmentKV(1, 0, prefix, rows)]
    plan = plan_attention(segments, [QueryRun(1, 0, 0, rows)])
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(prefix + rows, kv_heads, head_dim, generator=generator)
    values = torch.randn(prefix + rows, kv_heads, head_dim, generator=generator)
    q = torch.randn(rows, heads, head_dim, generator=generator)
    batch = SpanBatch.of(plan, "cpu")
    with _PeakMemory() as watch:
        part_out, part_lse = reference.attend_spans(q, keys, values, batch, scale=0.25)
        out, _ = merge_entries(part_out, part_lse, batch)
    # What the step must hold whatever the backend: the parts and the output (E × H × D fp32).
    outputs = (2 * batch.num_entries + rows) * heads * (head_dim + 1) * 4
    bound = reference.memory_bound_bytes(heads, head_dim) + outputs
    full_scores = heads * rows * (prefix + rows) * 4  # one score matrix, as a bmm path makes
    assert 0 < watch.peak <= bound < full_scores / 10, (watch.peak, bound, full_scores)
    # And it is attention: a few rows against the truth.
    sample = torch.tensor([0, 1, 2047, 4095])
    kv = torch.arange(prefix + rows)
    for row in sample.tolist():
        expected = reference_attention(q[row : row + 1], keys[kv], values[kv], scale=0.25, causal_offset=prefix + row)
        torch.testing.assert_close(out[row : row + 1], expected, atol=1e-5, rtol=0)


def test_the_table_picks_by_device_and_dtype(monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = backends.select(cpu, torch.float32, 64)
    assert on_cpu in ("span-kernel", "torch")  # "torch" only where the C kernel cannot build
    assert backends.select(cpu, torch.float16, 64) == "torch"
    monkeypatch.setattr(flash_varlen, "available", lambda: True)
    assert backends.select(cuda, torch.bfloat16, 128) == "flash"
    assert backends.select(cuda, torch.bfloat16, 320) != "flash"  # FA2 takes heads up to 256
    assert backends.select(cuda, torch.float32, 128) in ("triton", "reference")
    monkeypatch.setenv(backends.ENV, "reference")
    assert backends.select(cuda, torch.bfloat16, 128) == "reference"
    monkeypatch.setenv(backends.ENV, "nonsense")
    with pytest.raises(ValueError, match="PREFIXBATCH_ATTENTION must name an attention backend"):
        backends.select(cpu, torch.float32, 64)
