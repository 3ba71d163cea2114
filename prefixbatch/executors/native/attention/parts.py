"""Exact attention over one KV segment, and the exact merge of attention over several.

Softmax attention over keys K = K₁ ∪ K₂ ∪ … (disjoint segments) decomposes exactly:
with, for each part i, oᵢ = softmax(q·Kᵢ) Vᵢ and lseᵢ = log Σⱼ exp(q·kⱼ) over Kᵢ,

    lse = log Σᵢ exp(lseᵢ)        o = Σᵢ exp(lseᵢ − lse) · oᵢ

This is what lets the queries of every sequence under a shared prefix attend to that prefix
in one matrix-matrix product and to their own tokens separately (`attention_plan`).

Invariants:
- Scores, softmax and lse are fp32 whatever the input dtype; q·k and p·v run in the input
  dtype (tensor cores on GPUs, fp32 accumulation inside). `merge` weighs parts in fp32.
- A query with no keys (empty segment, or masked out entirely) gets out = 0 and
  lse = -inf, so it weighs nothing in a merge; a merge of only such parts gives 0, -inf.
- GQA: each kv head serves H / Hkv query heads; those heads' queries are stacked into one
  matrix against the kv head's keys, so K and V are never repeated in memory.

Two implementations of the same contract: `attend_matmul` (batched `bmm` and an fp32
softmax, any device, the portable path) and `attend_fused` (PyTorch's fused flash-attention
kernel for the CPU, `aten._scaled_dot_product_flash_attention_for_cpu`, which returns the
log-sum-exp beside the output and never materialises the scores). `attend` picks the fused
kernel where it runs (CPU tensors) and the matmul path elsewhere; tests hold both to the
plain reference.

in → out: q [Tq, H, D], k, v [Tk, Hkv, D] → out [Tq, H, D] (q's dtype), lse [Tq, H] fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "attend",
    "attend_fused",
    "fused_available",
    "attend_gathered",
    "attend_matmul",
    "causal_mask",
    "merge",
    "reference_attention",
]

# PyTorch's fused CPU attention that also returns the log-sum-exp (the public
# `scaled_dot_product_attention` does not). Inputs [B, H, T, D] with any strides, all one
# dtype; an additive float mask broadcastable to [B, H, Tq, Tk]; out [B, H, Tq, D] in the
# inputs' dtype, lse [B, H, Tq] fp32 (-inf where a query sees no key, out 0 there).
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_available(q: torch.Tensor) -> bool:
    """Whether `attend_fused` runs for tensors like q: CPU tensors, on a PyTorch that has the kernel."""
    return _flash_cpu is not None and q.device.type == "cpu"



def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one segment: (out [Tq, H, D], lse [Tq, H] fp32).

    causal_offset None: every query sees every key. Otherwise query i sees keys
    j ≤ i + causal_offset: 0 when q are the segment's own tokens from its start; the offset
    of the first query within the segment when they are a later chunk of it.
    """
    if fused_available(q):
        return attend_fused(q, k, v, scale=scale, causal_offset=causal_offset)
    return attend_matmul(q, k, v, scale=scale, causal_offset=causal_offset)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    assert v.shape == k.shape and k.shape[2] == q.shape[2], (q.shape, k.shape, v.shape)
    assert q.shape[1] % k.shape[1] == 0, (q.shape, k.shape)


