"""Sampling shared by both executors: inverse-CDF draws and the no-cut fast path."""

from __future__ import annotations

import numpy as np
import torch

from prefixbatch.executors.sampling import draw_tokens, inverse_cdf, uniforms
from prefixbatch.types import SamplingParams


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([inverse_cdf(probs, torch.rand(1, generator=generator)) for _ in range(20_000)])
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    assert frequencies[1] == 0  # probability 0 is never drawn
    torch.testing.assert_close(frequencies, probs[0].double(), atol=0.015, rtol=0)


def test_inverse_cdf_edges_never_land_on_impossible_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    lowest = inverse_cdf(probs, torch.tensor([0.0, 0.0]))
    highest = inverse_cdf(probs, torch.tensor([1.0 - 2**-24] * 2))
    # The uniform is never 1, but a rounded product can reach the total: clamped, not past it.
    beyond = inverse_cdf(probs, torch.tensor([1.0] * 2))
    assert lowest.tolist() == [1, 2] and highest.tolist() == [2, 2] and beyond.tolist() == [2, 2]


def test_draw_tokens_is_reproducible_per_row_and_respects_top_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def draw(top_k: list[int], seeds: list[int]) -> list[int]:
        params = [SamplingParams(max_tokens=1, temperature=1.0, top_k=k or None) for k in top_k]
        return draw_tokens(logits[: len(seeds)], params, uniforms(seeds, [0] * len(seeds))).tolist()

    assert draw([0, 0, 0], [5, 6, 7]) == draw([0, 0, 0], [5, 6, 7])
    assert draw([0], [5]) == draw([0, 0, 0], [5, 6, 7])[:1]  # a row's draw ignores its batch mates
    top2 = logits.topk(2, dim=-1).indices
    for seed in range(20):
        drawn = draw([2, 2, 2], [seed, seed + 100, seed + 200])
        assert all(token in top2[row].tolist() for row, token in enumerate(drawn))


def test_uniform_streams_are_uniform_independent_and_addressable():
    # 100,000 draws: 1,000 streams (consecutive seeds, as samples' seeds may be) × 100 draws each.
    seeds = np.repeat(np.arange(1_000), 100)
    counters = np.tile(np.arange(100), 1_000)
    drawn = uniforms(seeds.tolist(), counters.tolist())
    assert drawn.min() >= 0 and drawn.max() < 1
    histogram = np.histogram(drawn, bins=20, range=(0, 1))[0]
    assert np.abs(histogram - 5_000).max() < 5 * np.sqrt(5_000)  # five sigmas
    by_stream = drawn.reshape(1_000, 100)
    assert abs(np.corrcoef(by_stream[:-1].ravel(), by_stream[1:].ravel())[0, 1]) < 0.02  # neighbour seeds
    assert abs(np.corrcoef(by_stream[:, :-1].ravel(), by_stream[:, 1:].ravel())[0, 1]) < 0.02  # neighbour draws
    # Draw k of a stream is the same alone or among others, and for any seed a Python int holds.
    assert uniforms([7], [42])[0] == drawn[7 * 100 + 42]
    assert 0 <= uniforms([-3, 2**80], [0, 0]).min()


def test_min_p_keeps_exactly_the_tokens_a_plain_loop_keeps():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(3)) * 2
    params = [SamplingParams(max_tokens=1, temperature=t, min_p=m) for t, m in ((1.0, 0.0), (1.0, 0.3), (0.7, 0.05), (2.0, 0.9))]
    for draw in range(50):
        drawn = draw_tokens(logits, params, uniforms([11, 12, 13, 14], [draw] * 4)).tolist()
        for row, (p, token) in enumerate(zip(params, drawn, strict=True)):
            probs = torch.softmax(logits[row] / p.temperature, dim=-1)
            kept = probs >= p.min_p * probs.max()
            assert kept[token]  # never a token min_p removes
            # and the same token as a plain inverse CDF over the kept ones
            cdf = torch.where(kept, probs, 0.0).double().cumsum(0)
            u = float(uniforms([11 + row], [draw])[0])
            assert token == int((cdf <= u * cdf[-1]).sum())
