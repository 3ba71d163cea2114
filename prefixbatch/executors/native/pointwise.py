"""The model's pointwise passes — RMSNorm (with the residual add before it) and rope — in the
forms a device runs best: PyTorch's ops, our C library's one-pass add + norm (CPU, packed),
or one `torch.compile`d kernel each (CUDA).

Eager on a GPU, an RMSNorm is about eight kernel launches (casts, square, mean, rsqrt,
products) and its residual add one more; rope about ten. Inductor fuses each into one. With
`emulate_precision_casts` it rounds where the eager ops round (bf16 intermediates), so the
compiled passes give eager's bf16 results bit for bit (checked on the CPU through inductor's
CPU backend: tests/executors/native/test_pointwise.py; fp32 norms may differ in the last
bit, by the order of a vectorised mean).

in → out: `Pointwise` (norm, add_norm, rope) for a model's device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from prefixbatch.executors.native.rope import apply_rope

__all__ = ["EAGER", "Pointwise", "add_rms_norm", "compiled", "of_library", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) · weight, rounded as transformers' modules round."""
    if x.dtype == torch.float32:  # one fused kernel, bit for bit the lines below (measured)
        return torch.rms_norm(x, weight.shape, weight, eps)
    # Statistics in fp32: a bf16 mean of squares over thousands of features is too coarse.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) · weight, residual + x)."""
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


@dataclass(frozen=True)
class Pointwise:
    norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    add_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


EAGER = Pointwise(rms_norm, add_rms_norm, apply_rope)


def of_library(library) -> Pointwise:
    """The C library's residual add + norm in one pass (`SpanKernel.add_rms_norm`: the
    residual updated in place), PyTorch's ops for the rest."""

    def add_norm(residual, x, weight, eps):
        return library.add_rms_norm(residual, x, weight, eps), residual

    return Pointwise(rms_norm, add_norm, apply_rope)


@cache
def compiled() -> Pointwise:
    """The three passes compiled (once per process; each compiles at its first call, for any
    row count: `dynamic`)."""
    import torch._inductor.config as inductor

    inductor.emulate_precision_casts = True  # round bf16 intermediates as eager does

    def compile_(fn):
        return torch.compile(fn, dynamic=True, fullgraph=True)

    return Pointwise(compile_(rms_norm), compile_(add_rms_norm), compile_(apply_rope))
