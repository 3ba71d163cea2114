"""Our C span-attention kernel: the whole plan of a step in one call equals full attention.

The cases of `test_tree_attention` (random segment trees and steps, garbage in every slot not
yet written) run on the kernel, plus cases sized to cross what the kernel does in pieces:
key tiles of 64, row blocks of `QUERIES_PER_TASK // G` rows, ranges split across threads,
query blocks padded past the last query, and both ways of computing scores (dot products for
few queries a task, queries in the vector lanes for many). Each test that runs the kernel runs
it in every build flavour (`kernel_build`, conftest.py): the library for this CPU and the
portable x86-64-v3 and x86-64-v2 ones. How the library is built, cached and trusted:
test_kernel_library.py.
"""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixbatch.executors.native import span_kernel
from prefixbatch.executors.native.attention import c_kernel
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.tree import TreeAttention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.rope import apply_rope, rope_angles
from prefixbatch.executors.native.span_kernel import load_span_kernel

from .test_tree_attention import Case, cases, run_case

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc"))
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler to build the kernel")


@pytest.fixture(scope="module")
def native_kernel():
    """The library the engine loads (for the tests of plans, which are the same in every build)."""
    built = load_span_kernel()
    assert built is not None, "a C compiler is on PATH, yet the span kernel did not build"
    return built


@pytest.fixture(scope="session")
def kernel(kernel_build):
    """Each build flavour's library in turn."""
    return kernel_build


@settings(max_examples=150, deadline=None)
@given(cases(), st.sampled_from([16, 32, 64]))
def test_random_trees_and_steps_equal_full_attention(native_kernel, case, head_dim):
    run_case(case, kernel=native_kernel, head_dim=head_dim)


@settings(max_examples=25, deadline=None)
@given(cases(), st.sampled_from([16, 32, 64]))
def test_random_trees_and_steps_equal_full_attention_in_every_build(kernel, case, head_dim):
    run_case(case, kernel=kernel, head_dim=head_dim)


@pytest.mark.parametrize("heads", [(8, 4), (14, 2), (4, 1), (32, 2)])
def test_many_decodes_under_a_long_shared_prefix(kernel, heads):
    # 40 samples of one 300-token prompt, each 70 tokens into its own segment: the prefix
    # span is row blocks over 5 key tiles, each own span one row over 2 tiles.
    parents = (None, *[0] * 40)
    lengths = (300, *[75] * 40)
    runs = tuple((i, 70, 1) for i in range(1, 41))
    run_case(Case(parents, lengths, runs, heads), kernel=kernel, head_dim=64, seed=3)


@pytest.mark.parametrize("heads", [(8, 4), (14, 2)])
def test_long_chunked_prefill_beside_decodes(kernel, heads):
    # A 150-token chunk continuing a 100-token segment under a 130-token root (causal rows in
    # many blocks, each seeing a different number of keys), beside decodes under the root.
    parents = (None, 0, 0, 0)
    lengths = (130, 260, 90, 33)
    runs = ((1, 100, 150), (2, 89, 1), (3, 20, 1))
    run_case(Case(parents, lengths, runs, heads), kernel=kernel, head_dim=128, seed=4)


