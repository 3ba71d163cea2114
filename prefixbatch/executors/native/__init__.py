"""The native engine's building blocks: our Llama-family model, KV storage by segment, and
exact shared-prefix (tree) attention.

- `config`: `ModelConfig` from a Hugging Face config.json; unsupported models refused.
- `rope`, `model`: the transformer; attention over the cache is a callback (`AttentionFn`).
- `weights`: safetensors (single or sharded) → `CausalLM`.
- `attention`: `attend` over one KV segment → (out, lse); exact `merge`; `reference_attention`.
- `attention_plan`: plain data saying which rows attend to which slots (`plan_attention`).
- `tree_attention`: runs a plan on tensors; `TreeAttention` is the model's callback.
- `span_kernel`: our C attention kernel (`kernels/span_attention.c`), built on first use:
  on the CPU (fp32 or bf16) a step's whole plan is one call per layer.
- `kernel_library`: where that library is built and cached, and loading it only when it can
  be trusted (its folder and file ours alone, its SHA-256 the one recorded at build).
- `dense`: the CPU's dense layers, weights packed once: our products (fp32; bf16 with
  AVX512-BF16), else oneDNN's.
- `kv`: `KVStore`, per-layer K/V buffers with a contiguous slot range per segment.

Layering inside: `attention_plan` imports nothing from torch; `tree_attention` joins
`attention`, `attention_plan`, `kv` and `span_kernel`; the model knows none of them.
"""
