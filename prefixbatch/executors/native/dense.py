"""Dense layers on the CPU with weights packed once: our kernel where the CPU has AVX-512,
else oneDNN.

Why not PyTorch's `F.linear`: in fp32 it calls its BLAS (MKL), and MKL picks a slower code
path on CPUs it does not tune for: measured on this project's AMD EPYC (AVX-512) machine, 2
threads, the model's shapes, MKL reaches 170 GFLOP/s at best where oneDNN (also in every
PyTorch CPU build, and what vLLM's CPU backend calls) reaches 440-490 GFLOP/s; decode-sized
products (4-16 rows) run 2-3x faster on weights packed once than on plain ones (the layout
change otherwise happens on every call), 4-6x faster than MKL. See BENCHMARKS.md, "Native
engine speed".

Why our kernel over oneDNN (`kernels/dense.c`): as fast on a quiet machine (241-256 GFLOP/s
a core on the model's shapes), and its products run on the library's thread pool, whose
loops do not wait for a thread the scheduler parked beside another busy process; oneDNN's
OpenMP split does, and ran every product ~2x slower there (BENCHMARKS.md, "Steady beside a
busy process").

`PackedWeight.of(W)` makes the packed copy once; `linear(x, b)` = x Wᵀ + b, optionally with
the SwiGLU's activation and product fused into the GEMM's output pass (`then="swish"`,
`linear_times`): the separate silu and product would read and write [T, intermediate]
tensors that do not fit in any cache (on a 2,048-row prefill chunk at the Qwen2.5-0.5B shape,
oneDNN's gated half of the MLP took 102 ms fused, 125 ms apart). The results are the same
products summed in another order: equal to `F.linear` within fp32 rounding, not bit for bit
(so `batch_invariant`, whose guarantees were measured on MKL, keeps `F.linear`).

in → out: W [out, in] → PackedWeight; x [T, in] → y [T, out].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixbatch.executors.native.span_kernel import SpanKernel, load_span_kernel

__all__ = ["PackedWeight", "onednn_available", "packing_available"]

# Row count the packed layout is chosen for; any count works, this one suits decode steps
# and prefill chunks alike (measured: 4-1024 rows within 2% of a layout made per count).
_PACK_FOR_ROWS = 64


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether dense layers on (device, dtype) can be packed: fp32 on a CPU, with our kernel
    (AVX-512) or oneDNN."""
    if device.type != "cpu" or dtype != torch.float32:
        return False
    kernel = load_span_kernel()
    return (kernel is not None and kernel.has_dense) or onednn_available()


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed fp32 products."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@dataclass(frozen=True)
class PackedWeight:
    """A linear layer's weight packed once: for our kernel (`kernels/dense.c`) where the
    library has it, else in oneDNN's layout (an opaque `torch._mkldnn` tensor)."""

    packed: torch.Tensor
    num_in: int
    num_out: int
    kernel: SpanKernel | None  # None: oneDNN's

    @classmethod
    def of(cls, weight: torch.Tensor, *, ours: bool = True) -> PackedWeight:
        """ours=False: oneDNN's even where our kernel runs (as CPUs without AVX-512 do)."""
        num_out, num_in = weight.shape
        kernel = load_span_kernel() if ours else None
        if kernel is not None and kernel.has_dense:
            return cls(kernel.pack_dense(weight), num_in, num_out, kernel)
        assert onednn_available(), "no packed products on this machine: check `packing_available` first"
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_FOR_ROWS)
        return cls(packed, num_in, num_out, None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, *, then: str = "none") -> torch.Tensor:
        """x [T, in] → x Wᵀ + bias: [T, out], in x's dtype; then="swish": silu of that, in the
        same pass (no second trip through memory)."""
        assert x.shape[-1] == self.num_in, (tuple(x.shape), self.num_in)
        if self.kernel is not None:
            return self.kernel.dense(x, self.packed, self.num_out, bias, then)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, then, [], "")

    def linear_times(self, x: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(x Wᵀ + bias) · other, elementwise, in one pass."""
        assert x.shape[-1] == self.num_in, (tuple(x.shape), self.num_in)
        if self.kernel is not None:
            return self.kernel.dense(x, self.packed, self.num_out, bias, "times", other)
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), other, self.packed, bias, "mul")
