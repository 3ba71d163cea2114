"""`attend` (both implementations), `attend_gathered` and `merge` against the plain
full-attention reference, fp32 on the CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

from prefixbatch.executors.native.attention.parts import (
    attend,
    attend_fused,
    attend_gathered,
    attend_matmul,
    causal_mask,
    merge,
    reference_attention,
)

TOL = 1e-5
HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]  # (H, Hkv): MHA, GQA, MQA, odd group count
# `attend` dispatches by device; the two implementations are each held to the reference.
IMPLEMENTATIONS = pytest.mark.parametrize(
    "attend_impl", [attend_matmul, attend_fused], ids=["matmul", "fused"]
)


def random_qkv(
    num_queries: int, num_keys: int, heads: tuple[int, int], *, seed: int, head_dim: int = 8
):
    generator = torch.Generator().manual_seed(seed)
    num_heads, num_kv_heads = heads
    # q scaled up: sharp attention makes a wrong key weight show, where uniform weights hide it.
    q = 3 * torch.randn(num_queries, num_heads, head_dim, generator=generator)
    k = torch.randn(num_keys, num_kv_heads, head_dim, generator=generator)
    v = torch.randn(num_keys, num_kv_heads, head_dim, generator=generator)
    return q, k, v


@IMPLEMENTATIONS
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize(
    ("num_queries", "num_keys", "causal_offset"),
    # offset 0: a fresh segment; Tk - Tq: a chunk continuing its segment (the fused kernel
    # splits it in two); 2 with 3 queries of 6 keys: a chunk that does not reach the end.
    [(5, 5, 0), (3, 11, 8), (1, 7, 6), (4, 9, None), (1, 1, 0), (6, 6, 9), (3, 6, 2), (64, 80, 16)],
)
def test_attend_equals_reference(attend_impl, heads, num_queries, num_keys, causal_offset):
    q, k, v = random_qkv(num_queries, num_keys, heads, seed=num_keys)
    out, lse = attend_impl(q, k, v, scale=0.3, causal_offset=causal_offset)
    expected = reference_attention(q, k, v, scale=0.3, causal_offset=causal_offset)
    assert out.shape == q.shape and lse.shape == q.shape[:2] and lse.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


@IMPLEMENTATIONS
@pytest.mark.parametrize(("num_queries", "causal_offset"), [(3, 2), (3, 3), (6, 0), (2, None)])
def test_attend_lse_is_log_sum_exp_of_scores(attend_impl, num_queries, causal_offset):
    q, k, v = random_qkv(num_queries, 6, (4, 2), seed=1)
    _, lse = attend_impl(q, k, v, scale=0.5, causal_offset=causal_offset)
    scores = torch.einsum("qhd,khd->qhk", q, k.repeat_interleave(2, dim=1)) * 0.5
    if causal_offset is not None:
        mask = causal_mask(num_queries, 6, causal_offset, device=q.device)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), atol=TOL, rtol=0)


@IMPLEMENTATIONS
def test_attend_with_no_keys_gives_zero_and_minus_inf(attend_impl):
    q, k, v = random_qkv(3, 0, (4, 2), seed=0)
    out, lse = attend_impl(q, k, v, scale=1.0)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


@IMPLEMENTATIONS
def test_attend_rows_that_see_no_key_give_zero_and_minus_inf(attend_impl):
    # Offset -2: queries 0 and 1 precede every key, query 2 sees key 0 only.
    q, k, v = random_qkv(3, 4, (2, 1), seed=0)
    out, lse = attend_impl(q, k, v, scale=1.0, causal_offset=-2)
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.isneginf(lse[:2]).all()
    torch.testing.assert_close(out[2], v[0].expand(2, -1), atol=TOL, rtol=0)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("cuts", [(3,), (1, 2), (5, 6, 9), (0, 4)])
def test_merge_of_split_keys_equals_whole(heads, cuts):
    # Queries 0..4 are the last 5 tokens of a 10-token sequence: causal over the last part.
    q, k, v = random_qkv(5, 10, heads, seed=len(cuts))
    bounds = [0, *cuts, 10]
    parts = []
    for start, stop in itertools.pairwise(bounds):
        # Keys [start, stop) seen causally by queries at positions 5..9: offset 5 - start.
        parts.append(attend(q, k[start:stop], v[start:stop], scale=0.4, causal_offset=5 - start))
    out, lse = merge(parts)
    whole_out, whole_lse = attend(q, k, v, scale=0.4, causal_offset=5)
    torch.testing.assert_close(
        out, reference_attention(q, k, v, scale=0.4, causal_offset=5), atol=TOL, rtol=0
    )
    torch.testing.assert_close(lse, whole_lse, atol=TOL, rtol=0)
    torch.testing.assert_close(out, whole_out, atol=TOL, rtol=0)


def test_merge_ignores_empty_parts_and_keeps_all_empty_at_zero():
    q, k, v = random_qkv(2, 4, (2, 2), seed=3)
    part = attend(q, k, v, scale=1.0)
    empty = attend(q, k[:0], v[:0], scale=1.0)
    out, lse = merge([empty, part, empty])
    assert torch.equal(out, part[0]) and torch.equal(lse, part[1])
    out, lse = merge([empty, empty])
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()


@IMPLEMENTATIONS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attend_in_half_precision_is_close_and_keeps_lse_fp32(attend_impl, dtype):
    q, k, v = random_qkv(7, 12, (4, 2), seed=5)
    out, lse = attend_impl(q.to(dtype), k.to(dtype), v.to(dtype), scale=0.3, causal_offset=5)
    assert out.dtype == dtype and lse.dtype == torch.float32
    expected = reference_attention(q, k, v, scale=0.3, causal_offset=5)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=0)


def test_attend_picks_the_fused_kernel_on_cpu():
    q, k, v = random_qkv(4, 9, (4, 2), seed=2)
    fused = attend_fused(q, k, v, scale=0.3, causal_offset=5)
    picked = attend(q, k, v, scale=0.3, causal_offset=5)
    assert torch.equal(picked[0], fused[0]) and torch.equal(picked[1], fused[1])


@pytest.mark.parametrize("fused", [False, True], ids=["einsum", "fused"])
@pytest.mark.parametrize("heads", HEADS)
def test_attend_gathered_equals_reference_per_row(fused, heads):
    # 5 rows, each one query over its own keys (1 to 9 of them, padded to 9).
    num_rows, width = 5, 9
    q, k, v = random_qkv(num_rows, num_rows * width, heads, seed=7)
    k, v = k.view(num_rows, width, *k.shape[1:]), v.view(num_rows, width, *v.shape[1:])
    lengths = [1, 9, 4, 2, 7]
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    out, lse = attend_gathered(q, k, v, valid, scale=0.4, fused=fused)
    assert out.shape == q.shape and lse.dtype == torch.float32
    for row, n in enumerate(lengths):
        expected = reference_attention(q[row : row + 1], k[row, :n], v[row, :n], scale=0.4)
        torch.testing.assert_close(out[row : row + 1], expected, atol=TOL, rtol=0)
        _, row_lse = attend_matmul(q[row : row + 1], k[row, :n], v[row, :n], scale=0.4)
        torch.testing.assert_close(lse[row : row + 1], row_lse, atol=TOL, rtol=0)