def attend_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` on the fused CPU kernel (see `fused_available`); same contract and results.

    The kernel's causal mask is aligned top-left (query i sees key i), so a chunk that
    continues its segment (offset > 0, the usual case: keys = everything before the chunk
    plus the chunk) is two calls merged: the keys before the chunk, seen by every query,
    and the chunk's own square, causal. Other offsets go to `attend_matmul`.
    """
    _check_shapes(q, k, v)
    num_queries, num_keys = q.shape[0], k.shape[0]
    if num_keys == 0 or num_queries == 0:
        return _empty_result(q)
    if causal_offset is None or causal_offset >= num_keys - 1:  # no key is hidden
        return _flash(q, k, v, scale=scale, causal=False)
    if causal_offset < 0 or causal_offset != num_keys - num_queries:
        return attend_matmul(q, k, v, scale=scale, causal_offset=causal_offset)
    own = _flash(q, k[causal_offset:], v[causal_offset:], scale=scale, causal=True)
    if causal_offset == 0:
        return own
    before = _flash(q, k[:causal_offset], v[:causal_offset], scale=scale, causal=False)
    return merge([before, own])


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # GQA without copies: query head h = kv_head · G + g becomes batch g, head kv_head, and
    # every batch reads the same K, V through a stride-0 view.
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if num_queries == 1:  # a decode row: its G heads per kv head are G queries of one batch
        q4 = q.view(1, num_kv_heads, group, head_dim)  # [1, Hkv, G, D]; keys read once, not G times
        out, lse = _flash_cpu(q4, k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None], 0.0, False, scale=scale)
        return out.reshape(1, num_heads, head_dim), lse.reshape(1, num_heads).float()
    q4 = q.view(num_queries, num_kv_heads, group, head_dim).permute(2, 1, 0, 3)  # [G, Hkv, Tq, D]
    k4 = k.permute(1, 0, 2)[None].expand(group, -1, -1, -1)  # [G, Hkv, Tk, D]
    v4 = v.permute(1, 0, 2)[None].expand(group, -1, -1, -1)
    out, lse = _flash_cpu(q4, k4, v4, 0.0, causal, scale=scale)  # [G, Hkv, Tq, D], [G, Hkv, Tq]
    out = out.permute(2, 1, 0, 3).reshape(num_queries, num_heads, head_dim)
    return out, lse.permute(2, 1, 0).reshape(num_queries, num_heads).float()


def attend_matmul(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend` with batched `bmm` and an fp32 softmax: any device, any offset."""
    _check_shapes(q, k, v)
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    if num_keys == 0 or num_queries == 0:
        return _empty_result(q)
    group = num_heads // num_kv_heads
    # Query head h uses kv head h // group: each kv head's group of queries becomes one
    # matrix, multiplied once against that head's keys.
    # q_grouped: [Hkv, G·Tq, D]
    q_grouped = q.view(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q_grouped = q_grouped.reshape(num_kv_heads, group * num_queries, head_dim)
    scores = torch.bmm(q_grouped, k.permute(1, 2, 0)).float() * scale  # [Hkv, G·Tq, Tk]
    scores = scores.view(num_kv_heads, group, num_queries, num_keys)
    if causal_offset is not None and causal_offset < num_keys - 1:  # else no key is hidden
        mask = causal_mask(num_queries, num_keys, causal_offset, device=q.device)  # [Tq, Tk]
        scores = scores.masked_fill(~mask, float("-inf"))
    probs, lse = _softmax_with_lse(scores)  # [Hkv, G, Tq, Tk], [Hkv, G, Tq]
    probs = probs.to(v.dtype).view(num_kv_heads, group * num_queries, num_keys)
    out = torch.bmm(probs, v.permute(1, 0, 2))  # [Hkv, G·Tq, D]
    # Back to query-major order; head h = kv_head · G + g, as the view above split it.
    out = out.view(num_kv_heads, group, num_queries, head_dim).permute(2, 0, 1, 3)
    lse = lse.permute(2, 0, 1)  # [Tq, Hkv, G]
    return out.reshape(num_queries, num_heads, head_dim), lse.reshape(num_queries, num_heads)


def attend_gathered(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    *,
    scale: float,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row over that row's own gathered keys, all rows in one batched product.

    q [R, H, D]; k, v [R, L, Hkv, D] (row r's keys, padded to L); valid [R, L] bool (False on
    padding) → (out [R, H, D] in q's dtype, lse [R, H] fp32). The decode fast path: many
    sequences each with a short key list of its own, instead of one `attend` call apiece.
    fused: the fused CPU kernel (None: where `fused_available`) or einsum products.
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q_grouped = q.view(num_rows, num_kv_heads, group, head_dim)  # [R, Hkv, G, D]
    if fused_available(q) if fused is None else fused:
        # Each row a batch of its own, its G query heads per kv head as G queries.
        mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill_(~valid, float("-inf"))[:, None, None, :]  # [R, 1, 1, L]
        out, lse = _flash_cpu(
            q_grouped, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), 0.0, False, attn_mask=mask, scale=scale
        )  # [R, Hkv, G, D], [R, Hkv, G]
        return out.reshape(num_rows, num_heads, head_dim), lse.reshape(num_rows, num_heads).float()
    scores = torch.einsum("rkgd,rlkd->rkgl", q_grouped, k).float() * scale  # [R, Hkv, G, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs, lse = _softmax_with_lse(scores)  # [R, Hkv, G, L], [R, Hkv, G]
    out = torch.einsum("rkgl,rlkd->rkgd", probs.to(v.dtype), v)  # [R, Hkv, G, D]
    return out.reshape(num_rows, num_heads, head_dim), lse.reshape(num_rows, num_heads)


def causal_mask(
    num_queries: int, num_keys: int, offset: int, *, device: torch.device
) -> torch.Tensor:
    """[Tq, Tk] bool: True where query i may see key j, i.e. j ≤ i + offset."""
    rows = torch.arange(num_queries, device=device)[:, None]
    cols = torch.arange(num_keys, device=device)[None, :]
    return cols <= rows + offset


def _softmax_with_lse(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Subtract the row max before exp; a fully masked row has max -inf, replaced by 0 so
    # that its exps are exactly 0 (not nan) and its lse comes out as log(0) = -inf.
    row_max = scores.amax(dim=-1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exps = torch.exp(scores - row_max[..., None])
    total = exps.sum(dim=-1)
    probs = exps / total.clamp_min(torch.finfo(total.dtype).tiny)[..., None]
    return probs, row_max + torch.log(total)


def _empty_result(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    return torch.zeros_like(q), lse


def merge(parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact combination of attention parts of the same queries over disjoint key sets.

    parts: (out [Tq, H, D], lse [Tq, H] fp32) each → (out, lse) over the union of their keys.
    """
    assert parts, "merge needs at least one part"
    if len(parts) == 2:  # the common case (an accumulator and one more part), without stacking
        (out_a, lse_a), (out_b, lse_b) = parts
        total = torch.logaddexp(lse_a, lse_b)  # -inf only when both are
        safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
        out = out_a.float() * (lse_a - safe_total).exp_()[..., None]
        out.addcmul_(out_b.float(), (lse_b - safe_total).exp_()[..., None])
        return out.to(out_a.dtype), total
    outs = torch.stack([out.float() for out, _ in parts])  # [P, Tq, H, D]
    lses = torch.stack([lse for _, lse in parts])  # [P, Tq, H]
    total = torch.logsumexp(lses, dim=0)  # [Tq, H]; all parts empty → -inf
    # Parts with lse -inf weigh 0; a query whose total is -inf has only such parts.
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lses - safe_total)  # [P, Tq, H]
    out = (weights[..., None] * outs).sum(dim=0)
    return out.to(parts[0][0].dtype), total


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal_offset: int | None = None,
) -> torch.Tensor:
    """Plain attention for tests: kv heads repeated, one masked fp32 softmax, no lse tricks.

    q [Tq, H, D], k, v [Tk, Hkv, D] (a sequence's whole context) → out [Tq, H, D] fp32.
    Same masking convention as `attend`; every query must see at least one key.
    """
    group = q.shape[1] // k.shape[1]
    k_full = k.float().repeat_interleave(group, dim=1)  # [Tk, H, D]
    v_full = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k_full) * scale  # [H, Tq, Tk]
    if causal_offset is not None:
        mask = causal_mask(q.shape[0], k.shape[0], causal_offset, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v_full)