@pytest.mark.parametrize("heads", [(8, 4), (14, 2)])
def test_a_chunks_blocks_chain_its_spans_behind_decode_rows(kernel, heads):
    # Three decode rows first, then two chunks under a shared root and a shared middle segment:
    # each chunk's rows make the same blocks in every span they see (not cut where the decode
    # rows before them would put the cuts), and those blocks run as one task each, their
    # ranges chained — no merge for the chunk's rows.
    parents = (None, 0, 1, 1, 0, 0, 0)
    lengths = (150, 100, 90, 70, 30, 30, 30)
    runs = ((4, 20, 1), (5, 25, 1), (6, 29, 1), (2, 10, 80), (3, 0, 70))
    run_case(Case(parents, lengths, runs, heads), kernel=kernel, head_dim=64, seed=12)

    num_heads, num_kv_heads = heads
    segments = [SegmentKV(i, p, sum(lengths[:i]), n) for i, (p, n) in enumerate(zip(parents, lengths, strict=True))]
    plan = plan_attention(segments, [QueryRun(s, sum(n for _, _, n in runs[:i]), o, n) for i, (s, o, n) in enumerate(runs)])
    kernel_plan = c_kernel.KernelPlan.of(
        plan, group=num_heads // num_kv_heads, num_kv_heads=num_kv_heads, num_threads=2,
        dot_max_queries=kernel.dot_max_queries,
    )  # fmt: skip
    tasks = kernel_plan.tasks.tolist()
    rows = kernel_plan.entry_row.tolist()
    chained = tasks[kernel_plan.num_tasks :]
    assert chained, "the chunks' blocks should chain"
    for task in tasks[: kernel_plan.num_tasks]:
        key_ranges, link = [task[:2]], task
        while link[5] >= 0:
            link = tasks[link[5]]
            assert rows[link[2] : link[2] + link[3]] == rows[task[2] : task[2] + task[3]]
            key_ranges.append(link[:2])
        if rows[task[2]] >= 3:  # a chunk's block: root, middle segment and its own keys
            assert len(key_ranges) == 3, key_ranges
    # Each chunk row has one entry to write (its chained task's); decode rows one per span.
    counts = [b - a for a, b in zip(kernel_plan.row_ptr.tolist(), kernel_plan.row_ptr.tolist()[1:])]
    assert counts == [2, 2, 2] + [1] * 150


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_one_long_sequence_split_across_threads(kernel, threads, monkeypatch):
    # One row over 1,500 keys and one kv head: too few tasks, so the range is split in pieces.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    run_case(Case((None,), (1500,), ((0, 1499, 1),), (4, 1)), kernel=kernel, head_dim=64, seed=5)


