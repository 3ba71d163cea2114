"""Which attention backend runs a step: one table, by device, dtype and head size.

Every backend of this folder meets one contract (`spans`): a step's spans in, each span's
rows attended to its keys in the store, each row's parts merged exactly. The first row of
`TABLE` whose device, dtypes and test fit the store is chosen; `$PREFIXBATCH_ATTENTION`
(a backend's name) overrides it, for tests and `benchmarks/gpu_check.py`. The batch-invariant
mode is not a choice of this table: it has its own numerics (`invariant`).

| backend       | where            | file              |
|---------------|------------------|-------------------|
| `span-kernel` | CPU fp32, bf16   | `c_kernel.py` (+ `../span_kernel.py`, `../kernels/`) |
| `torch`       | CPU, other dtypes or no C compiler | `torch_spans.py` |
| `flash`       | CUDA fp16, bf16, head ≤ 256 | `flash_varlen.py` (PyTorch's FlashAttention-2 varlen) |
| `triton`      | CUDA, other shapes | `triton_span.py` |
| `reference`   | anywhere (the oracle) | `reference.py` |

Adding a backend: a file here with `attend_spans(q, keys, values, batch, *, scale)` (the
contract's parts), a row in `TABLE`, an entry in `SPAN_BACKENDS`, and the contract tests
(tests/executors/native/test_attention_backends.py) run against it.

in → out: (device, dtype, head size) → a backend's name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["ENV", "NAMES", "SPAN_BACKENDS", "TABLE", "Choice", "select", "span_function"]

ENV = "PREFIXBATCH_ATTENTION"

_HALF = frozenset({torch.float16, torch.bfloat16})


def _span_kernel_fits(dtype: torch.dtype, head_dim: int) -> bool:
    from prefixbatch.executors.native.span_kernel import takes

    return takes(torch.device("cpu"), dtype, head_dim)


def _flash_fits(dtype: torch.dtype, head_dim: int) -> bool:
    from prefixbatch.executors.native.attention import flash_varlen

    return flash_varlen.available() and flash_varlen.takes(dtype, head_dim)


def _triton_fits(dtype: torch.dtype, head_dim: int) -> bool:
    return importlib.util.find_spec("triton") is not None


def _always(dtype: torch.dtype, head_dim: int) -> bool:
    return True


@dataclass(frozen=True)
class Choice:
    backend: str
    device: str | None  # "cpu", "cuda"; None: any
    dtypes: frozenset[torch.dtype] | None  # None: any
    fits: Callable[[torch.dtype, int], bool]  # (dtype, head size) → whether it runs here
    why: str


TABLE: tuple[Choice, ...] = (
    Choice("span-kernel", "cpu", frozenset({torch.float32, torch.bfloat16}), _span_kernel_fits,
           "our C kernel: one call a layer, keys read in place, rope and the KV write inside"),
    Choice("torch", "cpu", None, _always, "PyTorch's fused CPU kernel, span by span"),
    Choice("flash", "cuda", _HALF, _flash_fits, "FlashAttention-2 varlen: the store's keys in place, no score matrix"),
    Choice("triton", "cuda", None, _triton_fits, "our Triton span kernel: fp32 and head sizes FA2 does not take"),
    Choice("reference", None, None, _always, "plain PyTorch in blocks: correct anywhere, slow"),
)  # fmt: skip

# The backends that compute the contract's parts (`spans`): name → "module:function", imported when used.
SPAN_BACKENDS = {
    "reference": "prefixbatch.executors.native.attention.reference:attend_spans",
    "flash": "prefixbatch.executors.native.attention.flash_varlen:attend_spans",
    "flash-emulated": "prefixbatch.executors.native.attention.flash_varlen:emulate",  # FA2's packing, on any device
    "triton": "prefixbatch.executors.native.attention.triton_span:attend_spans",
}


def span_function(name: str) -> Callable:
    """The `attend_spans` of a backend of `SPAN_BACKENDS`."""
    module, function = SPAN_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), function)


NAMES = tuple(choice.backend for choice in TABLE) + ("flash-emulated",)


def select(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend for a store on `device` of `dtype` with heads of `head_dim`: the first row
    of `TABLE` that fits, or `$PREFIXBATCH_ATTENTION` when set."""
    forced = os.environ.get(ENV)
    if forced:
        if forced not in NAMES:
            raise ValueError(f"${ENV} must name an attention backend ({', '.join(NAMES)}), got {forced!r}")
        return forced
    for choice in TABLE:
        if choice.device not in (None, device.type) or (choice.dtypes is not None and dtype not in choice.dtypes):
            continue
        if choice.fits(dtype, head_dim):
            return choice.backend
    return "reference"
