"""Our dense products (kernels/dense.c) on our thread pool (kernels/pool.c) equal PyTorch's.

Shapes cross what the kernel does in pieces: 6-row register blocks and their remainders,
96-row blocks above 144 rows, 64-column panels and a last partial one, k in blocks of 1,024
with a remainder, products too small to share. And the pool itself: loops from several
threads at once (one runs on the pool, the others in their own thread), a forked child
(the workers do not survive fork), and no task left out.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F

from prefixbatch.executors.native.dense import PackedWeight, onednn_available
from prefixbatch.executors.native.span_kernel import load_span_kernel

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc"))


@pytest.fixture(scope="module")
def kernel():
    if not HAS_COMPILER:
        pytest.skip("needs a C compiler to build the kernel")
    built = load_span_kernel()
    assert built is not None, "a C compiler is on PATH, yet the kernel library did not build"
    if not built.has_dense:
        pytest.skip("our dense kernel needs AVX-512; this CPU keeps oneDNN's")
    return built


def reference(x, weight, bias, then, other):
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    if then == "swish":
        y = F.silu(y)
    elif then == "times":
        y = y * other.double()
    return y


@pytest.mark.parametrize("rows", [1, 5, 6, 13, 64, 145, 300])
@pytest.mark.parametrize(("num_in", "num_out"), [(100, 72), (512, 1408), (1100, 130), (64, 64)])
@pytest.mark.parametrize("then", ["none", "swish", "times"])
def test_products_equal_pytorchs(kernel, rows, num_in, num_out, then):
    generator = torch.Generator().manual_seed(rows * 7919 + num_in + num_out)
    weight = torch.randn(num_out, num_in, generator=generator) / num_in**0.5
    x = torch.randn(rows, num_in, generator=generator) * 3
    bias = torch.randn(num_out, generator=generator) if num_out != 64 else None
    other = torch.randn(rows, num_out, generator=generator) if then == "times" else None
    packed = PackedWeight.of(weight)
    assert packed.kernel is kernel  # ours, not oneDNN's
    if then == "times":
        y = packed.linear_times(x, other, bias)
    else:
        y = packed.linear(x, bias, then=then)
    expected = reference(x, weight, bias, then, other)
    assert y.shape == (rows, num_out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)  # fp32 sums of up to 1,100 terms


@pytest.mark.skipif(not onednn_available(), reason="needs oneDNN")
@pytest.mark.parametrize("then", ["none", "swish", "times"])
def test_onednns_products_where_ours_is_not_available_equal_pytorchs(then):
    generator = torch.Generator().manual_seed(5)
    weight, x = torch.randn(130, 300, generator=generator) / 300**0.5, torch.randn(50, 300, generator=generator)
    bias, other = torch.randn(130, generator=generator), torch.randn(50, 130, generator=generator)
    packed = PackedWeight.of(weight, ours=False)
    assert packed.kernel is None
    y = packed.linear_times(x, other, bias) if then == "times" else packed.linear(x, bias, then=then)
    torch.testing.assert_close(y.double(), reference(x, weight, bias, then, other), rtol=1e-4, atol=1e-4)


def test_no_rows_gives_an_empty_product(kernel):
    packed = PackedWeight.of(torch.randn(72, 100))
    assert packed.linear(torch.empty(0, 100), None).shape == (0, 72)


def test_swish_is_right_far_out_on_both_sides(kernel):
    # One input column, weight 1: y = x; silu must stay finite and exact where exp over- or underflows.
    x = torch.tensor([[-1000.0], [-90.0], [-20.0], [-1e-3], [0.0], [1e-3], [20.0], [90.0], [1000.0]])
    y = PackedWeight.of(torch.ones(16, 1)).linear(x, None, then="swish")
    torch.testing.assert_close(y[:, 0].double(), F.silu(x[:, 0].double()), rtol=1e-6, atol=1e-30)


def test_loops_from_several_threads_at_once_all_finish_right(kernel):
    # One thread's loop runs on the pool; the others, finding it busy, run theirs themselves.
    weight = torch.randn(1408, 512) / 512**0.5
    packed = PackedWeight.of(weight)
    inputs = [torch.randn(200, 512, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [packed.linear(x, None) for x in inputs]
    results: dict[int, list[torch.Tensor]] = {}

    def work(i: int) -> None:
        results[i] = [packed.linear(inputs[i], None) for _ in range(30)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    for i in range(4):
        assert all(torch.equal(y, expected[i]) for y in results[i])


def _product_in_child(queue, threads: int, one_cpu: bool) -> None:
    # PyTorch's own ops stay on one thread here (GNU OpenMP's threads do not survive fork
    # either); the library's loops are asked for `threads`.
    torch.set_num_threads(1)
    if one_cpu:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    kernel = load_span_kernel()
    library = kernel.library
    weight, x = torch.ones(130, 600), torch.ones(300, 600)
    packed = torch.empty(library.pb_dense_packed_floats(130, 600))
    library.pb_dense_pack(weight.data_ptr(), 130, 600, packed.data_ptr(), threads)
    y = torch.empty(300, 130)
    for _ in range(20):
        library.pb_dense(x.data_ptr(), 300, 600, packed.data_ptr(), 130, None, 0, None, y.data_ptr(), threads)
    queue.put(float(y.double().sum()))


@pytest.mark.parametrize(("threads", "one_cpu"), [(2, False), (3, False), (2, True)])
def test_a_forked_child_runs_loops_to_the_end(kernel, threads, one_cpu):
    # The parent's workers do not exist in the child: its loops must neither wait for them nor
    # lose their tasks (the child starts workers of its own: one a CPU and pinned with as many
    # threads as CPUs, else threads - 1 wherever the scheduler puts them).
    torch.set_num_threads(2)
    PackedWeight.of(torch.ones(130, 600)).linear(torch.ones(300, 600), None)  # the parent's workers run
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_product_in_child, args=(queue, threads, one_cpu))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the child hung or died running a loop after fork"
    assert queue.get(timeout=5) == 300 * 130 * 600.0


def test_no_task_is_skipped(kernel):
    # Outputs land in memory the last product just freed: a task not run would leave the
    # previous product's values behind.
    torch.set_num_threads(2)
    packed = PackedWeight.of(torch.ones(1408, 7))
    for i in range(1, 51):
        y = packed.linear_times(torch.ones(400, 7), torch.full((400, 1408), float(i)), None)
        assert torch.equal(y, torch.full((400, 1408), 7.0 * i))


def bf16_reference(x, weight, bias, then, other):
    """What transformers' bf16 modules compute: each op's result rounded to bf16."""
    y = F.linear(x, weight, bias)  # bf16 in, fp32 sums, bf16 out
    if then == "swish":
        return F.silu(y)
    return y * other if then == "times" else y


@pytest.mark.parametrize("rows", [1, 6, 13, 145])
@pytest.mark.parametrize(("num_in", "num_out"), [(100, 72), (512, 1408), (2200, 130)])  # 2,200: two k blocks
@pytest.mark.parametrize("then", ["none", "swish", "times"])
def test_bf16_products_round_as_pytorchs_bf16_ops(kernel, rows, num_in, num_out, then):
    if not kernel.has_dense_bf16:
        pytest.skip("our bf16 products need AVX512-BF16; this CPU keeps oneDNN's or PyTorch's")
    generator = torch.Generator().manual_seed(rows * 31 + num_in + num_out)
    weight = (torch.randn(num_out, num_in, generator=generator) / num_in**0.5).bfloat16()
    x = (torch.randn(rows, num_in, generator=generator) * 3).bfloat16()
    bias = torch.randn(num_out, generator=generator).bfloat16()
    other = torch.randn(rows, num_out, generator=generator).bfloat16() if then == "times" else None
    packed = PackedWeight.of(weight)
    assert packed.kernel is kernel and packed.packed.dtype == torch.bfloat16
    y = packed.linear_times(x, other, bias) if then == "times" else packed.linear(x, bias, then=then)
    expected = bf16_reference(x, weight, bias, then, other)
    assert y.shape == (rows, num_out) and y.dtype == torch.bfloat16
    # The fp32 sums run in another order than PyTorch's: a sum on a rounding boundary may round
    # the other way — one bf16 step (2^-8 of the value, relative), at a few elements in a thousand.
    differ = y != expected
    assert differ.float().mean() < 5e-3, differ.float().mean()
    torch.testing.assert_close(y.float(), expected.float(), rtol=2**-7, atol=1e-2)
