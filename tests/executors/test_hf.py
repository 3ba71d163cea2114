"""The hf executor against plain transformers `generate`, one prompt at a time, on tiny models."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from prefixbatch.errors import ModelError, UserError
from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.device import resolve_device, resolve_dtype
from prefixbatch.executors.hf import HfExecutor, plan_batches
from prefixbatch.executors.sampling import SeededSampler, filter_logits
from prefixbatch.types import Completion, Request, SamplingParams
from tests.executors.planned import planned

PROMPTS = [
    "def",
    "The with statement",
    "import os\nimport sys\n\n",
    "Return the value of the named attribute of object.",
    "for i in range(10):\n    print(i)",
    "x",
    "A class definition defines a class object. A class definition is an executable statement.",
    "The try statement specifies exception handlers and/or cleanup code for a group of statements:",
    "lambda",
    "Built-in functions and exceptions are described here in detail, with examples of their use, "
    "and the rules the interpreter follows when it evaluates them.",
    "raise ValueError(",
    "Operators",
]
MAX_TOKENS = [6, 1, 16, 9, 3, 12, 7, 16, 2, 10, 5, 14]
ARCHS = ["tiny_llama", "tiny_qwen2", "tiny_qwen3"]


@cache
def tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder)


def make_requests(folder: Path, **sampling: object) -> list[Request]:
    encode = tokenizer(folder)
    return [
        Request(row, tuple(encode(text)["input_ids"]), SamplingParams(max_tokens=n, **sampling))
        for row, (text, n) in enumerate(zip(PROMPTS, MAX_TOKENS))
    ]


@cache
def reference(folder: Path) -> dict[int, tuple[list[int], str]]:
    """row → (generated ids before the first eos, finish reason) from single-prompt generate."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = set(model.generation_config.eos_token_id)
    out = {}
    for request in make_requests(folder):
        prompt = torch.tensor([request.token_ids])
        with torch.inference_mode():
            ids = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=request.sampling.max_tokens,
            )[0, prompt.shape[1] :].tolist()
        cut = next((k for k, token in enumerate(ids) if token in eos), None)
        out[request.row_index] = (ids, "length") if cut is None else (ids[:cut], "stop")
    return out


@cache
def executor(folder: Path, max_batch_size: int = 32, max_batch_tokens: int = 16384) -> HfExecutor:
    spec = ExecutorSpec(
        device="cpu", hf={"max_batch_size": max_batch_size, "max_batch_tokens": max_batch_tokens}
    )
    return HfExecutor(ModelSpec(path=str(folder)), spec)


def run(hf: HfExecutor, requests: list[Request]) -> dict[int, Completion]:
    completions = list(hf.generate(planned(requests, kind="hf")))
    assert sorted(c.row_index for c in completions) == sorted(r.row_index for r in requests)
    return {c.row_index: c for c in completions}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/executors/conftest.py


