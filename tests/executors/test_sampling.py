"""Sampling shared by both executors: inverse-CDF draws and the no-cut fast path."""

from __future__ import annotations

import torch

from prefixbatch.executors.sampling import draw_tokens, inverse_cdf


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([inverse_cdf(probs, [torch.rand((), generator=generator)]) for _ in range(20_000)])
    frequencies = torch.bincount(draws, minlength=4).double() / len(draws)
    assert frequencies[1] == 0  # probability 0 is never drawn
    torch.testing.assert_close(frequencies, probs[0].double(), atol=0.015, rtol=0)


def test_inverse_cdf_edges_never_land_on_impossible_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    lowest = inverse_cdf(probs, [torch.tensor(0.0), torch.tensor(0.0)])
    highest = inverse_cdf(probs, [torch.tensor(1.0 - 2**-24)] * 2)
    # The uniform is never 1, but a rounded product can reach the total: clamped, not past it.
    beyond = inverse_cdf(probs, [torch.tensor(1.0)] * 2)
    assert lowest.tolist() == [1, 2] and highest.tolist() == [2, 2] and beyond.tolist() == [2, 2]


def test_draw_tokens_is_reproducible_per_row_and_respects_top_k():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))

    def draw(top_k: list[int], seeds: list[int]) -> list[int]:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        temperature, top_p = torch.ones(len(seeds)), torch.ones(len(seeds))
        return draw_tokens(logits[: len(seeds)], temperature, torch.tensor(top_k), top_p, generators).tolist()

    assert draw([0, 0, 0], [5, 6, 7]) == draw([0, 0, 0], [5, 6, 7])
    assert draw([0], [5]) == draw([0, 0, 0], [5, 6, 7])[:1]  # a row's draw ignores its batch mates
    top2 = logits.topk(2, dim=-1).indices
    for seed in range(20):
        drawn = draw([2, 2, 2], [seed, seed + 100, seed + 200])
        assert all(token in top2[row].tolist() for row, token in enumerate(drawn))