@pytest.mark.parametrize("heads", [(8, 4), (14, 2)])
def test_rope_and_the_kv_write_inside_the_call_equal_rope_then_attention(kernel, heads):
    # `attend_unroped` gets q, k before rope as the model has them (views into one qkv
    # product) and the angles: the outputs and the stored keys and values must be those of
    # `apply_rope` followed by PyTorch's path (a 70-token chunk and a decode row, 2 layers).
    num_heads, num_kv_heads = heads
    head_dim, generator = 64, torch.Generator().manual_seed(6)
    lengths = (200, 90, 40)  # keys after the step: the chunk and the decode row are written by it
    segments = [SegmentKV(0, None, 0, 200), SegmentKV(1, 0, 200, 90), SegmentKV(2, 0, 290, 40)]
    plan = plan_attention(segments, [QueryRun(1, 0, 20, 70), QueryRun(2, 70, 39, 1)])
    stores = [KVStore(num_layers=2, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity_tokens=sum(lengths),
                      dtype=torch.float32, device="cpu") for _ in range(2)]  # fmt: skip
    for store in stores:
        store.keys.copy_(torch.randn(store.keys.shape, generator=generator.manual_seed(7)))
        store.values.copy_(torch.randn(store.values.shape, generator=generator.manual_seed(8)))
    ours = TreeAttention(stores[0], plan, scale=head_dim**-0.5, kernel=kernel)
    theirs = TreeAttention(stores[1], plan, scale=head_dim**-0.5, kernel=None)
    positions = torch.cat([torch.arange(220, 290), torch.tensor([239])])  # past the root's 200
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = rope_angles(positions, inv_freq)
    for layer in range(2):
        qkv = torch.randn(71, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        q, k, v = q.view(71, num_heads, head_dim), k.view(71, num_kv_heads, head_dim), v.view(71, num_kv_heads, head_dim)
        out = ours.attend_unroped(layer, q, k, v, cos, sin)
        assert out is not None, "the kernel applies here, yet attend_unroped declined"
        expected = theirs(layer, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stores[0].keys, stores[1].keys, atol=1e-6, rtol=0)
    torch.testing.assert_close(stores[0].values, stores[1].values, atol=0, rtol=0)
    # Where the kernel does not apply, it declines and the model ropes and calls as before.
    assert TreeAttention(stores[1], plan, scale=head_dim**-0.5, kernel=None).attend_unroped(0, q, k, v, cos, sin) is None


@pytest.mark.parametrize("rows", [[0, 37, 69, 70], [70], []])
def test_outputs_of_some_rows_only_equal_those_rows_of_the_whole_call(kernel, rows):
    # The model's last layer wants the logits rows' outputs alone, and every row's k, v
    # stored: the call stores them all and attends for those rows (rope at their angles).
    num_heads, num_kv_heads, head_dim = 8, 4, 64
    generator = torch.Generator().manual_seed(10)
    segments = [SegmentKV(0, None, 0, 200), SegmentKV(1, 0, 200, 90), SegmentKV(2, 0, 290, 40)]
    plan = plan_attention(segments, [QueryRun(1, 0, 20, 70), QueryRun(2, 70, 39, 1)])
    stores = [KVStore(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity_tokens=330,
                      dtype=torch.float32, device="cpu") for _ in range(2)]  # fmt: skip
    for store in stores:
        store.keys.copy_(torch.randn(store.keys.shape, generator=generator.manual_seed(11)))
        store.values.copy_(torch.randn(store.values.shape, generator=generator.manual_seed(12)))
    positions = torch.cat([torch.arange(220, 290), torch.tensor([239])])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = rope_angles(positions, inv_freq)
    q = torch.randn(71, num_heads, head_dim, generator=generator)
    k, v = (torch.randn(71, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    whole = TreeAttention(stores[0], plan, scale=head_dim**-0.5, kernel=kernel).attend_unroped(0, q, k, v, cos, sin)
    wanted = torch.tensor(rows, dtype=torch.long)
    some = TreeAttention(stores[1], plan, scale=head_dim**-0.5, kernel=kernel).attend_unroped(
        0, q, k, v, cos, sin, rows=wanted
    )
    assert some.shape == (len(rows), num_heads, head_dim)
    torch.testing.assert_close(some, whole[wanted], atol=1e-6, rtol=0)
    torch.testing.assert_close(stores[1].keys, stores[0].keys, atol=0, rtol=0)
    torch.testing.assert_close(stores[1].values, stores[0].values, atol=0, rtol=0)


@pytest.mark.parametrize("rows", [3, 300])  # 300 × 512: past the size that goes parallel
def test_residual_add_and_rms_norm_in_one_pass_equal_the_two_ops(kernel, rows):
    generator = torch.Generator().manual_seed(9)
    x, delta = (torch.randn(rows, 512, generator=generator) * 4 for _ in range(2))
    weight = torch.rand(512, generator=generator) + 0.5
    expected_x = x + delta
    expected = torch.rms_norm(expected_x, (512,), weight, 1e-6)
    out = kernel.add_rms_norm(x, delta, weight, 1e-6)
    torch.testing.assert_close(x, expected_x, atol=0, rtol=0)  # the residual stream, in place
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pieces_cover_each_row_keys_once(native_kernel):
    one_row = plan_attention([SegmentKV(0, None, 0, 1500)], [QueryRun(0, 0, 1499, 1)])
    plan = c_kernel.KernelPlan.of(
        one_row, group=4, num_kv_heads=1, num_threads=4, dot_max_queries=native_kernel.dot_max_queries
    )
    tasks = plan.tasks.tolist()
    assert len(tasks) == 5  # 8 tasks wanted, pieces of at least MIN_SPLIT_KEYS (256) keys
    assert [t[0] for t in tasks] == [0, 300, 600, 900, 1200]
    assert sum(plan.entry_visible.tolist()) == 1500
    assert plan.row_ptr.tolist() == [0, 5]


def test_pieces_of_a_chunks_range_are_not_chained_back_together(kernel):
    # One 16-row chunk over 1,500 keys, one kv head (64 queries: the lanes path): too few tasks,
    # so the range is split in pieces; the pieces are the same rows, but stay tasks of their own.
    parents, lengths, runs = (None,), (1500,), ((0, 1484, 16),)
    run_case(Case(parents, lengths, runs, (4, 1)), kernel=kernel, head_dim=64, seed=13)
    chunk = plan_attention([SegmentKV(0, None, 0, 1500)], [QueryRun(0, 0, 1484, 16)])
    plan = c_kernel.KernelPlan.of(chunk, group=4, num_kv_heads=1, num_threads=4, dot_max_queries=kernel.dot_max_queries)
    assert plan.num_tasks == plan.tasks.shape[0] == 5 and set(plan.tasks[:, 5].tolist()) == {-1}


def test_decode_rows_split_by_keys_never_by_head(native_kernel):
    # Four sequences decoding (2 queries a kv head each: the dot-product path, which reads each
    # key slot whole for all heads): too few tasks for 2 threads × 2, so the ranges are split
    # in key pieces, each a task over every kv head.
    segments = [SegmentKV(i, None, 1500 * i, 1500) for i in range(4)]
    plan = plan_attention(segments, [QueryRun(i, i, 1499, 1) for i in range(4)])
    kernel_plan = c_kernel.KernelPlan.of(
        plan, group=2, num_kv_heads=4, num_threads=4, dot_max_queries=native_kernel.dot_max_queries
    )
    tasks = kernel_plan.tasks.tolist()
    assert {t[4] for t in tasks} == {-1} and len(tasks) == 8  # 2 pieces of 750 keys each
    assert sum(kernel_plan.entry_visible.tolist()) == 4 * 1500


def test_where_the_kernel_runs(native_kernel):
    def store(head_dim=32, dtype=torch.float32):
        return KVStore(num_layers=1, num_kv_heads=2, head_dim=head_dim, capacity_tokens=8, dtype=dtype, device="cpu")

    plan = plan_attention([SegmentKV(0, None, 0, 8)], [QueryRun(0, 0, 0, 8)])
    # "auto": fp32 or bf16, CPU, D 32, where its attention is the faster (not x86 without AVX-512)
    wins = native_kernel.vector_bytes == 64 or platform.machine() != "x86_64"
    assert TreeAttention(store(), plan, scale=1.0).kernel is (native_kernel if wins else None)
    assert span_kernel.attention_wins(native_kernel) == wins
    assert TreeAttention(store(dtype=torch.bfloat16), plan, scale=1.0).kernel is (native_kernel if wins else None)
    assert TreeAttention(store(dtype=torch.float16), plan, scale=1.0).kernel is None
    assert TreeAttention(store(head_dim=24), plan, scale=1.0).kernel is None  # D not 16·n
    assert TreeAttention(store(), plan, scale=1.0, fused=True).kernel is None  # forced
    assert TreeAttention(store(), plan, scale=1.0, kernel=None).kernel is None


@pytest.mark.parametrize("heads", [(8, 4), (14, 2)])
def test_a_bf16_store_gives_what_an_fp32_store_of_the_same_values_gives(kernel, heads):
    # A bf16 model's keys and values are stored as bf16 (half the bytes) and read back exactly;
    # q and every sum stay fp32, the output is rounded to bf16 once. So the call over a bf16
    # store equals the fp32 one over the same values, up to that last rounding.
    num_heads, num_kv_heads = heads
    head_dim, generator = 64, torch.Generator().manual_seed(21)
    segments = [SegmentKV(0, None, 0, 200), SegmentKV(1, 0, 200, 90), SegmentKV(2, 0, 290, 40)]
    plan = plan_attention(segments, [QueryRun(1, 0, 20, 70), QueryRun(2, 70, 39, 1)])
    stores = {dtype: KVStore(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity_tokens=330,
                             dtype=dtype, device="cpu") for dtype in (torch.bfloat16, torch.float32)}  # fmt: skip
    old = torch.randn(stores[torch.float32].keys.shape, generator=generator).bfloat16()
    for store in stores.values():
        store.keys.copy_(old)
        store.values.copy_(old.flip(1))
    q = torch.randn(71, num_heads, head_dim, generator=generator).bfloat16()
    k, v = (torch.randn(71, num_kv_heads, head_dim, generator=generator).bfloat16() for _ in range(2))
    ours = TreeAttention(stores[torch.bfloat16], plan, scale=head_dim**-0.5, kernel=kernel)(0, q, k, v)
    exact = TreeAttention(stores[torch.float32], plan, scale=head_dim**-0.5, kernel=kernel)(0, q.float(), k.float(), v.float())
    assert ours.dtype == torch.bfloat16
    assert torch.equal(stores[torch.bfloat16].keys.float(), stores[torch.float32].keys)  # stored exactly
    assert torch.equal(stores[torch.bfloat16].values.float(), stores[torch.float32].values)
    torch.testing.assert_close(ours, exact.bfloat16(), atol=0, rtol=2**-8)  # at most the one rounding's step


@pytest.mark.parametrize("rows", [3, 300])
def test_residual_add_and_rms_norm_in_bf16_round_as_transformers(kernel, rows):
    # transformers in bf16: x = bf16(x + delta); out = weight * bf16(x32 * rsqrt(mean(x32²) + eps)).
    generator = torch.Generator().manual_seed(19)
    x, delta = ((torch.randn(rows, 512, generator=generator) * 4).bfloat16() for _ in range(2))
    weight = (torch.rand(512, generator=generator) + 0.5).bfloat16()
    expected_x = x + delta
    x32 = expected_x.float()
    expected = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    out = kernel.add_rms_norm(x, delta, weight, 1e-6)
    assert torch.equal(x, expected_x)  # the residual stream, in place
    assert out.dtype == torch.bfloat16 and (out != expected).float().mean() < 5e-3  # fp32 sum order only
    torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)
