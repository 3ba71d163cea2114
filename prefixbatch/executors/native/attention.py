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

in → out: q [Tq, H, D], k, v [Tk, Hkv, D] → out [Tq, H, D] (q's dtype), lse [Tq, H] fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["attend", "attend_gathered", "causal_mask", "merge", "reference_attention"]


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
    num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads, _ = k.shape
    assert v.shape == k.shape and k.shape[2] == head_dim, (q.shape, k.shape, v.shape)
    assert num_heads % num_kv_heads == 0, (q.shape, k.shape)
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per row over that row's own gathered keys, all rows in one batched product.

    q [R, H, D]; k, v [R, L, Hkv, D] (row r's keys, padded to L); valid [R, L] bool (False on
    padding) → (out [R, H, D] in q's dtype, lse [R, H] fp32). The decode fast path: many
    sequences each with a short key list of its own, instead of one `attend` call apiece.
    """
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    q_grouped = q.view(num_rows, num_kv_heads, group, head_dim)  # [R, Hkv, G, D]
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
