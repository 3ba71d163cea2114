"""Batch-invariant numerics: a row's logits are the same to the bit in any step.

The engine's logits for each (request, token position) are recorded in one run of a whole
job and in runs where the same requests meet other batch mates, other groups (a small KV
budget), chunked prefill, and a resume that prefills part of the generation instead of
decoding it. With `executor.native.batch_invariant` every recorded row is bit-identical
across runs, so seeded samples are too; without it some rows differ in the last bits (which
is why the setting exists). Greedy outputs in the mode still equal the hf oracle.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from prefixbatch.executors.config import ExecutorSpec, ModelSpec
from prefixbatch.executors.hf import HfExecutor
from prefixbatch.executors.native import engine as engine_module
from prefixbatch.executors.native.attention.invariant import attend_blocks
from prefixbatch.executors.native.attention.parts import reference_attention
from prefixbatch.executors.native.executor import NativeExecutor
from tests.executors.native.test_engine import by_request, make_requests
from tests.executors.planned import planned


def record_logits(monkeypatch) -> dict:
    """(row, sample, tokens generated before) → that step's logits row, for every draw."""
    seen: dict = {}
    next_tokens = engine_module._next_tokens

    def recording(sequences, logits, *rest):
        for sequence, row in zip(sequences, logits, strict=True):
            key = (sequence.request.row_index, sequence.request.sample_index, len(sequence.generated))
            seen[key] = row.clone()
        return next_tokens(sequences, logits, *rest)

    monkeypatch.setattr(engine_module, "_next_tokens", recording)
    return seen


def resumed(requests, whole, rnd):
    """Each request with a random part of its uninterrupted generation already generated."""
    out = []
    for request in requests:
        tokens = whole[(request.row_index, request.sample_index)].token_ids
        done = tokens[: rnd.randint(1, max(1, len(tokens) - 1))]
        out.append(replace(request, token_ids=request.token_ids + done, num_generated=len(done)))
    return out


def runs(model_dir, monkeypatch, *, invariant: bool) -> tuple[dict, list[dict], list[dict]]:
    """The whole job's logits and completions, then those of three other runs of parts of it."""
    requests = [replace(r, sampling=replace(r.sampling, max_tokens=40)) for r in make_requests(model_dir, temperature=0.9)]
    model = ModelSpec(path=str(model_dir), dtype="float32")

    def run(reqs, **settings):
        kv_budget = settings.pop("kv_budget_tokens", None)
        spec = ExecutorSpec(kind="native", device="cpu", kv_budget_tokens=kv_budget,
                            native={"batch_invariant": invariant, **settings})
        seen = record_logits(monkeypatch)
        completions = by_request(NativeExecutor(model, spec).generate(planned(reqs, spec)))
        monkeypatch.undo()
        return seen, completions

    whole_logits, whole = run(requests)
    rnd = random.Random(5)
    others = [
        run(requests[::2], max_step_tokens=7),  # other batch mates, chunked prefill
        run(resumed(requests[1::2], whole, rnd), kv_budget_tokens=150),  # resumed, small groups
        run(resumed(requests[-4:], whole, rnd)),  # a row's samples, resumed at different points
    ]
    return (whole_logits, whole), [o[0] for o in others], [o[1] for o in others]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3"])
def test_logits_are_bit_identical_whatever_the_step(model_name, request, monkeypatch):
    model_dir = request.getfixturevalue(model_name)
    (whole_logits, whole), other_logits, others = runs(model_dir, monkeypatch, invariant=True)
    compared = 0
    for logits in other_logits:
        for key, row in logits.items():
            assert torch.equal(row, whole_logits[key]), key
            compared += 1
    assert compared > 500
    for completions in others:
        for key, completion in completions.items():
            assert completion.token_ids == whole[key].token_ids, key


@pytest.mark.slow
def test_without_the_setting_some_rows_differ_in_the_last_bits(tiny_llama, monkeypatch):
    (whole_logits, _), other_logits, _ = runs(tiny_llama, monkeypatch, invariant=False)
    pairs = [(row, whole_logits[key]) for logits in other_logits for key, row in logits.items()]
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert max((a - b).abs().max().item() for a, b in pairs) < 1e-3  # rounding, not a bug


def test_greedy_in_the_mode_equals_hf(tiny_qwen2):
    requests = make_requests(tiny_qwen2)
    model = ModelSpec(path=str(tiny_qwen2), dtype="float32")
    spec = ExecutorSpec(kind="native", device="cpu", kv_budget_tokens=150,
                        native={"batch_invariant": True, "max_step_tokens": 7})
    native = by_request(NativeExecutor(model, spec).generate(planned(requests, spec)))
    hf = HfExecutor(model, ExecutorSpec(kind="hf", device="cpu"))
    want = by_request(hf.generate(planned(requests, kind="hf")))
    assert {k: c.token_ids for k, c in native.items()} == {k: c.token_ids for k, c in want.items()}


def test_the_setting_is_refused_on_cuda():
    with pytest.raises(ValueError, match="batch_invariant is supported on the CPU only"):
        ExecutorSpec(device="cuda", native={"batch_invariant": True})


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (14, 2, 64), (8, 8, 32)])
def test_attend_blocks_is_attention_and_alike_for_every_row(heads, kv_heads, head_dim):
    torch.manual_seed(0)
    length = 150  # three blocks, the last partial
    q = torch.randn(length, heads, head_dim)
    k, v = torch.randn(length, kv_heads, head_dim), torch.randn(length, kv_heads, head_dim)

    def layout(t, width):  # [L, Hkv, D] → [Hkv, 1, width, D], zero keys past L
        return torch.nn.functional.pad(t.transpose(0, 1), (0, 0, 0, width - length))[:, None].contiguous()

    keys, values = layout(k, 192), layout(v, 192)
    visible = torch.arange(1, length + 1)[None]  # a causal chunk: row i sees keys 0..i
    chunk = attend_blocks(q[None], keys, values, visible, scale=0.3).merged()
    want = reference_attention(q, k, v, scale=0.3, causal_offset=0)
    torch.testing.assert_close(chunk, want, rtol=1e-5, atol=1e-5)
    for row in (0, 63, 64, 149):  # alone, as a decode token would be, with more padding
        alone = attend_blocks(q[None, row : row + 1], layout(k, 320), layout(v, 320), visible[:, row : row + 1],
                              scale=0.3)
        assert torch.equal(alone.merged()[0], chunk[row]), row
        if row >= 64:  # its first block computed with other rows, the rest alone
            first = attend_blocks(q[None, : row + 1], keys[:, :, :64].contiguous(), values[:, :, :64].contiguous(),
                                  torch.full((1, row + 1), 64), scale=0.3)
            rest = attend_blocks(q[None, row : row + 1], keys[:, :, 64:].contiguous(), values[:, :, 64:].contiguous(),
                                 visible[:, row : row + 1] - 64, scale=0.3)
            assert torch.equal(first.rows(slice(row, row + 1)).then(rest).merged()[0], chunk[row]), row
