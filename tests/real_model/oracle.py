"""Plain transformers as the real-model tier's oracle: one unpadded forward, greedy `generate`,
and where two greedy runs part (a near-tie, or a real difference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def forward_logprobs(model, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per sequence, [len, V]: fp32 log-softmax of one forward pass over the sequences,
    right-padded and masked. Padding after a sequence changes none of its positions (attention
    is causal), and one pass reads the weights once: a 135M model's forward is memory-bound."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[*s, *[0] * (width - len(s))] for s in sequences])  # [B, T]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.inference_mode():
        logits = model(ids, attention_mask=mask).logits.float()  # [B, T, V]
    return [torch.log_softmax(logits[i, : len(s)], dim=-1) for i, s in enumerate(sequences)]


def greedy(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuations of `prompts` (one left-padded batch), each cut before
    its end-of-sequence."""
    eos = model.config.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[*[eos] * (width - len(p)), *p] for p in prompts])  # [B, T]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos)[:, width:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in out]


def parting(model, prompt: Sequence[int], a: Sequence[int], b: Sequence[int]) -> str:
    """Where outputs `a` and `b` of `prompt` first differ, and the oracle's top-2 logits there."""
    step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt, *a[:step]]])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return (f"part at output step {step} ({a[step:step + 1]} vs {b[step:step + 1]}); transformers' top-2 there:"
            f" {top.indices.tolist()} logits {top.values.tolist()}, gap {float(top.values[0] - top.values[1]):.2e}")
