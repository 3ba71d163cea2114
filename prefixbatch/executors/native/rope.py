"""Rotary position embeddings: frequencies per rope variant, and their application to q and k.

Positions are absolute token positions in a sequence (a token of a child segment continues
its ancestors' count), given per token, so one flat batch can hold tokens of many sequences
at unrelated positions. Angles are computed in fp32 from the positions on every forward
(no table), which bounds nothing by a maximum length and costs T × D/2 multiplies.

The rotation is the "rotate half" form of Hugging Face checkpoints: dimension i pairs with
i + D/2 (their q/k projections are permuted for it), not with its neighbour.

in → out: positions [T] → (cos, sin) [T, D/2] in fp32; (x [T, n, D], cos, sin) → x rotated.
"""

from __future__ import annotations

import math

import torch

from prefixbatch.executors.native.config import RopeConfig

__all__ = ["apply_rope", "inverse_frequencies", "rope_angles"]


def inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device) -> torch.Tensor:
    """inv_freq: [D/2] fp32, the angle per position of each rotated pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor  # same as dividing every position by factor
    if rope.rope_type == "llama3":
        return _llama3_frequencies(inv_freq, rope)
    return inv_freq


def _llama3_frequencies(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1 stretches only the slow dimensions: wavelengths longer than the training
    # context / low_freq_factor are divided by `factor`, those shorter than context /
    # high_freq_factor are kept, and the band between is blended linearly in 1/wavelength.
    context = rope.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    long_wavelength = context / rope.low_freq_factor
    short_wavelength = context / rope.high_freq_factor
    stretched = inv_freq / rope.factor
    kept_share = (context / wavelength - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - kept_share) * stretched + kept_share * inv_freq
    result = torch.where(wavelength > long_wavelength, stretched, inv_freq)
    in_band = (wavelength >= short_wavelength) & (wavelength <= long_wavelength)
    return torch.where(in_band, blended, result)


def rope_angles(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin): [T, D/2] fp32 for positions [T]; shared by every layer of one forward."""
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, n, D] → x with each pair (i, i + D/2) rotated by its token's angle, in x's dtype."""
    # Rotating in x's dtype (not fp32) is what the checkpoints were trained and served with.
    cos = cos.to(x.dtype)[:, None, :]  # [T, 1, D/2]
    sin = sin.to(x.dtype)[:, None, :]
    first, second = x.chunk(2, dim=-1)  # [T, n, D/2] each
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
