"""The `executor` section of a job spec: which engine runs the plan, and each engine's settings.

Plain pydantic, no torch: validating a spec never imports an executor. Settings that shape
the plan (KV budget, prefix sharing) are the section's own; settings only one engine reads
live in that engine's sub-section (`native`, `hf`), so no field means two things.
"""

from typing import Literal

from pydantic import Field

from prefixbatch.config import ModelSpec, StrictModel

__all__ = ["ExecutorSpec", "HfSettings", "ModelSpec", "NativeSettings"]


class NativeSettings(StrictModel):
    """`executor.native`: the native engine's step size."""

    max_step_tokens: int = Field(16384, ge=1)
    """Most tokens in one forward step: every running sequence's decode token, then prefill
    chunks (long prompt segments are chunked to fit)."""


class HfSettings(StrictModel):
    """`executor.hf`: transformers `generate` batches."""

    max_batch_size: int = Field(32, ge=1)
    """Most requests decoded together in one batch."""

    max_batch_tokens: int = Field(16384, ge=1)
    """Most padded tokens in one batch (batch size × (longest prompt + largest max_tokens));
    a single request larger than this still runs, alone."""


class ExecutorSpec(StrictModel):
    """Which engine runs the plan, on which device, with how much KV memory."""

    kind: Literal["auto", "native", "hf"] = "auto"
    """`native`: our engine (prefix tree KV, each shared prefix computed once, shared-prefix
    attention; Llama, Mistral, Qwen2, Qwen3). `hf`: Hugging Face transformers `generate` in
    padded batches (the reference executor, any architecture; it never shares a prefix, so
    its plan is made without sharing). `auto`: `native` when it supports the model, else `hf`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when a GPU is visible, else the CPU."""

    kv_budget_tokens: int | None = Field(None, ge=1)
    """Most KV-cache tokens an executor holds at once; the planner sizes groups to fit half
    of it (the other half lets the next group prefill while one decodes). Null: sized from
    free device memory on CUDA, 131072 on the CPU."""

    prefix_sharing: bool = True
    """false: plan as if no two prompts shared a prefix, so every prompt is prefilled in full
    (for ablations: what sharing saves)."""

    native: NativeSettings = NativeSettings()
    hf: HfSettings = HfSettings()
