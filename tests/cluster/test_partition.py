"""Range partitioning by leading tokens (`cluster.plan_on: workers`), on the driver's keys alone."""

from __future__ import annotations

import numpy as np

from prefixbatch.cluster.partition import KEY_TOKENS, ChunkKeys, partition_rows


def keys_of(prompts: list[list[int]], rows: list[int], max_tokens: int = 8, error_rows=()) -> ChunkKeys:
    keys = np.full((len(prompts), KEY_TOKENS), -1, np.int32)
    for i, prompt in enumerate(prompts):
        keys[i, : min(len(prompt), KEY_TOKENS)] = prompt[:KEY_TOKENS]
    lengths = np.array([len(p) for p in prompts], np.int64)
    return ChunkKeys(np.array(rows, np.int64), keys, lengths + max_tokens, lengths, np.array(error_rows, np.int64), 0, 0)


def test_partitions_follow_long_shared_prefixes_not_the_input_order():
    rng = np.random.default_rng(0)
    systems = [list(rng.integers(10, 1000, 300)) for _ in range(4)]  # longer than the key
    sizes = [30, 34, 28, 36]  # uneven groups: the exact work target falls inside a group
    prompts, system_of = [], []
    for s, size in enumerate(sizes):
        for _ in range(size):
            prompts.append(systems[s] + list(rng.integers(10, 1000, 12)))
            system_of.append(s)
    order = rng.permutation(len(prompts))  # the input order says nothing
    rows = list(range(len(prompts)))
    # Two files' worth of keys, and row 5 has two samples (two requests, one row).
    first, second = order[:60], order[60:]
    chunks = [
        keys_of([prompts[i] for i in first], [int(i) for i in first]),
        keys_of([prompts[i] for i in second] + [prompts[5]], [int(i) for i in second] + [5], error_rows=[200, 201, 202]),
    ]
    parts = partition_rows(chunks, 4)
    assert len(parts) == 4
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == rows + [200, 201, 202]  # every row once, samples together
    by_system = [{system_of[r] for r in p.tolist() if r < len(prompts)} for p in parts]
    assert all(len(s) == 1 for s in by_system) and len(set.union(*by_system)) == 4  # one prefix each
    assert [r for p in parts for r in p.tolist() if r >= 200] == [200, 201, 202]  # error rows spread
    assert sum(any(r >= 200 for r in p.tolist()) for p in parts) == 3


def test_few_requests_give_fewer_partitions():
    parts = partition_rows([keys_of([[1, 2, 3]], [0])], 4)
    assert [p.tolist() for p in parts] == [[0]]
