"""The span kernel against PyTorch's attention kernels, one layer of one step, same process.

Each case is a real segment tree in a `KVStore` and a real step planned by `plan_attention`;
`TreeAttention` runs it once with our C kernel (`span_kernel`) and once with PyTorch's
kernels (`kernel=None`: fused flash attention per span, narrow spans gathered), alternating,
median of `--repeats` calls of one layer (its KV write included, the same in both).

    prefill   a 512-token chunk of a segment under a 1,024-token shared prefix
    decode-a  64 rows under one 1,024-token prefix, each 96 tokens into its own segment (job a)
    decode-b  4 instructions (128) x 8 blocks (256) x 8 rows, each 48 own tokens (job b)
    decode-c  64 rows with nothing shared, 48-560 keys each (job c)

    .venv/bin/python benchmarks/span_kernel_bench.py
    .venv/bin/python benchmarks/span_kernel_bench.py --heads 14,2   # the Qwen2.5-0.5B shape
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.tree import TreeAttention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.span_kernel import load_span_kernel

HEAD_DIM = 64


def tree(parents: list[int | None], lengths: list[int], runs: list[tuple[int, int, int]]):
    """(segments, runs) with segments stored back to back; runs (segment, offset, tokens)."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stored = list(lengths)
    for segment, offset, num_tokens in runs:
        stored[segment] = offset + num_tokens
    segments = [SegmentKV(i, p, int(s), n) for i, (p, s, n) in enumerate(zip(parents, starts, stored))]
    query_runs, row = [], 0
    for segment, offset, num_tokens in runs:
        query_runs.append(QueryRun(segment, row, offset, num_tokens))
        row += num_tokens
    return segments, query_runs, sum(lengths)


def cases() -> dict:
    rng = np.random.default_rng(0)
    c_lengths = [int(n) for n in rng.integers(48, 560, 64)]
    b_parents, b_lengths, b_runs = [], [], []
    for _ in range(4):
        b_parents.append(None)
        b_lengths.append(128)
        instruction = len(b_parents) - 1
        for _ in range(8):
            b_parents.append(instruction)
            b_lengths.append(256)
            block = len(b_parents) - 1
            for _ in range(8):
                b_parents.append(block)
                b_lengths.append(48)
                b_runs.append((len(b_parents) - 1, 47, 1))
    return {
        "prefill": tree([None, 0], [1024, 512], [(1, 0, 512)]),
        "decode-a": tree([None, *[0] * 64], [1024, *[96] * 64], [(i, 95, 1) for i in range(1, 65)]),
        "decode-b": tree(b_parents, b_lengths, b_runs),
        "decode-c": tree([None] * 64, c_lengths, [(i, n - 1, 1) for i, n in enumerate(c_lengths)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="8,4", help="query heads, kv heads (default: the `small` model)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_heads, num_kv_heads = (int(x) for x in args.heads.split(","))
    kernel = load_span_kernel()
    if kernel is None:
        raise SystemExit("the span kernel could not be built here (see the warning above)")
    print(f"heads {num_heads}/{num_kv_heads}, head size {HEAD_DIM}, {args.threads} threads, median of {args.repeats}\n")
    print("| case | rows | span kernel ms | PyTorch's kernels ms | speed-up |\n|---|---|---|---|---|")
    for name, (segments, runs, capacity) in cases().items():
        store = KVStore(num_layers=1, num_kv_heads=num_kv_heads, head_dim=HEAD_DIM, capacity_tokens=capacity,
                        dtype=torch.float32, device="cpu")
        store.keys.normal_()
        store.values.normal_()
        plan = plan_attention(segments, runs)
        q = torch.randn(plan.num_rows, num_heads, HEAD_DIM)
        k = torch.randn(plan.num_rows, num_kv_heads, HEAD_DIM)
        v = torch.randn(plan.num_rows, num_kv_heads, HEAD_DIM)
        ours = TreeAttention(store, plan, scale=HEAD_DIM**-0.5, kernel=kernel)
        theirs = TreeAttention(store, plan, scale=HEAD_DIM**-0.5, kernel=None)
        torch.testing.assert_close(ours(0, q, k, v), theirs(0, q, k, v), atol=1e-4, rtol=0)
        times = {ours: [], theirs: []}
        for _ in range(args.repeats):
            for attention in (ours, theirs):
                started = time.perf_counter()
                attention(0, q, k, v)
                times[attention].append(time.perf_counter() - started)
        a, b = (statistics.median(times[x]) * 1e3 for x in (ours, theirs))
        print(f"| {name} | {plan.num_rows} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
