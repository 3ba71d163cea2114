"""The same checks on a CUDA device, when one is visible (skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from prefixbatch.executors.native.weights import load_model
from tests.executors.native.helpers import greedy
from tests.executors.native.test_model import hf_generate, native_model, prompts
from tests.executors.native.test_tree_attention import Case, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_tree_attention_on_cuda():
    # fp32 on the GPU: cuBLAS reductions differ from the CPU's, TF32 is off by default.
    case = Case((None, 0, 0, 1, 1), (7, 5, 1, 3, 9), ((3, 0, 3), (2, 0, 1), (4, 2, 7)), (4, 1))
    run_case(case, device="cuda", tol=1e-4)


def test_tiny_llama_on_cuda_matches_transformers_on_cpu(tiny_llama):
    model = load_model(tiny_llama, dtype=torch.float32, device="cuda")
    for prompt in prompts(tiny_llama):
        prompt_logits, ids, _ = greedy(model, prompt, 8)
        hf_logits, hf_ids, _ = hf_generate(tiny_llama, prompt, 8)
        torch.testing.assert_close(prompt_logits.cpu(), hf_logits, atol=1e-3, rtol=0)
        assert ids[: len(hf_ids)] == hf_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda_runs(tiny_qwen3, dtype):
    model = load_model(tiny_qwen3, dtype=dtype, device="cuda")
    prompt = prompts(tiny_qwen3)[1]
    half = greedy(model, prompt, 1)[0].cpu()
    exact = greedy(native_model(tiny_qwen3), prompt, 1)[0]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    # Rounding only: on the CPU the same prompt gives 3.2 (bf16) and 0.42 (fp16).
    assert (half - exact).abs().max() < (4.0 if dtype == torch.bfloat16 else 1.0)
