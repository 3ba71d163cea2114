"""Dense layers on the CPU with weights packed once: our kernel where the CPU has AVX-512
(bf16 weights: AVX512-BF16), else oneDNN.

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

In bf16 (`model.dtype: bfloat16`), weights and activations are bf16 and the sums fp32; our
kernel rounds each output where PyTorch's bf16 modules do (the product, the SiLU of the
rounded product, the gated product), so a layer equals transformers' bf16 layer up to the
order of the fp32 sums. oneDNN's fused forms round once, after the activation (a bf16 ulp off
at most, at those elements).

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
    """Whether dense layers on (device, dtype) can be packed: fp32 or bf16 on a CPU, with our
    kernel (fp32: AVX-512; bf16: AVX512-BF16) or oneDNN's (bf16: where it runs bf16 products)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    kernel = load_span_kernel()
    return (kernel is not None and kernel.dense_takes(dtype)) or onednn_available(dtype)


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this PyTorch build has oneDNN's packed products for weights of this dtype."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
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
        if kernel is not None and kernel.dense_takes(weight.dtype, num_in):
            return cls(kernel.pack_dense(weight), num_in, num_out, kernel)
        assert onednn_available(weight.dtype), "no packed products here: check `packing_available` first"
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
