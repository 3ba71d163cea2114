"""The native engine end to end against the hf oracle, on jobs with heavy prefix sharing.

Greedy outputs must be token-for-token identical to transformers `generate` for every
request; every shared segment is prefilled exactly once (prefill tokens == the planner's
unique tokens); sampled requests do not depend on their batch mates or the job's order.
"""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native import span_kernel
from prefixbatch.executors.native.dense import packing_available
from prefixbatch.executors.native.executor import NativeExecutor
from prefixbatch.executors.native.span_kernel import load_span_kernel
from prefixbatch.types import Request, SamplingParams
from tests.executors.planned import planned

SYSTEMS = [
    "You are a helpful assistant who answers questions about gardening, soil and seasons.",
    "You are a strict grammar teacher. Correct every sentence the user writes.",
    "You summarise news articles in exactly two sentences.",
]
INSTRUCTIONS = ["Translate the word into French.", "Give the opposite of the word."]
SHOTS = ["Example: cat -> chat. Example: dog -> chien.", "Example: hot -> cold. Example: up -> down.",
         "Example: big -> small."]


def job_texts() -> list[str]:
    texts = [f"{system}\nUser: question number {q} about item {q * 3}?" for system in SYSTEMS for q in range(6)]
    texts += [f"{i}\n{s}\nWord: w{w}" for i in INSTRUCTIONS for s in SHOTS for w in range(3)]  # two levels
    texts += [texts[0], texts[0], texts[20]]  # duplicate prompts
    return texts


def make_requests(model_dir, *, n: int = 3, temperature: float = 0.0) -> list[Request]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = []
    for i, text in enumerate(job_texts()):
        params = SamplingParams(max_tokens=6 + i % 7, temperature=temperature, seed=1000 + i)
        requests.append(Request(row_index=i, token_ids=tuple(tokenizer(text)["input_ids"]), sampling=params))
    # n > 1: one prompt's samples share its KV
    first = requests[1]
    row_index = len(requests)
    requests += [
        replace(first, row_index=row_index, sample_index=k, sampling=replace(first.sampling, seed=7919 * k))
        for k in range(1, n + 1)
    ]
    return requests


def by_request(completions) -> dict:
    return {(c.row_index, c.sample_index): c for c in completions}


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def hf_outputs(model_dir):
    executor = HfExecutor(ModelSpec(path=str(model_dir), dtype="float32"), ExecutorSpec(kind="hf", device="cpu"))
    return by_request(executor.generate(planned(make_requests(model_dir), kind="hf")))


# Set by `test_greedy_equals_hf_on_every_cpu_with_the_pinned_pool` for the run it starts: the
# engine as users run it, one thread a CPU (the C kernels' pool pins a worker to each).
ON_EVERY_CPU = os.environ.get("PREFIXBATCH_TEST_EVERY_CPU") == "1"
CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module", autouse=True)
def threads():
    if not ON_EVERY_CPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(len(CPUS))
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["auto", "kernel"] if ON_EVERY_CPU else ["auto"])
def attention(request, monkeypatch):
    """"auto": the attention this CPU's users get; "kernel": our C span attention (and so its
    thread pool) even where auto keeps PyTorch's (x86 builds without AVX-512)."""
    if request.param == "kernel":
        monkeypatch.setattr(span_kernel, "attention_wins", lambda kernel: True)
    return request.param


def pinned_cpus() -> set[int]:
    """The CPUs that some thread of this process is pinned to alone (the kernels' pool workers)."""
    pinned = set()
    for task in Path("/proc/self/task").iterdir():
        allowed = [line for line in (task / "status").read_text().splitlines() if line.startswith("Cpus_allowed_list:")]
        value = allowed[0].split(":", 1)[1].strip() if allowed else ""
        if value.isdigit():
            pinned.add(int(value))
    return pinned


