"""The `model` and `executor` sections of a job spec: what to load and how to run it.

Plain pydantic, no torch: validating a spec never imports an executor.
"""

from typing import Literal

from pydantic import Field

from prefixbatch.config import StrictModel


class ModelSpec(StrictModel):
    """The Hugging Face model folder to run."""

    path: str
    """Folder of a Hugging Face checkpoint (config.json, safetensors weights, tokenizer files).
    A relative path is resolved against the spec file's folder."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype. `auto`: float32 on CPU, bfloat16 on CUDA."""

    chat_template: Literal["auto", "always", "never"] = "auto"
    """`auto`: messages rows go through the tokenizer's chat template, prompt rows are used as
    raw text. `always`: prompt rows are also wrapped as one user message and templated.
    `never`: no template (only valid with `input.prompt_column`)."""

    trust_remote_code: bool = False
    """Allow code shipped inside the model folder to run. Off unless you trust the folder."""


class ExecutorSpec(StrictModel):
    """Which engine generates, on which device, in batches of what size."""

    kind: Literal["auto", "native", "hf"] = "auto"
    """`native`: our engine (prefix tree KV, each shared prefix computed once, shared-prefix
    attention; Llama, Mistral, Qwen2, Qwen3). `hf`: Hugging Face transformers `generate` in
    padded batches (the reference executor, any architecture). `auto`: `native` when it
    supports the model, else `hf`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks CUDA when a GPU is visible, else the CPU."""

    max_batch_size: int = Field(32, ge=1)
    """`hf`: most requests decoded together in one batch."""

    kv_budget_tokens: int | None = Field(None, ge=1)
    """Most KV-cache tokens held at once; the planner sizes groups to fit it. Null: 131072 on
    the CPU (the native engine will size it from free device memory on CUDA)."""

    max_batch_tokens: int = Field(16384, ge=1)
    """`hf`: most padded tokens (batch size × (longest prompt + its max_tokens)) in one
    batch; a single request larger than this still runs, alone. `native`: most tokens in one
    forward step (prefill segments are chunked to fit)."""

    prefix_sharing: bool = True
    """false: plan as if no two prompts shared a prefix, so every prompt is prefilled in full
    (for ablations)."""
