"""Per-row sampling inside one `generate` call, each row drawing from its own seeded stream.

transformers samples a whole batch from the global RNG, so a row's draws would depend on its
batch mates. Instead `generate` runs greedy (`do_sample=False`) and `SeededSampler`, a
logits processor, draws the token of every sampled row itself: temperature, then top-k,
then top-p (on the top-k survivors, as transformers and vLLM order them), then one
uniform number of the row's own stream, mapped through the row's cumulative distribution
(inverse-CDF sampling: one random number per row and step, where `torch.multinomial` draws
one per vocabulary entry and costs ~0.4 ms a row). It returns scores that are -inf
everywhere but the drawn token, so greedy's argmax picks exactly that token. Greedy rows
(temperature 0) pass through untouched, so they stay transformers' own greedy.

Invariant: a request's k-th output token is drawn with `uniforms(seed, k)`: a counter-based
stream (a hash of the request's `SamplingParams.seed` and k), whichever rows share its batch.
A step's uniforms are one array for all its rows (no generator object per row, no launch per
row on a GPU), and a resumed generation needs no replay to continue its stream.

Before any token is picked, `penalize` applies a row's penalties and `min_tokens` mask to its
logits, and `token_logprobs` reads the logprobs a row asked for from the raw logits: both
executors call the same functions, so they agree by construction on everything but the
model's own numerics.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch
from transformers import LogitsProcessor

from prefixbatch.types import Request, SamplingParams, TokenLogprob

__all__ = [
    "LogprobRecorder",
    "Penalizer",
    "SeededSampler",
    "TokenTexts",
    "draw_tokens",
    "filter_logits",
    "inverse_cdf",
    "needs_penalize",
    "penalize",
    "prompt_results",
    "records_k",
    "token_logprobs",
    "uniforms",
]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def uniforms(seeds: Sequence[int], counters: Sequence[int]) -> np.ndarray:
    """[S] float64 in [0, 1): draw number counters[i] of the stream of seeds[i] — SplitMix64's
    output for the state seed + (counter + 1) · golden, its top 53 bits. Every draw of every
    stream is one hash, so a step's draws are one array whatever the rows, on the host."""
    with np.errstate(over="ignore"):  # unsigned arithmetic wraps modulo 2⁶⁴, as the hash wants
        state = np.array([s % 2**64 for s in seeds], dtype=np.uint64)
        z = state + (np.asarray(counters, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SeededSampler(LogitsProcessor):
    """Draws the next token of each sampled row from that row's own seeded stream."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device) -> None:
        self.rows = [row for row, p in enumerate(params) if not p.is_greedy]
        sampled = [params[row] for row in self.rows]
        self.params = sampled
        self.seeds = [p.seed for p in sampled]
        self.step = 0  # tokens drawn so far: every row's stream is at this draw

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # scores: [B, V] float32
        if not self.rows:
            return scores
        rows = torch.tensor(self.rows, device=scores.device)
        drawn = draw_tokens(scores[rows], self.params, uniforms(self.seeds, [self.step] * len(self.seeds)))  # [S]
        self.step += 1
        out = scores.clone()
        out[rows] = float("-inf")
        out[rows, drawn] = 0.0
        return out


class Penalizer(LogitsProcessor):
    """`penalize` inside `generate`: each row's penalties and `min_tokens` mask, over its own
    prompt (unpadded) and the tokens it generated; before `SeededSampler`."""

    def __init__(
        self,
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        stop_ids: Sequence[Sequence[int]],
        prompt_len: int,
    ) -> None:
        self.params, self.stop_ids = list(params), list(stop_ids)
        self.prompts = [frozenset(prompt) for prompt in prompts]
        self.prompt_len = prompt_len  # padded prompt length: generated ids start here

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        num_generated = input_ids.shape[1] - self.prompt_len
        rows = [row for row, p in enumerate(self.params) if needs_penalize(p, num_generated)]
        if not rows:
            return scores
        penalized = scores[rows]  # [P, V], a copy
        penalize(
            penalized,
            [self.params[row] for row in rows],
            [self.prompts[row] for row in rows],
            input_ids[rows, self.prompt_len :].tolist(),
            [self.stop_ids[row] for row in rows],
        )
        out = scores.clone()
        out[rows] = penalized
        return out


class LogprobRecorder(LogitsProcessor):
    """Records, inside `generate`, the logprobs of the rows that ask for them (`token_logprobs`
    on the raw logits); first in the processor list, so it sees them unchanged. A step's
    picked tokens are known at the next call (or, for the last step, from `finish`)."""

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        self.ks = [params[row].logprobs for row in self.rows]
        self.found: dict[int, list[RawLogprob]] = {row: [] for row in self.rows}
        self._pending: torch.Tensor | None = None  # [R, V] raw logits of the last step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.rows:
            self.finish(input_ids[:, -1].tolist())
            self._pending = scores[self.rows]  # a copy
        return scores

    def finish(self, last_tokens: Sequence[int]) -> None:
        """Settles the pending step with the tokens it picked (one per batch row)."""
        if self._pending is None:
            return
        picked = [last_tokens[row] for row in self.rows]
        for row, logprob in zip(self.rows, token_logprobs(self._pending, picked, self.ks), strict=True):
            self.found[row].append(logprob)
        self._pending = None


def draw_tokens(scores: torch.Tensor, params: Sequence[SamplingParams], uniform: np.ndarray) -> torch.Tensor:
    """One token per row of scores [S, V], by that row's params (temperature, top-k, top-p, min-p)
    and its uniform number (`uniforms`) → [S] token ids. Whether anything is cut is read from
    the params, on the host (a device read would make the host wait on a GPU). Shared by `hf`
    and `native`, so both draw the same way."""
    vocab, device = scores.shape[-1], scores.device
    top_k = [p.top_k if p.top_k and p.top_k < vocab else vocab for p in params]  # None or 0: no cut
    top_p = [p.top_p for p in params]
    logits = scores / torch.tensor([p.temperature for p in params], device=device)[:, None]  # [S, V]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):  # else nothing is cut
        logits = filter_logits(logits, torch.tensor(top_k, device=device), torch.tensor(top_p, device=device))
    probs = torch.softmax(logits, dim=-1)
    if any(p.min_p > 0.0 for p in params):  # tokens under min_p × the top token's probability: 0
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
    return inverse_cdf(probs, torch.from_numpy(uniform).to(device))


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row the first token whose cumulative probability exceeds the row's uniform in [0, 1).

    probs: [S, V] (rows need not sum exactly to 1); uniform: [S] → [S] token ids. A
    token of probability 0 (cut by top-k/top-p) is never picked: its cumulative sum equals
    its predecessor's, so no uniform lands between them. fp64 sums keep tail tokens' odds.
    """
    cdf = probs.double().cumsum(dim=-1)  # [S, V]
    targets = uniform.double() * cdf[:, -1]  # [S]
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


def needs_penalize(params: SamplingParams, num_generated: int) -> bool:
    """Whether `penalize` changes this row's logits at a step after `num_generated` tokens."""
    return params.has_penalties or num_generated < params.min_tokens


def penalize(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[AbstractSet[int]],
    outputs: Sequence[Sequence[int]],
    stop_ids: Sequence[Sequence[int]],
) -> None:
    """Each row's logit bias, penalties and `min_tokens` mask, in place. logits: [S, V] fp32 (a
    tensor of the caller's own, not a view of shared logits); per row its params, prompt token
    ids (a set, made once per request: a long prompt is not gone over again every step),
    output tokens so far and stop ids (eos + its `stop_token_ids`).

    First the row's `logit_bias` (OpenAI's: added to the raw logits); then, in vLLM's order:
    transformers' repetition penalty over prompt and output tokens (a logit
    above 0 divided by the penalty, one below multiplied), then OpenAI's frequency and
    presence penalties over the output's token counts, then -inf on the stop ids while the
    output is shorter than `min_tokens`.
    """
    device = logits.device
    for row, (p, prompt, output, stops) in enumerate(zip(params, prompts, outputs, stop_ids, strict=True)):
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias, strict=True)
            logits[row, torch.tensor(ids, device=device)] += torch.tensor(biases, dtype=logits.dtype, device=device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(list(prompt.union(output)), dtype=torch.long, device=device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if output and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
            ids, counts = torch.tensor(output, dtype=torch.long, device=device).unique(return_counts=True)
            logits[row, ids] -= counts.to(logits.dtype) * p.frequency_penalty + p.presence_penalty
        if len(output) < p.min_tokens and stops:
            logits[row, torch.tensor(list(stops), dtype=torch.long, device=device)] = float("-inf")


# A step's logprobs before token texts are attached: (picked id, its logprob, ((id, logprob), ...)).
RawLogprob = tuple[int, float, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[RawLogprob]:
    """Per row the picked token's logprob and the top `k` of the row's distribution.

    logits: [S, V], the raw logits (before penalties, temperature, top-k/top-p); tokens: the
    S picked ids; ks: S counts (0–20). Log-softmax in fp32; top lists most likely first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [S, V]
    picked = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    most = max(ks, default=0)
    top_values, top_ids = torch.topk(logp, most, dim=-1) if most else (logp[:, :0], logp[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        (token, lp, tuple(zip(top_ids[row][:k], top_values[row][:k], strict=True)))
        for row, (token, lp, k) in enumerate(zip(tokens, picked, ks, strict=True))
    ]


class TokenTexts:
    """Each token id's own text (special tokens kept), decoded once per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def named(self, found: Sequence[RawLogprob]) -> tuple[TokenLogprob, ...]:
        """`token_logprobs`' records with every token's text."""
        return tuple(
            TokenLogprob(token, self(token), lp, tuple((i, self(i), v) for i, v in top)) for token, lp, top in found
        )


def records_k(request: Request) -> int:
    """How many alternatives a request's prompt-logprob records need: its `prompt_logprobs`,
    and at least the top one when scoring (whether each token is the argmax)."""
    return max(request.sampling.prompt_logprobs or 0, 1 if request.num_scored_tokens else 0)


def prompt_results(request: Request, records: Sequence[RawLogprob], texts: TokenTexts) -> dict[str, Any]:
    """A completion's prompt fields from the records of its prompt positions from
    `request.logprobs_from` on (one per token, each with ≥ `records_k` alternatives):
    `prompt_logprobs` when asked, and a scoring request's continuation sum and greediness."""
    fields: dict[str, Any] = {}
    k = request.sampling.prompt_logprobs
    if k is not None:
        fields["prompt_logprobs"] = texts.named([(token, lp, top[:k]) for token, lp, top in records])
    if request.num_scored_tokens:
        scored = records[len(records) - request.num_scored_tokens :]
        fields["continuation_logprob"] = float(sum(lp for _, lp, _ in scored))
        fields["continuation_is_greedy"] = all(top[0][0] == token for token, _, top in scored)
    return fields
