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


def greedy(model, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt (end-of-sequence included)."""
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=model.config.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def parting(model, prompt: Sequence[int], a: Sequence[int], b: Sequence[int]) -> str:
    """Where outputs `a` and `b` of `prompt` first differ, and the oracle's top-2 logits there."""
    step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt, *a[:step]]])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return (f"part at output step {step} ({a[step:step + 1]} vs {b[step:step + 1]}); transformers' top-2 there:"
            f" {top.indices.tolist()} logits {top.values.tolist()}, gap {float(top.values[0] - top.values[1]):.2e}")
