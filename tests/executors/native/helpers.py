"""Test helpers for the native model: a contiguous single-sequence KV, and greedy decoding."""

from __future__ import annotations

import torch

from prefixbatch.executors.native.attention.parts import attend
from prefixbatch.executors.native.model import CausalLM


class ContiguousKV:
    """The simplest attention callback: one sequence, its KV appended to one tensor per layer."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.keys[layer] = torch.cat([self.keys[layer], k]) if layer in self.keys else k
        self.values[layer] = torch.cat([self.values[layer], v]) if layer in self.values else v
        # The new tokens are the last q.shape[0] keys: query i sits at key index offset + i.
        offset = self.keys[layer].shape[0] - q.shape[0]
        out, _ = attend(
            q, self.keys[layer], self.values[layer], scale=self.scale, causal_offset=offset
        )
        return out


@torch.inference_mode()
def greedy(
    model: CausalLM, prompt: list[int], num_steps: int
) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """(prompt logits [P, V], generated ids, logits of each step [V]) with a contiguous KV."""
    kv = ContiguousKV(model.config.attention_scale)
    device = model.device
    prompt_logits = model(
        torch.tensor(prompt, device=device), torch.arange(len(prompt), device=device), kv
    )
    logits, ids, step_logits = prompt_logits[-1], [], []
    for step in range(num_steps):
        step_logits.append(logits)
        ids.append(int(logits.argmax()))
        if step + 1 < num_steps:
            position = torch.tensor([len(prompt) + step], device=device)
            logits = model(torch.tensor(ids[-1:], device=device), position, kv)[0]
    return prompt_logits, ids, step_logits
