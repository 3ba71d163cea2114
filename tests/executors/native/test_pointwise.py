"""The compiled pointwise passes (CUDA's: `pointwise.compiled`) equal the eager ops, checked
through inductor's CPU backend: bf16 bit for bit (inductor rounds where eager rounds), fp32
within the last bit of a vectorised mean; and a model using them gives the eager model's logits."""

from __future__ import annotations

import shutil

import pytest
import torch

from prefixbatch.executors.native import pointwise
from prefixbatch.executors.native.weights import load_model
from tests.executors.native.helpers import greedy

pytestmark = pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc")), reason="inductor needs a C compiler")


def test_compiled_norm_add_norm_and_rope_equal_the_eager_ops():
    passes = pointwise.compiled()
    generator = torch.Generator().manual_seed(0)
    for rows in (5, 33):  # one compiled graph for any row count
        residual, x = (torch.randn(rows, 128, generator=generator).bfloat16() for _ in range(2))
        weight = torch.randn(128, generator=generator).bfloat16()
        eager, fused = pointwise.add_rms_norm(residual, x, weight, 1e-6), passes.add_norm(residual, x, weight, 1e-6)
        assert torch.equal(eager[0], fused[0]) and torch.equal(eager[1], fused[1])
        assert torch.equal(pointwise.rms_norm(x, weight, 1e-6), passes.norm(x, weight, 1e-6))
        q = torch.randn(rows, 4, 32, generator=generator).bfloat16()
        angles = torch.randn(rows, 16, generator=generator)
        assert torch.equal(pointwise.apply_rope(q, angles.cos(), angles.sin()), passes.rope(q, angles.cos(), angles.sin()))


def test_a_bf16_model_on_the_compiled_passes_gives_the_eager_logits(tiny_qwen3):
    # Qwen3: q/k norms and rope on q and k apart, besides the layers' norms.
    eager = load_model(tiny_qwen3, dtype=torch.bfloat16, device="cpu")
    compiled = load_model(tiny_qwen3, dtype=torch.bfloat16, device="cpu")
    compiled.use_pointwise(pointwise.compiled())
    prompt = list(range(5, 40))
    expected, expected_ids, _ = greedy(eager, prompt, 4)
    found, found_ids, _ = greedy(compiled, prompt, 4)
    assert torch.equal(expected, found) and expected_ids == found_ids
