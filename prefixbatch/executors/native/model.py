"""The Llama-family transformer (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as plain `nn.Module`s.

The model computes everything *except* attention over the KV cache: per layer it hands the
q, k, v of the batch's tokens to an attention callback (`AttentionFn`), which stores k and v
wherever the engine keeps them and returns the attention output. That is what lets the
engine lay KV out as a tree of shared segments (see `attention_plan`) while the model stays
a straight stack of matmuls.

Inputs are one flat, unpadded batch: `token_ids [T]` and their absolute `positions [T]`,
for tokens of any number of sequences, prefill chunks and decode tokens mixed. Every
operation but attention is per token, so the model never needs to know which token belongs
to which sequence.

Numerics follow the Hugging Face reference, op for op where it matters in bf16/fp16:
RMSNorm in fp32 then cast back before the weight, rope in the activation dtype, residual
adds in the activation dtype. q/k/v (and gate/up) are one fused matmul each; `weights.py`
concatenates the checkpoint's separate matrices into them.

Parameters are created uninitialised (`torch.empty`) on the target device and dtype:
`weights.load_model` fills every one of them, and checks that it did.

in → out: (token_ids [T], positions [T], attention) → logits [N, V] fp32 for the rows asked.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefixbatch.executors.native import dense, pointwise
from prefixbatch.executors.native.attention import invariant
from prefixbatch.executors.native.config import ModelConfig
from prefixbatch.executors.native.rope import apply_rope, inverse_frequencies, rope_angles
from prefixbatch.executors.native.span_kernel import load_span_kernel

__all__ = ["AttentionFn", "CausalLM"]


class AttentionFn(Protocol):
    """The engine's side of attention, called once per layer per forward."""

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q: [T, H, D], k, v: [T, Hkv, D] (after norms and rope) → out: [T, H, D].

        Must store k, v for later steps and attend each query to its own context, including
        the keys of this call's tokens that precede it (and itself).

        A callback may also offer `attend_unroped(layer, q, k, v, cos, sin, rows=None)`: the
        same with q and k before rope (cos, sin [T, D/2] from `rope_angles`), returning None
        where it cannot apply rope itself (then the model does, and calls it as above); given
        rows (ascending, distinct), it stores every row's k, v as ever but returns only those
        rows' outputs [len(rows), H, D]."""
        ...


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x Wᵀ (+ b), with W: [out, in] as in the checkpoints; no init (the loader fills it).

    `pack` (once loaded) trades W for `dense.PackedWeight`, a copy laid out for the CPU's
    GEMM kernel: same products, computed 2-3x faster on CPUs the default BLAS underserves."""

    def __init__(
        self, num_in: int, num_out: int, *, bias: bool, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.weight = _empty(num_out, num_in, dtype=dtype, device=device)
        self.bias = _empty(num_out, dtype=dtype, device=device) if bias else None
        self.packed: dense.PackedWeight | None = None

    def pack(self) -> None:
        """Packs W (`dense.PackedWeight`); this module drops its reference to the dense W."""
        self.packed = dense.PackedWeight.of(self.weight)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm, optionally with the residual add before it (`forward(x, residual)`), computed
    by the model's `pointwise` passes (PyTorch's ops, our C library's one pass, or compiled)."""

    def __init__(self, dim: int, *, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty(dim, dtype=dtype, device=device)
        self.pointwise = pointwise.EAGER

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); or, given the residual stream, (norm(residual + x), residual + x)."""
        if residual is None:
            return self.pointwise.norm(x, self.weight, self.eps)
        return self.pointwise.add_norm(residual, x, self.weight, self.eps)


class SelfAttention(nn.Module):
    """Projections, q/k norms and rope around the engine's attention callback."""

    def __init__(
        self, config: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        kind = {"dtype": dtype, "device": device}
        self.qkv_proj = Linear(
            config.hidden_size, q_size + 2 * kv_size, bias=config.qkv_bias, **kind
        )
        self.o_proj = Linear(q_size, config.hidden_size, bias=config.o_bias, **kind)
        self.rope = apply_rope  # or a compiled form (`CausalLM.use_pointwise`)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, **kind)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, **kind)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, E] → [T, E]; rows (ascending, distinct): [len(rows), E], those rows' outputs
        only (every row's k, v is stored all the same)."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # q: [T, H, D]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # k, v: [T, Hkv, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        unroped = getattr(attention, "attend_unroped", None)  # rope inside the callback's kernel
        out = None if unroped is None else unroped(self.layer, q, k, v, cos, sin, rows=rows)
        if out is None:
            if self.q_norm is not None:
                q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
            else:  # q and k side by side in qkv: rotate them in one go
                heads = self.num_heads + self.num_kv_heads
                qk = qkv[:, : heads * self.head_dim].view(num_tokens, heads, self.head_dim)
                q, k = self.rope(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
            out = attention(self.layer, q, k, v)  # out: [T, H, D]
            if rows is not None:
                out = out[rows]
        num_out = num_tokens if rows is None else rows.shape[0]
        assert out.shape == (num_out, *q.shape[1:]), (
            f"attention returned {tuple(out.shape)}, expected {(num_out, *q.shape[1:])}"
        )
        return self.o_proj(out.reshape(num_out, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul — or, packed, as two
    oneDNN products with the activation and the product fused into them (`dense`)."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        kind = {"bias": config.mlp_bias, "dtype": dtype, "device": device}
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, **kind)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, **kind)
        self.gate: dense.PackedWeight | None = None  # packed: gate's and up's halves apart
        self.up: dense.PackedWeight | None = None
        self.gate_bias: torch.Tensor | None = None
        self.up_bias: torch.Tensor | None = None

    def pack(self) -> None:
        """Packs gate and up apart (`dense.PackedWeight`) and down; drops the dense weights."""
        weight, bias = self.gate_up_proj.weight, self.gate_up_proj.bias
        half = weight.shape[0] // 2
        self.gate, self.up = dense.PackedWeight.of(weight[:half]), dense.PackedWeight.of(weight[half:])
        if bias is not None:
            self.gate_bias, self.up_bias = bias[:half].contiguous(), bias[half:].contiguous()
        self.gate_up_proj = None
        self.down_proj.pack()

    def forward(self, x: torch.Tensor, batch_invariant: bool = False) -> torch.Tensor:
        if self.gate is not None:
            activated = self.gate.linear(x, self.gate_bias, then="swish")  # silu(gate(x))
            return self.down_proj(self.up.linear_times(x, activated, self.up_bias))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        act = invariant.silu if batch_invariant else F.silu
        return self.down_proj(act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        kind = {"dtype": dtype, "device": device}
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kind)
        self.self_attn = SelfAttention(config, layer, **kind)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kind)
        self.mlp = MLP(config, **kind)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
        batch_invariant: bool = False,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) [T, E] each → the layer's MLP output and the residual stream
        before it is added (the next norm adds it: one pass, `RMSNorm`). residual None: the
        first layer (hidden is the embedding). rows: [len(rows), E] each, those rows only
        (`SelfAttention`)."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attended = self.self_attn(normed, cos, sin, attention, rows)
        if rows is not None:
            residual = residual[rows]
        normed, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(normed, batch_invariant), residual


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and lm_head (possibly tied to the embedding)."""

    def __init__(
        self, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        device = torch.device(device)
        kind = {"dtype": dtype, "device": device}
        self.config = config
        self.embed_tokens = _empty(config.vocab_size, config.hidden_size, **kind)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, **kind) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kind)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, **kind)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens
        # fp32 whatever the weights' dtype: angles at large positions need the precision.
        self.register_buffer(
            "inv_freq", inverse_frequencies(config.rope, config.head_dim, device), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def is_packed(self) -> bool:
        return self.lm_head.packed is not None

    def pack(self) -> None:
        """Every linear layer's weight packed for the CPU (`dense`), and the norms' residual
        adds fused (our C library's pass; PyTorch's ops without a C compiler); call once,
        after loading. Then not `batch_invariant` (its guarantees hold for the dense path)."""
        for module in list(self.modules()):
            if isinstance(module, MLP) and module.gate is None:
                module.pack()
        for module in self.modules():
            if isinstance(module, Linear) and module.packed is None:
                module.pack()
        library = load_span_kernel()  # None without a C compiler: PyTorch's ops
        if library is not None and self.dtype in (torch.float32, torch.bfloat16):
            self.use_pointwise(pointwise.of_library(library))

    def use_pointwise(self, passes: pointwise.Pointwise) -> None:
        """Every norm and rope computed by `passes` (`pointwise`: the C library's on the CPU,
        compiled ones on CUDA)."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.pointwise = passes
            elif isinstance(module, SelfAttention):
                module.rope = passes.rope

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        *,
        logits_rows: torch.Tensor | None = None,
        batch_invariant: bool = False,
    ) -> torch.Tensor:
        """Logits [N, V] fp32 of the rows `logits_rows` (all T rows when None).

        batch_invariant: every row computed the same whatever the others (`invariant`): dense
        layers see a row count rounded up to `invariant.ROW_MULTIPLE` (padding rows of token 0
        at position 0, computed and dropped; the attention callback gets them last and must
        leave them alone), and SiLU is `invariant.silu`."""
        assert token_ids.ndim == 1 and positions.shape == token_ids.shape, (
            token_ids.shape,
            positions.shape,
        )
        assert not (batch_invariant and self.is_packed), "batch_invariant needs the dense path"
        num_rows = token_ids.shape[0]
        row_multiple = invariant.ROW_MULTIPLE if batch_invariant else 1
        if logits_rows is None and batch_invariant:
            logits_rows = torch.arange(num_rows, device=token_ids.device)
        token_ids, positions = _pad_rows(token_ids, row_multiple), _pad_rows(positions, row_multiple)
        hidden = F.embedding(token_ids, self.embed_tokens)  # [T', E]
        residual = None
        cos, sin = rope_angles(positions, self.inv_freq)  # [T, D/2] each
        # Past the last layer's k, v only the logits rows matter: that layer's attention, o_proj
        # and MLP run for them alone (a prefill chunk asks for one row's logits of thousands).
        wanted = None if batch_invariant else _distinct_rows(logits_rows, num_rows, token_ids.device)
        rows = None if wanted is None else wanted[0]
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            hidden, residual = layer(hidden, residual, cos, sin, attention, batch_invariant, rows if last else None)
        normed = self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]  # [T' or R, E]
        if wanted is not None:
            normed = normed[wanted[1]]  # [N, E]
        elif logits_rows is not None:
            # Only the rows that will be sampled pay for the vocabulary projection, the largest
            # matmul of a decode step.
            normed = normed[_pad_rows(logits_rows, row_multiple).to(normed.device)]  # [N', E]
        logits = self.lm_head(normed).float()  # [N', V]
        return logits[: num_rows if logits_rows is None else logits_rows.shape[0]]  # [N, V]


def _distinct_rows(
    logits_rows: torch.Tensor | None, num_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, where) on `device`: the distinct rows of logits_rows, ascending, and each logits
    row's place among them (logits_rows == rows[where]); None when that is every row (or no
    logits_rows). Found on the host (the engine hands logits_rows on the CPU): on a GPU,
    `unique` would make the host wait for the device in the middle of the step."""
    if logits_rows is None:
        return None
    rows, where = np.unique(logits_rows.cpu().numpy(), return_inverse=True)
    if rows.shape[0] == num_rows:
        return None
    return torch.from_numpy(rows).to(device), torch.from_numpy(where.reshape(-1)).to(device)


def _pad_rows(index: torch.Tensor, multiple: int) -> torch.Tensor:
    """A 1-d tensor with zeros appended up to a multiple of `multiple` entries."""
    missing = -index.shape[0] % multiple
    return F.pad(index, (0, missing)) if missing else index
