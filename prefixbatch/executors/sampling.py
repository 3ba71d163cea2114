"""Per-row sampling inside one `generate` call, each row drawing from its own seeded generator.

transformers samples a whole batch from the global RNG, so a row's draws would depend on its
batch mates. Instead `generate` runs greedy (`do_sample=False`) and `SeededSampler`, a
logits processor, draws the token of every sampled row itself: temperature, then top-k,
then top-p (on the top-k survivors, as transformers and vLLM order them), then one
uniform number from the row's generator, mapped through the row's cumulative distribution
(inverse-CDF sampling: one random number per row and step, where `torch.multinomial` draws
one per vocabulary entry and costs ~0.4 ms a row). It returns scores that are -inf
everywhere but the drawn token, so greedy's argmax picks exactly that token. Greedy rows
(temperature 0) pass through untouched, so they stay transformers' own greedy.

Invariant: a request's generator is seeded with its `SamplingParams.seed` and advanced once
per decoding step, whichever rows share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from prefixbatch.types import SamplingParams

__all__ = ["SeededSampler", "draw_tokens", "filter_logits", "inverse_cdf"]


class SeededSampler(LogitsProcessor):
    """Draws the next token of each sampled row with that row's own seeded generator."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device) -> None:
        self.rows = [row for row, p in enumerate(params) if not p.is_greedy]
        sampled = [params[row] for row in self.rows]
        self.generators = [torch.Generator(device=device).manual_seed(p.seed) for p in sampled]
        # Per sampled row: [S]. top_k None means no cut, i.e. the whole vocabulary.
        self.temperature = torch.tensor([p.temperature for p in sampled], device=device)
        self.top_k = torch.tensor([p.top_k or 0 for p in sampled], device=device)
        self.top_p = torch.tensor([p.top_p for p in sampled], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, V] float32
        if not self.rows:
            return scores
        rows = torch.tensor(self.rows, device=scores.device)
        drawn = draw_tokens(
            scores[rows], self.temperature, self.top_k, self.top_p, self.generators
        )  # [S]
        out = scores.clone()
        out[rows] = float("-inf")
        out[rows, drawn] = 0.0
        return out


def draw_tokens(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """One token per row, each from its own generator. scores: [S, V]; the rest: [S] (top_k 0:
    no cut) → [S] token ids. Shared by `hf` and `native`, so both draw the same way."""
    top_k = torch.where(top_k > 0, top_k, scores.shape[-1])
    logits = scores / temperature[:, None]  # [S, V]
    if bool((top_k < scores.shape[-1]).any() or (top_p < 1.0).any()):  # else nothing is cut
        logits = filter_logits(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return inverse_cdf(probs, [torch.rand((), generator=g, device=g.device) for g in generators])


def inverse_cdf(probs: torch.Tensor, uniforms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row the first token whose cumulative probability exceeds the row's uniform in [0, 1).

    probs: [S, V] (rows need not sum exactly to 1); uniforms: S scalars → [S] token ids. A
    token of probability 0 (cut by top-k/top-p) is never picked: its cumulative sum equals
    its predecessor's, so no uniform lands between them. fp64 sums keep tail tokens' odds.
    """
    cdf = probs.double().cumsum(dim=-1)  # [S, V]
    targets = torch.stack(list(uniforms)).double() * cdf[:, -1]  # [S]
    tokens = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]  # [S]
    # A product rounded up to the total would fall past the end: take the last possible token.
    last_possible = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(tokens, last_possible)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf where each row's top-k, then top-p, cut removes. logits: [S, V]; top_k, top_p: [S]."""
    # Stable descending sort: among equal logits the lower id ranks first, as argmax picks it.
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # [S, V]
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    removed = ranks[None, :] >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(removed, float("-inf")), dim=-1)
    # Keep the smallest head whose mass reaches top_p; the first token always stays. top_p 1
    # cuts nothing, not even tokens behind a cumulative sum that rounded past 1.
    removed |= ((probs.cumsum(dim=-1) - probs) > top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(removed, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
