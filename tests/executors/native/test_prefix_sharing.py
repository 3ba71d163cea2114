"""`executor.prefix_sharing: false`, the ablation: every prompt prefilled in full, same outputs."""

from __future__ import annotations

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from tests.executors.native.test_engine import by_request, make_requests
from tests.executors.planned import planned


def test_without_sharing_outputs_equal_hf_and_every_prompt_is_prefilled(tiny_llama):
    requests = make_requests(tiny_llama)
    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    want = by_request(HfExecutor(model, ExecutorSpec(kind="hf", device="cpu")).generate(planned(requests, kind="hf")))
    spec = ExecutorSpec(kind="native", device="cpu", kv_budget_tokens=2_000, prefix_sharing=False)
    executor = NativeExecutor(model, spec)
    got = by_request(executor.generate(planned(requests, spec)))

    assert got.keys() == want.keys()
    for key, completion in want.items():
        assert (got[key].token_ids, got[key].finish_reason) == (completion.token_ids, completion.finish_reason), key
    total = sum(r.num_prompt_tokens for r in requests)
    assert executor.stats.num_prefill_tokens == total
    assert all(c.num_cached_prompt_tokens == 0 for c in got.values())
    assert 0 < executor.stats.peak_kv_tokens <= 2_000


def test_peak_kv_counts_the_shared_prefix_once(tiny_llama):
    requests = make_requests(tiny_llama)
    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    peaks = {}
    for share in (True, False):
        spec = ExecutorSpec(kind="native", device="cpu", prefix_sharing=share)
        executor = NativeExecutor(model, spec)
        list(executor.generate(planned(requests, spec)))
        peaks[share] = executor.stats.peak_kv_tokens
    # One group holds the whole job: every prompt's KV (or the tree's) plus every output segment.
    outputs = sum(r.sampling.max_tokens for r in requests)
    assert peaks[False] == sum(r.num_prompt_tokens for r in requests) + outputs
    assert outputs < peaks[True] < peaks[False]