@pytest.fixture(params=ARCHS)
def folder(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize(
    "max_batch_size, max_batch_tokens", [(1, 16384), (4, 16384), (32, 16384), (32, 200)]
)
def test_greedy_matches_single_prompt_generate(
    folder: Path, max_batch_size: int, max_batch_tokens: int
) -> None:
    hf = executor(folder, max_batch_size, max_batch_tokens)
    requests = make_requests(folder)
    completions = run(hf, requests)
    for request in requests:
        completion = completions[request.row_index]
        ids, reason = reference(folder)[request.row_index]
        assert list(completion.token_ids) == ids, request.row_index
        assert completion.finish_reason == reason
        assert completion.text == hf.tokenizer.decode(ids, skip_special_tokens=True)
        assert completion.num_prompt_tokens == len(request.token_ids)
        assert completion.num_cached_prompt_tokens == 0


def test_a_request_over_max_batch_tokens_still_runs_alone(tiny_llama: Path) -> None:
    requests = make_requests(tiny_llama)[2:5]
    limit = min(len(r.token_ids) + r.sampling.max_tokens for r in requests) - 1
    completions = run(executor(tiny_llama, 32, limit), requests)
    for request in requests:
        ids, reason = reference(tiny_llama)[request.row_index]
        completion = completions[request.row_index]
        assert (list(completion.token_ids), completion.finish_reason) == (ids, reason)


def test_stop_token_ids_end_a_row_without_keeping_the_id(tiny_llama: Path) -> None:
    ids, reason = reference(tiny_llama)[2]
    assert reason == "length" and len(ids) == 16
    stop_id = ids[5]
    cut = ids.index(stop_id)
    requests = make_requests(tiny_llama)
    requests[2] = replace(requests[2], sampling=SamplingParams(16, stop_token_ids=(stop_id,)))
    completions = run(executor(tiny_llama), requests)
    assert list(completions[2].token_ids) == ids[:cut]
    assert completions[2].finish_reason == "stop"
    assert completions[2].text == executor(tiny_llama).decode(ids[:cut])
    # Its batch mates do not stop at its stop id.
    assert list(completions[7].token_ids) == reference(tiny_llama)[7][0]


def test_every_eos_id_of_the_generation_config_ends_a_row(tmp_path: Path, tiny_llama: Path) -> None:
    # A copy of the checkpoint whose generation config adds, as a third eos id, a token that
    # greedy decoding produces: some rows end early, their batch mates go on.
    ids, _ = reference(tiny_llama)[2]
    folder = tmp_path / "more_eos"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = [*config["eos_token_id"], ids[4]]
    (folder / "generation_config.json").write_text(json.dumps(config))
    expected = reference(folder)
    assert {reason for _, reason in expected.values()} == {"stop", "length"}
    completions = run(executor(folder), make_requests(folder))
    for row, (ids, reason) in expected.items():
        assert (list(completions[row].token_ids), completions[row].finish_reason) == (ids, reason)


def test_stop_string_cuts_the_text_and_keeps_the_completing_token(tiny_llama: Path) -> None:
    hf = executor(tiny_llama)
    ids, _ = reference(tiny_llama)[7]
    full = hf.decode(ids)
    start = len(full) // 2
    stop = full[start : start + 3]
    assert stop.strip() and len(ids) == 16
    # The first token whose text completes the stop string is the last one kept.
    last = next(k for k in range(len(ids)) if stop in hf.decode(ids[: k + 1]))
    requests = make_requests(tiny_llama)
    requests[7] = replace(requests[7], sampling=SamplingParams(16, stop=("\x00never", stop)))
    completion = run(hf, requests)[7]
    assert list(completion.token_ids) == ids[: last + 1]
    assert completion.text == full[: full.index(stop)]
    assert completion.finish_reason == "stop"


def test_max_tokens_ends_a_row_with_length(tiny_qwen2: Path) -> None:
    completions = run(executor(tiny_qwen2), make_requests(tiny_qwen2))
    for row, completion in completions.items():
        if completion.finish_reason == "length":
            assert completion.num_output_tokens == MAX_TOKENS[row]
        else:
            assert completion.num_output_tokens < MAX_TOKENS[row]


def test_sampled_row_does_not_depend_on_its_batch_mates(tiny_llama: Path) -> None:
    hf = executor(tiny_llama)
    sampling = SamplingParams(16, temperature=0.8, seed=7)
    sampled = replace(make_requests(tiny_llama)[7], sampling=sampling)
    alone = run(hf, [sampled])[7]
    mates = make_requests(tiny_llama, temperature=1.0, top_p=0.9, seed=1)[:4]
    mates += make_requests(tiny_llama)[8:]
    together = run(hf, [*mates, sampled])[7]
    assert together.token_ids == alone.token_ids
    other_seed = replace(sampled, sampling=replace(sampling, seed=8))
    assert run(hf, [other_seed])[7].token_ids != alone.token_ids
    # Sampling really happened: the seeded row is not the greedy one.
    assert list(alone.token_ids) != reference(tiny_llama)[7][0]


def test_top_k_1_and_top_p_0_sample_the_greedy_token(tiny_qwen3: Path) -> None:
    cut_to_one = [
        SamplingParams(16, temperature=0.8, top_k=1, seed=3),
        SamplingParams(16, temperature=1.5, top_p=0.0, seed=4),
    ]
    base = make_requests(tiny_qwen3)[7]
    requests = [replace(base, row_index=row, sampling=p) for row, p in enumerate(cut_to_one)]
    greedy_ids, _ = reference(tiny_qwen3)[7]
    for completion in run(executor(tiny_qwen3), requests).values():
        assert list(completion.token_ids) == greedy_ids


def test_seeded_sampler_returns_only_the_drawn_token_and_leaves_greedy_rows_alone() -> None:
    params = [
        SamplingParams(4),
        SamplingParams(4, temperature=0.8, seed=7),
        SamplingParams(4, temperature=2.0),
    ]
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))  # [B, V]
    input_ids = torch.zeros(3, 1, dtype=torch.long)
    out = SeededSampler(params, torch.device("cpu"))(input_ids, scores.clone())
    assert torch.equal(out[0], scores[0])
    for row in (1, 2):
        assert torch.isfinite(out[row]).sum() == 1 and out[row].max() == 0.0
    # The same seed draws the same token whatever the other rows are.
    alone = SeededSampler(params[1:2], torch.device("cpu"))(input_ids[1:2], scores[1:2])
    assert alone.argmax() == out[1].argmax()