@pytest.mark.parametrize(
    ("kv_budget", "step_tokens"),
    [(131_072, 16_384), (150, 16_384), (100, 7)],  # one group; groups split; tiny chunked steps
)
def test_native_greedy_equals_hf_and_prefills_each_prefix_once(model_dir, hf_outputs, kv_budget, step_tokens, attention):
    requests = make_requests(model_dir)
    spec = ExecutorSpec(kind="native", device="cpu", kv_budget_tokens=kv_budget, native={"max_step_tokens": step_tokens})
    executor = NativeExecutor(ModelSpec(path=str(model_dir), dtype="float32"), spec)
    work = planned(requests, spec)
    native = by_request(executor.generate(work))
    assert native.keys() == hf_outputs.keys()
    for key, want in hf_outputs.items():
        got = native[key]
        assert (got.token_ids, got.finish_reason, got.text) == (want.token_ids, want.finish_reason, want.text), key

    plan = work.plan  # the plan the engine ran
    if kv_budget < 1000:
        assert plan.num_groups > 1  # the small budget really split the job
    unique = plan.stats.num_unique_tokens
    assert executor.stats.num_prefill_tokens == unique  # every shared segment computed once
    total = sum(r.num_prompt_tokens for r in requests)
    assert sum(c.num_cached_prompt_tokens for c in native.values()) == total - unique
    assert unique < total / 2  # the job really shares
    if ON_EVERY_CPU and attention == "kernel":
        assert load_span_kernel() is not None and torch.get_num_threads() == len(CPUS)
        assert pinned_cpus() == set(CPUS)  # a worker pinned to every CPU: the pool users run


@pytest.mark.slow
@pytest.mark.skipif(len(CPUS) < 2, reason="one CPU: the pool never starts")
def test_greedy_equals_hf_on_every_cpu_with_the_pinned_pool():
    # A fresh process: the first parallel loop decides the pool (pinned when the thread count
    # is the CPU count), and this one's may have been decided by another test's count.
    env = {**os.environ, "PREFIXBATCH_TEST_EVERY_CPU": "1", "OMP_NUM_THREADS": str(len(CPUS))}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "greedy_equals_hf_and"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[3])
    assert result.returncode == 0, result.stdout[-3000:]
    assert "18 passed" in result.stdout


def test_seeded_samples_do_not_depend_on_batch_mates_or_order(tiny_llama):
    requests = make_requests(tiny_llama, temperature=0.9)
    executor = NativeExecutor(ModelSpec(path=str(tiny_llama), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))
    together = by_request(executor.generate(planned(requests)))
    shuffled = requests[:]
    random.Random(3).shuffle(shuffled)
    reordered = by_request(executor.generate(planned(shuffled)))
    alone = {
        (r.row_index, r.sample_index): next(iter(executor.generate(planned([r])))) for r in requests[::5] + requests[-3:]
    }
    for key, completion in alone.items():
        assert together[key].token_ids == reordered[key].token_ids == completion.token_ids, key
    assert all(together[k].token_ids == reordered[k].token_ids for k in together)
    samples = [together[(len(requests) - 3, k)].token_ids for k in (1, 2, 3)]
    assert len(set(samples)) > 1  # samples of one prompt differ (their own seeds)


@pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.float32), reason="needs our dense kernel or oneDNN")
def test_cpu_fp32_runs_packed_weights_and_batch_invariant_runs_dense(tiny_llama):
    model = ModelSpec(path=str(tiny_llama), dtype="float32")
    assert NativeExecutor(model, ExecutorSpec(kind="native", device="cpu")).model.is_packed
    invariant = ExecutorSpec.model_validate({"kind": "native", "device": "cpu", "native": {"batch_invariant": True}})
    assert not NativeExecutor(model, invariant).model.is_packed


def test_a_run_keeps_older_objects_out_of_the_collectors_passes_and_restores_them(tiny_llama):
    requests = make_requests(tiny_llama)[:4]
    executor = NativeExecutor(ModelSpec(path=str(tiny_llama), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))
    frozen_during = []
    for _ in executor.generate(planned(requests)):
        frozen_during.append(gc.get_freeze_count())
    assert len(frozen_during) == len(requests)
    assert min(frozen_during) > 10_000  # torch, transformers, the model: left alone during the run
    assert gc.get_freeze_count() == 0  # and handed back to the collector once it ends
    abandoned = executor.generate(planned(requests))
    next(abandoned)
    abandoned.close()  # a consumer that stops early (a stop, an error downstream)
    assert gc.get_freeze_count() == 0
