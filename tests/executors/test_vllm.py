"""`executor.kind: vllm` against the native engine and the hf oracle, on real tiny checkpoints.

vLLM's CPU build runs in this process (one engine per test model for the whole session: a
start costs seconds). Greedy outputs must equal `native` (itself equal to hf token for
token) and hf for every request; vLLM reuses a shared prefix in whole blocks of its cache,
so the prompt tokens it computes are at most the planner's unique tokens plus one partial
block per request. Seeded samples do not depend on batch mates or order: vLLM draws each
seeded request from its own generator (its documented guarantee is per-request seeds; the
kernels' rounding could still differ with the batch, which these tests would catch).

The engines start in this process, before any test imports Flask: vLLM's CPU start-up walks
every imported module's globals and fails on Flask's context proxies (the S3 tests' moto
server); whole jobs run in processes of their own (`tests/jobs/test_vllm_jobs.py`).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from tests.executors.native.test_engine import by_request, make_requests
from tests.executors.planned import planned
from tests.vllm_import import import_vllm

import_vllm()

# nobind: vLLM would pin this test process's OpenMP threads (the engine runs in it) for the tests after.
SPEC = ExecutorSpec(kind="vllm", device="cpu", vllm={"cpu_kv_cache_gib": 1, "cpu_threads_bind": "nobind"})


@pytest.fixture(scope="session")
def vllm_engines():
    """One vLLM executor per test model, started once."""
    from prefixbatch.executors.vllm_engine import VllmExecutor

    engines: dict = {}

    def get(model_dir):
        if model_dir not in engines:
            engines[model_dir] = VllmExecutor(ModelSpec(path=str(model_dir), dtype="float32"), SPEC)
        return engines[model_dir]

    return get


def fresh_stats(executor):
    from prefixbatch.executors.base import ExecutorStats

    executor.stats = ExecutorStats()
    return executor


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_vllm_greedy_equals_native_and_hf(model_name, request, vllm_engines):
    model_dir = request.getfixturevalue(model_name)
    requests = make_requests(model_dir)
    model = ModelSpec(path=str(model_dir), dtype="float32")
    executor = fresh_stats(vllm_engines(model_dir))
    work = planned(requests, SPEC, kind="vllm")
    got = by_request(executor.generate(work))
    native = by_request(NativeExecutor(model, ExecutorSpec(kind="native", device="cpu")).generate(planned(requests)))
    hf = by_request(HfExecutor(model, ExecutorSpec(kind="hf", device="cpu")).generate(planned(requests, kind="hf")))
    assert got.keys() == native.keys() == hf.keys()
    for key in native:
        row = (got[key].token_ids, got[key].finish_reason, got[key].text)
        assert row == (native[key].token_ids, native[key].finish_reason, native[key].text) == (
            hf[key].token_ids, hf[key].finish_reason, hf[key].text), key
    unique = work.plan.stats.num_unique_tokens
    prompt_tokens = sum(r.num_prompt_tokens for r in requests)
    computed = executor.stats.num_prefill_tokens
    assert computed <= unique + len(requests) * (executor.block_size - 1)  # whole blocks only
    assert computed < prompt_tokens  # the prefix cache really served shared prefixes
    assert sum(c.num_cached_prompt_tokens for c in got.values()) == prompt_tokens - computed
    assert executor.stats.num_groups == work.plan.num_groups


def test_vllm_seeded_samples_do_not_depend_on_batch_mates_or_order(tiny_llama, vllm_engines):
    requests = make_requests(tiny_llama, temperature=0.9)
    executor = vllm_engines(tiny_llama)
    together = by_request(executor.generate(planned(requests, SPEC, kind="vllm")))
    shuffled = requests[:]
    random.Random(3).shuffle(shuffled)
    reordered = by_request(executor.generate(planned(shuffled, SPEC, kind="vllm")))
    for r in requests[::5] + requests[-3:]:
        alone = next(iter(executor.generate(planned([r], SPEC, kind="vllm"))))
        assert alone.token_ids == together[(r.row_index, r.sample_index)].token_ids
    assert all(together[k].token_ids == reordered[k].token_ids for k in together)
    samples = [together[(len(requests) - 3, k)].token_ids for k in (1, 2, 3)]
    assert len(set(samples)) > 1  # samples of one prompt differ (their own seeds)


def test_vllm_penalties_min_tokens_and_logprobs_equal_native(tiny_llama, vllm_engines):
    options = {"repetition_penalty": 1.3, "presence_penalty": 0.6, "frequency_penalty": 0.4, "min_tokens": 3,
               "logprobs": 3}
    requests = [replace(r, sampling=replace(r.sampling, **options)) for r in make_requests(tiny_llama)]
    requests = [r for r in requests if r.sampling.is_greedy]
    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    got = by_request(fresh_stats(vllm_engines(tiny_llama)).generate(planned(requests, SPEC, kind="vllm")))
    native = by_request(NativeExecutor(model, ExecutorSpec(kind="native", device="cpu")).generate(planned(requests)))
    assert got.keys() == native.keys()
    for key, completion in native.items():
        assert got[key].token_ids == completion.token_ids, key
        for a, b in zip(got[key].logprobs, completion.logprobs, strict=True):
            assert a.token_id == b.token_id and a.token == b.token
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4, rel=3e-5)
            assert [i for i, _, _ in a.top] == [i for i, _, _ in b.top]


def test_vllm_logit_bias_equals_native(tiny_llama, vllm_engines):
    # Greedy: the bias moves the argmax the same way in both (a ban and a nudge); min_p passes
    # through (sampled rows draw from vLLM's own generator, so only its acceptance is checked).
    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    native = NativeExecutor(model, ExecutorSpec(kind="native", device="cpu"))
    plain = by_request(native.generate(planned(make_requests(tiny_llama))))
    banned = next(iter(plain.values())).token_ids[0]
    options = {"logit_bias": ((banned, -100.0), (17, 4.0)), "min_p": 0.1}
    requests = [replace(r, sampling=replace(r.sampling, **options)) for r in make_requests(tiny_llama)]
    requests = [r for r in requests if r.sampling.is_greedy]
    got = by_request(fresh_stats(vllm_engines(tiny_llama)).generate(planned(requests, SPEC, kind="vllm")))
    expected = by_request(native.generate(planned(requests)))
    assert got.keys() == expected.keys()
    assert all(got[key].token_ids == completion.token_ids for key, completion in expected.items())
    assert all(banned not in completion.token_ids for completion in expected.values())


def test_vllm_scoring_prompt_logprobs_and_structured_output_equal_native(tiny_llama, vllm_engines):
    import json

    from tests.executors.test_logprobs_penalties import PEAKED_TOLERANCE, score_requests
    from tests.executors.test_structured import constrained_requests

    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    native_executor = NativeExecutor(model, ExecutorSpec(kind="native", device="cpu"))
    vllm = fresh_stats(vllm_engines(tiny_llama))
    scoring = score_requests(tiny_llama)
    got = by_request(vllm.generate(planned(scoring, SPEC, kind="vllm")))
    native = by_request(native_executor.generate(planned(scoring)))
    assert got.keys() == native.keys()
    for key, completion in native.items():
        assert got[key].finish_reason == "scored" and got[key].token_ids == completion.token_ids
        assert got[key].continuation_logprob == pytest.approx(completion.continuation_logprob, **PEAKED_TOLERANCE)
        assert got[key].continuation_is_greedy is completion.continuation_is_greedy
    asked = [replace(r, sampling=replace(r.sampling, prompt_logprobs=2)) for r in make_requests(tiny_llama)[:6]]
    got = by_request(vllm.generate(planned(asked, SPEC, kind="vllm")))
    native = by_request(native_executor.generate(planned(asked)))
    for key, completion in native.items():
        assert [t.token_id for t in got[key].prompt_logprobs] == [t.token_id for t in completion.prompt_logprobs]
        for a, b in zip(got[key].prompt_logprobs, completion.prompt_logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, **PEAKED_TOLERANCE)
            assert [i for i, _, _ in a.top] == [i for i, _, _ in b.top]
    constrained = constrained_requests(tiny_llama, 30)
    constrained[1] = replace(constrained[1], sampling=replace(constrained[1].sampling, regex="(["))  # a regex row
    got = by_request(vllm.generate(planned(constrained, SPEC, kind="vllm")))
    native = by_request(native_executor.generate(planned(constrained)))
    assert got[1, 0].error.startswith("invalid_constraint: regex does not compile")
    same = sum(got[key].token_ids == completion.token_ids for key, completion in native.items())
    assert same >= len(native) - 2  # greedy under the same grammar: the same tokens (fp32 rounding aside)
    for key, completion in got.items():
        if completion.finish_reason == "stop" and constrained[key[0]].sampling.json_schema is not None:
            json.loads(completion.text)


def test_a_small_cache_admits_groups_one_after_another(tiny_llama, vllm_engines):
    """The plan's groups go in as the engine's real cache allows: never more in flight."""
    executor = fresh_stats(vllm_engines(tiny_llama))
    requests = make_requests(tiny_llama)
    spec = ExecutorSpec(kind="vllm", device="cpu", kv_budget_tokens=150)
    work = planned(requests, spec, kind="vllm")
    assert work.plan.num_groups > 1
    real = executor.kv_cache_tokens
    try:
        executor.kv_cache_tokens = 300  # as if the engine held only this much
        got = by_request(executor.generate(work))
    finally:
        executor.kv_cache_tokens = real
    assert len(got) == len(requests)
    largest = max(executor._group_need(work.plan.group(g).num_kv_tokens, n)
                  for g, n in enumerate(len(members) for members in work.groups()))
    assert executor.stats.peak_kv_tokens <= max(300, largest)
    assert executor.stats.num_groups == work.plan.num_groups


def test_the_plan_budget_is_the_engine_cache(tiny_llama, vllm_engines, tmp_path):
    from prefixbatch.jobs.planning import resolve_job_executor
    from prefixbatch.jobs.spec import spec_from_dict

    spec = spec_from_dict(
        {"name": "x", "input": {"path": "in.parquet", "prompt_column": "p"}, "output": {"path": "out"},
         "model": {"path": str(tiny_llama)}, "executor": SPEC.model_dump()},
        base_dir=tmp_path, source="job.yaml",
    )
    assert resolve_job_executor(spec).kv_budget_tokens == vllm_engines(tiny_llama).kv_cache_tokens == 2**30 // 2048



def test_a_request_vllm_refuses_is_an_error_row_and_the_others_run(tiny_qwen2):
    from dataclasses import replace

    from prefixbatch.executors.vllm_engine import VllmExecutor

    spec = SPEC.model_copy(update={"vllm": SPEC.vllm.model_copy(update={"max_model_len": 64})})
    executor = VllmExecutor(ModelSpec(path=str(tiny_qwen2), dtype="float32"), spec)
    requests = make_requests(tiny_qwen2)[:3]
    too_long = replace(requests[0], row_index=99, sample_index=1, token_ids=requests[0].token_ids * 8)
    got = by_request(executor.generate(planned([*requests, too_long], spec, kind="vllm")))
    assert got.keys() == {(r.row_index, r.sample_index) for r in [*requests, too_long]}
    refused = got[(99, 1)]
    assert refused.finish_reason == "error" and refused.error.startswith("executor_refused: vLLM refused the request")
    assert all(got[(r.row_index, r.sample_index)].finish_reason in ("stop", "length") for r in requests)
