"""The native engine in bf16 on the CPU against transformers in bf16: equal up to near-ties.

bf16 keeps 8 bits of mantissa, so two implementations that sum in a different order (ours
packs products differently, attends span by span) round a few values the other way, and where
two logits are within a few bf16 steps of each other the greedy token may differ; from there
the rows go separate ways. The rule, checked on every row:

    a native row equals transformers' row token for token, or, at the first token where they
    differ, transformers' own bf16 logits on the common prefix put native's token within
    `NEAR_TIE` of its best (a near-tie: 2^-4 of the best logit, i.e. 4-8 bf16 steps of it)

— and most rows are equal in full. A wrong kernel (a missed rounding, a wrong scale, a stale
key) moves logits by far more and fails on the first rows. The tiny models' final norm is
scaled as `calm_llama`'s: logits spread as a trained model's are (random ones reach ~30,
where a bf16 step is 0.125 and ties are everywhere).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native.executor import NativeExecutor
from tests.executors.planned import planned

from .test_engine import by_request, make_requests

NEAR_TIE = 2**-4  # of the best logit's magnitude


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def calm_model(request, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp(f"calm_{request.param}")
    shutil.copytree(request.getfixturevalue(request.param), folder, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 0.2
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def test_native_bf16_equals_transformers_bf16_up_to_near_ties(calm_model):
    requests = make_requests(calm_model)
    model = ModelSpec(path=str(calm_model), dtype="bfloat16")
    theirs = by_request(HfExecutor(model, ExecutorSpec(kind="hf", device="cpu")).generate(planned(requests, kind="hf")))
    spec = ExecutorSpec(kind="native", device="cpu")
    executor = NativeExecutor(model, spec)
    ours = by_request(executor.generate(planned(requests, spec)))
    assert executor.model.dtype == torch.bfloat16

    reference = AutoModelForCausalLM.from_pretrained(calm_model, dtype=torch.bfloat16).eval()
    prompts = {(r.row_index, r.sample_index): r.token_ids for r in requests}
    num_equal = 0
    for key, want in theirs.items():
        got = ours[key]
        if got.token_ids == want.token_ids:
            num_equal += 1
            continue
        at = first_difference(got.token_ids, want.token_ids)
        assert at is not None, (key, got.token_ids, want.token_ids)  # same tokens, one row shorter: a stop bug
        with torch.inference_mode():
            logits = reference(torch.tensor([[*prompts[key], *want.token_ids[:at]]])).logits[0, -1].float()
        best = logits.max()
        gap = float(best - logits[got.token_ids[at]])
        assert gap <= NEAR_TIE * abs(float(best)), (key, at, gap, float(best))
    assert num_equal >= len(theirs) // 2, (num_equal, len(theirs))