def test_filter_logits_applies_top_k_then_top_p() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)  # probabilities 0.03, 0.64, 0.09, 0.24
    top_k = torch.tensor([2, 4, 4, 1])
    top_p = torch.tensor([1.0, 0.7, 0.5, 1.0])
    kept = torch.isfinite(filter_logits(logits, top_k, top_p))
    assert kept.tolist() == [
        [False, True, False, True],
        [False, True, False, True],
        [False, True, False, False],
        [False, True, False, False],
    ]
    assert torch.equal(filter_logits(logits, torch.tensor([4] * 4), torch.ones(4)), logits)


def test_missing_or_incomplete_model_folder_is_a_model_error(tmp_path: Path) -> None:
    def load(folder: Path) -> None:
        HfExecutor(ModelSpec(path=str(folder)), ExecutorSpec(device="cpu"))

    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=re.escape(f"model.path {missing}: no such folder")):
        load(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=re.escape(f"model.path {empty}: no config.json in")):
        load(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=re.escape(f"model.path {empty}: no *.safetensors")):
        load(empty)


def test_unloadable_checkpoint_is_a_model_error(tmp_path: Path, tiny_llama: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in tiny_llama.iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=re.escape(f"cannot load the model from {broken}")):
        HfExecutor(ModelSpec(path=str(broken)), ExecutorSpec(device="cpu"))


def test_device_and_dtype_resolution() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        message = "executor.device is 'cuda' but no CUDA device is visible"
        with pytest.raises(UserError, match=re.escape(message)):
            resolve_device("cuda")


def _request(row: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(row, tuple(range(prompt_len)), SamplingParams(max_tokens=max_tokens))


def test_plan_batches_sorts_by_prompt_length_and_cuts_by_size_and_tokens() -> None:
    # (row, prompt length, max_tokens)
    shapes = [(0, 5, 4), (1, 2, 4), (2, 5, 4), (3, 3, 20), (4, 1, 4)]
    requests = [_request(*shape) for shape in shapes]

    def rows(**limits: int) -> list[list[int]]:
        return [[r.row_index for r in batch] for batch in plan_batches(requests, **limits)]

    assert rows(max_batch_size=32, max_batch_tokens=1000) == [[4, 1, 3, 0, 2]]
    assert rows(max_batch_size=2, max_batch_tokens=1000) == [[4, 1], [3, 0], [2]]
    # [4, 1] pads to 2 × (2 + 4) = 12 tokens; adding 3 would make 3 × (3 + 20) = 69.
    assert rows(max_batch_size=32, max_batch_tokens=50) == [[4, 1], [3, 0], [2]]
    # Every request is over the limit: each runs alone.
    assert rows(max_batch_size=32, max_batch_tokens=1) == [[4], [1], [3], [0], [2]]
    assert list(plan_batches([], max_batch_size=4, max_batch_tokens=10)) == []
