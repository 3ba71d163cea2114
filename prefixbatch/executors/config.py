"""The `executor` section of a job spec: which engine runs the plan, and each engine's settings.

Plain pydantic, no torch: validating a spec never imports an executor. Settings that shape
the plan (KV budget, prefix sharing) are the section's own; settings only one engine reads
live in that engine's sub-section (`native`, `hf`), so no field means two things.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from prefixbatch.config import ModelSpec, StrictModel

__all__ = ["ExecutorSpec", "HfSettings", "ModelSpec", "NativeSettings", "VllmSettings"]


class NativeSettings(StrictModel):
    """`executor.native`: the native engine's step size and numerics."""

    max_step_tokens: int | None = Field(None, ge=1)
    """Most tokens in one forward step: every running sequence's decode token, then prefill
    chunks (long prompt segments are chunked to fit). Null: 2,048 on a CPU (smaller steps
    keep activations in cache: 5–15% faster than 16,384), 16,384 on a GPU."""

    @staticmethod
    def default_step_tokens(device: str) -> int:
        """2,048 on a CPU (a step's activations stay in cache and its GEMMs at the row counts
        run fastest: 5–15% faster than 16,384 in BENCHMARKS.md), 16,384 on a
        GPU (fewer, fuller steps)."""
        return 2048 if device == "cpu" else 16384

    batch_invariant: bool = False
    """true: a row's logits are the same to the last bit whatever it is computed with (its
    batch mates, groups, prefill chunks, or a resume that prefills its checkpointed tokens),
    so a seeded sampled row draws the same completion in any job and across `--resume` (with
    the same thread count). Costs speed: dense layers on row counts rounded up to 16,
    attention in fixed 64-key blocks instead of the fused kernel, PyTorch's dense products
    rather than the packed ones (every shared prefix is still computed once; 0.25–0.45× of
    `native` in BENCHMARKS.md). CPU only. false: exact up to fp32 rounding, which a seeded
    sample notices about once in ten thousand tokens; greedy rows seldom do (only a near-tie
    between the two most likely tokens can flip)."""


class HfSettings(StrictModel):
    """`executor.hf`: transformers `generate` batches."""

    max_batch_size: int = Field(32, ge=1)
    """Most requests decoded together in one batch."""

    max_batch_tokens: int = Field(16384, ge=1)
    """Most padded tokens in one batch (batch size × (longest prompt + largest max_tokens));
    a single request larger than this still runs, alone."""


class VllmSettings(StrictModel):
    """`executor.vllm`: vLLM's engine, as its users tune it (see `executors/vllm_engine.py`)."""

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """CUDA: share of the GPU's memory vLLM may use (weights, activations, KV cache)."""

    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences in one engine step (null: vLLM's default)."""

    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Most tokens in one engine step (null: vLLM's default)."""

    enforce_eager: bool | None = None
    """true: no torch.compile / CUDA graphs. Null: true on the CPU (compiling costs 10–30 s at
    every start for 7–11% faster generation), false on CUDA."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one engine spans."""

    max_model_len: int | None = Field(None, ge=1)
    """Longest prompt + output the engine accepts (null: the model's own context); a longer
    request becomes an `executor_refused` error row."""

    block_size: int | None = Field(None, ge=1)
    """Tokens per KV block, the prefix cache's unit: a shared prefix is reused in whole
    blocks. Null: 32 on the CPU (the smallest it accepts), 16 on CUDA."""

    kv_cache_tokens: int | None = Field(None, ge=1)
    """Cap the KV cache at this many tokens, in whole blocks (vLLM's
    `num_gpu_blocks_override`; null: all the memory the settings above give it)."""

    cpu_kv_cache_gib: int = Field(4, ge=1)
    """CPU: whole GiB of KV cache (sets `VLLM_CPU_KVCACHE_SPACE`)."""

    cpu_threads_bind: str | None = None
    """CPU: which cores vLLM's OpenMP threads are pinned to, e.g. `0-1` or `nobind` (sets
    `VLLM_CPU_OMP_THREADS_BIND`; null: vLLM's `auto`)."""

    @model_validator(mode="after")
    def _cache_holds_a_block(self) -> VllmSettings:
        block = self.block_size or 32  # the larger of the backends' defaults
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < block:
            msg = f"executor.vllm.kv_cache_tokens must hold at least one block of {block} tokens, got {self.kv_cache_tokens}"
            raise ValueError(msg)
        return self


class ExecutorSpec(StrictModel):
    """Which engine runs the plan, on which device, with how much KV memory."""

    kind: Literal["auto", "native", "hf", "vllm"] = "auto"
    """`native`: our engine (prefix tree KV, each shared prefix computed once, shared-prefix
    attention; Llama, Mistral, Qwen2, Qwen3). `hf`: Hugging Face transformers `generate` in
    padded batches (the reference executor, any architecture; it never shares a prefix, so
    its plan is made without sharing). `vllm`: vLLM's engine fed the plan group by group, its
    prefix cache holding each group's shared prefix (needs vLLM installed). `auto`: `native`
    when it supports the model, else `hf`; on CUDA, `vllm` when it is installed (native's CUDA
    path is not measured yet), else the same rule, with a warning."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when a GPU is visible, else the CPU."""

    kv_budget_tokens: int | None = Field(None, ge=1)
    """Most KV-cache tokens an executor holds at once; the planner sizes groups to fit half
    of it (the other half lets the next group prefill while one decodes). Null: on CUDA, what
    free device memory holds once the weights are in (10% kept for activations; bytes per
    token from the model's config); on the CPU, 131,072, or the largest power of two that
    half the memory available after the weights holds when that is less (`vllm` on the CPU: what
    `executor.vllm.cpu_kv_cache_gib` holds); on Dask, 131,072. `plan` and `run` resolve it
    the same way."""

    prefix_sharing: bool = True
    """false: plan as if no two prompts shared a prefix, so every prompt is prefilled in full
    (for ablations: what sharing saves). `hf` cannot share, so its plans never do."""

    native: NativeSettings = NativeSettings()
    """Settings only the `native` engine reads: its step size and numerics."""

    hf: HfSettings = HfSettings()
    """Settings only the `hf` executor reads: the size of transformers' `generate` batches."""

    vllm: VllmSettings = VllmSettings()
    """Settings only the `vllm` executor reads: vLLM's engine arguments, as its users tune them."""

    @model_validator(mode="after")
    def _invariant_on_cpu(self) -> ExecutorSpec:
        if self.native.batch_invariant and self.device == "cuda":
            raise ValueError(INVARIANT_CPU_ONLY)
        return self


INVARIANT_CPU_ONLY = (
    "executor.native.batch_invariant is supported on the CPU only (CUDA's matmul kernels "
    "change with the batch's shape); set executor.device: cpu, or batch_invariant: false"
)
