"""Logprobs, penalties and `min_tokens` in the `native` and `hf` executors, against transformers.

The oracles are plain transformers on one unpadded sequence at a time: a forward pass over
prompt + output for logprobs (fp32 log-softmax), `generate` with its own
`repetition_penalty` / `min_new_tokens`, and a plain greedy loop with OpenAI's presence and
frequency penalties written out here.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from prefixbatch.types import Completion, Request, SamplingParams
from tests.executors.planned import planned

SHARED = "You answer questions about the standard library of a programming language, briefly."
PROMPTS = [f"{SHARED}\nQ: what does item {i} do?" for i in range(5)] + [
    "def", "import os\nimport sys\n\n", "The try statement specifies exception handlers",
]
EXECUTORS = ("native", "hf")
# Logprobs within 1e-4, on `calm_llama` (conftest): the tiny random models' logits are far more peaked
# than a trained model's (std ~8: tail logprobs of -10 to -60), where fp32 rounding alone
# moves them by more than 1e-4 — transformers' own left-padded batch differs from its
# unpadded forward by up to 1.0e-4 there, the native engine by up to 1.5e-4. `calm_llama` is
# the same checkpoint with its final norm scaled down (logits std ~1.6, as trained models').
LOGPROB_TOLERANCE = {"abs": 1e-4}
# Comparisons on the peaked tiny models themselves (scores summed over several tokens).
PEAKED_TOLERANCE = {"abs": 1e-4, "rel": 3e-5}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/executors/conftest.py


@cache
def model(folder: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@cache
def executor(kind: str, folder: Path) -> NativeExecutor | HfExecutor:
    make = NativeExecutor if kind == "native" else HfExecutor
    return make(ModelSpec(path=str(folder), dtype="float32"), ExecutorSpec(kind=kind, device="cpu"))


def requests(folder: Path, **sampling: object) -> list[Request]:
    encode = AutoTokenizer.from_pretrained(folder)
    params = SamplingParams(**{"max_tokens": 12, **sampling})
    return [
        Request(row, tuple(encode(text)["input_ids"]), replace(params, seed=100 + row))
        for row, text in enumerate(PROMPTS)
    ]


def run(kind: str, folder: Path, batch: list[Request]) -> dict[tuple[int, int], Completion]:
    completions = executor(kind, folder).generate(planned(batch, kind=kind))
    return {(c.row_index, c.sample_index): c for c in completions}


def forward_logprobs(folder: Path, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: fp32 log-softmax of one unpadded forward pass."""
    with torch.inference_mode():
        logits = model(folder)(torch.tensor([tokens])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("kind", EXECUTORS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_logprobs_equal_a_transformers_forward(calm_llama: Path, kind: str, temperature: float) -> None:
    tiny_llama = calm_llama
    batch = requests(tiny_llama, logprobs=5, temperature=temperature)
    batch[1] = replace(batch[1], sampling=replace(batch[1].sampling, logprobs=0))
    batch[2] = replace(batch[2], sampling=replace(batch[2].sampling, logprobs=None))
    batch.append(replace(batch[0], sample_index=1, sampling=replace(batch[0].sampling, seed=7)))  # n = 2
    texts = executor(kind, tiny_llama).tokenizer
    compared = 0
    for key, completion in run(kind, tiny_llama, batch).items():
        request = next(r for r in batch if (r.row_index, r.sample_index) == key)
        if request.sampling.logprobs is None:
            assert completion.logprobs is None
            continue
        k = request.sampling.logprobs
        assert len(completion.logprobs) == len(completion.token_ids) > 0
        expected = forward_logprobs(tiny_llama, [*request.token_ids, *completion.token_ids])
        prompt_len = len(request.token_ids)
        for step, (token, found) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
            row = expected[prompt_len - 1 + step]
            assert found.token_id == token and found.token == texts.decode([token])
            assert found.logprob == pytest.approx(row[token].item(), **LOGPROB_TOLERANCE)
            top_values, top_ids = torch.topk(row, k)
            assert [i for i, _, _ in found.top] == top_ids.tolist()
            assert [lp for _, _, lp in found.top] == pytest.approx(top_values.tolist(), **LOGPROB_TOLERANCE)
            compared += 1
    assert compared > 40


@pytest.mark.parametrize("kind", EXECUTORS)
def test_repetition_penalty_equals_transformers_generate(tiny_llama: Path, kind: str) -> None:
    batch = requests(tiny_llama, repetition_penalty=1.6, max_tokens=16)
    found = run(kind, tiny_llama, batch)
    plain = run(kind, tiny_llama, requests(tiny_llama, max_tokens=16))
    eos = set(model(tiny_llama).generation_config.eos_token_id)
    for request in batch:
        prompt = torch.tensor([request.token_ids])
        with torch.inference_mode():
            ids = model(tiny_llama).generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16,
                repetition_penalty=1.6,
            )[0, prompt.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        assert list(found[request.row_index, 0].token_ids) == ids[:cut], request.row_index
    assert any(found[key].token_ids != plain[key].token_ids for key in found)  # the penalty mattered


def next_logits(folder: Path, tokens: list[int]) -> torch.Tensor:
    """[V] fp32 logits after `tokens`, one unpadded forward pass; a normal tensor, to update in place."""
    with torch.inference_mode():
        logits = model(folder)(torch.tensor([tokens])).logits[0, -1].float()
    return logits.clone()


def reference_presence_frequency(folder: Path, prompt: tuple[int, ...], presence: float, frequency: float,
                                 max_tokens: int) -> list[int]:
    """Greedy with OpenAI's penalties, written out: logit −= frequency·count + presence·[count > 0]."""
    eos = set(model(folder).generation_config.eos_token_id)
    output: list[int] = []
    for _ in range(max_tokens):
        logits = next_logits(folder, [*prompt, *output])
        for token in set(output):
            logits[token] -= frequency * output.count(token) + presence
        token = int(logits.argmax())
        if token in eos:
            break
        output.append(token)
    return output


@pytest.mark.parametrize("kind", EXECUTORS)
def test_presence_and_frequency_penalties_equal_a_plain_implementation(tiny_llama: Path, kind: str) -> None:
    batch = requests(tiny_llama, presence_penalty=1.5, frequency_penalty=0.8, max_tokens=14)
    batch[3] = replace(batch[3], sampling=replace(batch[3].sampling, presence_penalty=-1.0, frequency_penalty=2.0))
    found = run(kind, tiny_llama, batch)
    plain = run(kind, tiny_llama, requests(tiny_llama, max_tokens=14))
    for request in batch:
        p = request.sampling
        expected = reference_presence_frequency(tiny_llama, request.token_ids, p.presence_penalty,
                                                p.frequency_penalty, p.max_tokens)
        assert list(found[request.row_index, 0].token_ids) == expected, request.row_index
    assert any(found[key].token_ids != plain[key].token_ids for key in found)


@pytest.mark.parametrize("kind", EXECUTORS)
def test_min_tokens_equals_transformers_min_new_tokens(tiny_llama: Path, kind: str) -> None:
    # A stop id the unconstrained greedy output reaches early: min_tokens must hold it back.
    free = run(kind, tiny_llama, requests(tiny_llama, max_tokens=12))
    stop_id = free[0, 0].token_ids[1]
    batch = requests(tiny_llama, max_tokens=12, stop_token_ids=(stop_id,), min_tokens=6)
    found = run(kind, tiny_llama, batch)
    early = run(kind, tiny_llama, requests(tiny_llama, max_tokens=12, stop_token_ids=(stop_id,)))
    assert early[0, 0].num_output_tokens < 6 <= found[0, 0].num_output_tokens  # the mask mattered
    eos = [*model(tiny_llama).generation_config.eos_token_id, stop_id]
    for request in batch:
        prompt = torch.tensor([request.token_ids])
        with torch.inference_mode():
            ids = model(tiny_llama).generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12,
                min_new_tokens=6, eos_token_id=eos,
            )[0, prompt.shape[1]:].tolist()
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        assert list(found[request.row_index, 0].token_ids) == ids[:cut], request.row_index
        assert len(found[request.row_index, 0].token_ids) >= 6


@pytest.mark.parametrize("kind", EXECUTORS)
def test_seeded_sampling_with_penalties_does_not_depend_on_batch_mates(tiny_llama: Path, kind: str) -> None:
    penalties = {"temperature": 1.0, "repetition_penalty": 1.3, "presence_penalty": 0.5,
                 "frequency_penalty": 0.5, "min_tokens": 3, "logprobs": 2}
    batch = requests(tiny_llama, **penalties)
    together = run(kind, tiny_llama, batch)
    alone = run(kind, tiny_llama, [batch[4]])
    reversed_order = run(kind, tiny_llama, [replace(r, row_index=len(batch) - 1 - r.row_index) for r in batch])
    assert alone[4, 0].token_ids == together[4, 0].token_ids == reversed_order[len(batch) - 5, 0].token_ids
    assert [t.token_id for t in together[4, 0].logprobs] == list(together[4, 0].token_ids)


def test_native_and_hf_agree_with_every_option_at_once(tiny_qwen2: Path) -> None:
    options = {"repetition_penalty": 1.2, "presence_penalty": 0.4, "frequency_penalty": 0.3, "min_tokens": 2,
               "logprobs": 3}
    batch = requests(tiny_qwen2, **options)
    native, hf = run("native", tiny_qwen2, batch), run("hf", tiny_qwen2, batch)
    assert {k: c.token_ids for k, c in native.items()} == {k: c.token_ids for k, c in hf.items()}
    for key, completion in native.items():
        for a, b in zip(completion.logprobs, hf[key].logprobs, strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, **PEAKED_TOLERANCE)
            assert [i for i, _, _ in a.top] == [i for i, _, _ in b.top]


@pytest.mark.parametrize("kind", EXECUTORS)
def test_prompt_logprobs_equal_a_transformers_forward_and_shared_prefixes_are_scored_once(
    calm_llama: Path, kind: str
) -> None:
    tiny_llama = calm_llama
    batch = requests(tiny_llama, prompt_logprobs=3, max_tokens=3)
    batch[6] = replace(batch[6], sampling=replace(batch[6].sampling, prompt_logprobs=None))
    found = run(kind, tiny_llama, batch)
    for request in batch:
        completion = found[request.row_index, 0]
        if request.sampling.prompt_logprobs is None:
            assert completion.prompt_logprobs is None
            continue
        prompt = list(request.token_ids)
        assert [t.token_id for t in completion.prompt_logprobs] == prompt[1:]
        expected = forward_logprobs(tiny_llama, prompt)
        for position, record in enumerate(completion.prompt_logprobs):
            row = expected[position]
            assert record.logprob == pytest.approx(row[record.token_id].item(), **LOGPROB_TOLERANCE)
            top_values, top_ids = torch.topk(row, 3)
            assert [i for i, _, _ in record.top] == top_ids.tolist()
            assert [lp for _, _, lp in record.top] == pytest.approx(top_values.tolist(), **LOGPROB_TOLERANCE)
    if kind == "native":  # the shared system prompt's tokens were computed (and scored) once
        work = planned(batch, kind="native")
        fresh = NativeExecutor(ModelSpec(path=str(tiny_llama), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))
        list(fresh.generate(work))
        assert fresh.stats.num_prefill_tokens == work.plan.num_prefill_tokens


def score_requests(folder: Path) -> list[Request]:
    """A few-shot block × questions × 4 choices: each choice a request scoring its tokens."""
    encode = AutoTokenizer.from_pretrained(folder)
    shots = "Q: 2 + 2? A: four\nQ: the capital of France? A: Paris\n"
    batch = []
    for question in range(3):
        context = encode(f"{shots}Q: question {question}? A:")["input_ids"]
        for choice, text in enumerate([" yes", " no", " maybe so", " 42"]):
            continuation = encode(text, add_special_tokens=False)["input_ids"]
            batch.append(Request(question, tuple(context + continuation), SamplingParams(max_tokens=0),
                                 sample_index=choice, num_scored_tokens=len(continuation)))
        greedy = []  # a fifth choice: the model's own greedy two tokens
        for _ in range(2):
            greedy.append(int(forward_logprobs(folder, context + greedy)[-1].argmax()))
        batch.append(Request(question, tuple(context + greedy), SamplingParams(max_tokens=0), sample_index=4,
                             num_scored_tokens=2))
    return batch


@pytest.mark.parametrize("kind", EXECUTORS)
def test_scoring_equals_a_transformers_forward(calm_llama: Path, kind: str) -> None:
    tiny_llama = calm_llama
    batch = score_requests(tiny_llama)
    found = run(kind, tiny_llama, batch)
    assert len(found) == len(batch)
    for request in batch:
        completion = found[request.row_index, request.sample_index]
        prompt = list(request.token_ids)
        logp = forward_logprobs(tiny_llama, prompt)
        start = len(prompt) - request.num_scored_tokens
        positions = range(start - 1, len(prompt) - 1)
        expected = sum(logp[p, prompt[p + 1]].item() for p in positions)
        greedy = all(int(logp[p].argmax()) == prompt[p + 1] for p in positions)
        assert completion.finish_reason == "scored"
        assert completion.token_ids == request.token_ids[start:]
        assert completion.continuation_logprob == pytest.approx(expected, **LOGPROB_TOLERANCE)
        assert completion.continuation_is_greedy is greedy
        assert greedy is (request.sample_index == 4)
    if kind == "native":
        work = planned(batch, kind="native")
        fresh = NativeExecutor(ModelSpec(path=str(tiny_llama), dtype="float32"), ExecutorSpec(kind="native", device="cpu"))
        list(fresh.generate(work))
        assert fresh.stats.num_prefill_tokens == work.plan.num_prefill_tokens  # the scoring tree's unique tokens
        assert work.plan.num_prefill_tokens < sum(len(r.token_ids) for r in batch) / 3


def reference_sampled(folder: Path, request: Request) -> list[int]:
    """A row's tokens, written out one step at a time: the raw logits + its logit_bias, then
    (sampled) temperature, min_p against the top probability, and the inverse CDF at its
    uniform number k — what the executors must equal token for token."""
    from prefixbatch.executors.sampling import uniforms

    p = request.sampling
    eos = set(model(folder).generation_config.eos_token_id)
    output: list[int] = []
    for step in range(p.max_tokens):
        logits = next_logits(folder, [*request.token_ids, *output])
        for token, bias in p.logit_bias:
            logits[token] += bias
        if p.is_greedy:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            probs[probs < p.min_p * probs.max()] = 0.0
            target = float(uniforms([p.seed], [step])[0]) * probs.double().sum().item()
            token = int((probs.double().cumsum(0) <= target).sum())
        if token in eos:
            break
        output.append(token)
    return output


@pytest.mark.parametrize("kind", EXECUTORS)
def test_logit_bias_and_min_p_equal_a_plain_implementation(tiny_llama: Path, kind: str) -> None:
    free = run(kind, tiny_llama, requests(tiny_llama, max_tokens=8))
    banned, favoured = free[0, 0].token_ids[0], 17
    bias = ((favoured, 100.0), (banned, -100.0))
    greedy = requests(tiny_llama, max_tokens=8, logit_bias=bias)
    greedy[1] = replace(greedy[1], sampling=replace(greedy[1].sampling, logit_bias=((banned, -100.0), (favoured, 8.0))))
    sampled = [replace(r, row_index=r.row_index + 100, sampling=replace(r.sampling, temperature=1.3, min_p=0.2))
               for r in requests(tiny_llama, max_tokens=8, logit_bias=bias[1:])]  # fmt: skip
    found = run(kind, tiny_llama, greedy + sampled)
    for request in greedy + sampled:
        assert list(found[request.row_index, 0].token_ids) == reference_sampled(tiny_llama, request), request.row_index
    assert found[0, 0].token_ids == (favoured,) * 8  # +100 all but forces a token
    assert all(banned not in found[r.row_index, 0].token_ids for r in greedy + sampled)
