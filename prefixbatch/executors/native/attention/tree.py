"""The model's attention callback for one step: store k, v at the plan's slots, attend by plan.

`TreeAttention` is `model.AttentionFn` over a `KVStore`: per layer it writes the step's k, v
to their slots and runs the step's `AttentionPlan` on that layer with the backend the
selection table (`backends.TABLE`) names for the store's device, dtype and head size:
- `span-kernel` (CPU fp32/bf16): our C kernel, one call a layer that also stores k, v and,
  in fp32, applies rope (`attend_unroped`); its task list (`c_kernel.KernelPlan`) is built
  once per step;
- `torch` (CPU otherwise): PyTorch's kernels span by span (`torch_spans`);
- `flash`, `triton`, `reference` (CUDA, and any device): the span contract (`spans`): every
  span's parts, then `spans.merge_entries`.
The batch-invariant mode has a callback of its own (`invariant.InvariantAttention`);
`for_step` picks between them.

in → out: q [T, H, D] + the layer's store buffers + plan → out [T, H, D].
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from prefixbatch.executors.native.attention import backends
from prefixbatch.executors.native.attention.c_kernel import KernelPlan
from prefixbatch.executors.native.attention.invariant import InvariantAttention
from prefixbatch.executors.native.attention.plan import AttentionPlan
from prefixbatch.executors.native.attention.spans import SpanBatch, merge_entries
from prefixbatch.executors.native.attention.torch_spans import DevicePlan, tree_attention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.span_kernel import SpanKernel, load_span_kernel

__all__ = ["TreeAttention", "for_step"]


def for_step(
    store: KVStore, plan: AttentionPlan, *, scale: float, batch_invariant: bool = False
) -> TreeAttention | InvariantAttention:
    """The step's attention callback: batch-invariant, or the table's backend for the store."""
    if batch_invariant:
        return InvariantAttention(store, plan, scale=scale)
    return TreeAttention(store, plan, scale=scale)


class TreeAttention:
    """The model's attention callback for one step: store k, v at the plan's slots, attend by plan.

    backend: a name of `backends.TABLE` (None: the table's choice for the store). Tests may
    force the older knobs instead: kernel a `SpanKernel` (that library) or None (PyTorch's
    kernels), fused True/False (`attend_fused` / `attend_matmul` on the `torch` backend).
    """

    def __init__(
        self,
        store: KVStore,
        plan: AttentionPlan,
        *,
        scale: float,
        backend: str | None = None,
        fused: bool | None = None,
        kernel: SpanKernel | Literal["auto"] | None = "auto",
    ) -> None:
        self.store = store
        self.scale = scale
        self.fused = fused
        keys = store.keys
        if backend is None:
            forced = fused is not None or kernel is None or isinstance(kernel, SpanKernel)
            backend = backends.select(keys.device, keys.dtype, keys.shape[-1]) if not forced else (
                "span-kernel" if isinstance(kernel, SpanKernel) and fused is None else "torch"
            )  # fmt: skip
        self.backend = backend
        self.kernel = None
        if backend == "span-kernel":
            self.kernel = kernel if isinstance(kernel, SpanKernel) else load_span_kernel()
        self.attention_plan = plan
        # Write slots and positions always; the torch backend's device spans too.
        self.plan = DevicePlan.of(plan, keys.device, spans=backend == "torch")
        self.positions = self.plan.positions
        self.spans = self.attend_spans = None
        if backend in backends.SPAN_BACKENDS:
            self.spans, self.attend_spans = SpanBatch.of(plan, keys.device), backends.span_function(backend)
        self.kernel_plan: KernelPlan | None = None

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D], k, v: [T, Hkv, D] → out: [T, H, D] in q's dtype
        out = self._in_kernel(layer, q, k, v, angles=None)
        if out is not None:
            return out
        self.store.write(layer, self.plan.write_slots, k, v)
        keys, values = self.store.keys[layer], self.store.values[layer]
        if self.spans is not None:
            parts = self.attend_spans(q, keys, values, self.spans, scale=self.scale)
            return merge_entries(*parts, self.spans)[0].to(q.dtype)
        out = tree_attention(q, keys, values, self.plan, scale=self.scale, fused=self.fused)
        return out.to(q.dtype)

    def attend_unroped(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """As a call, for q and k before rope (cos, sin [T, D/2] fp32: `rope_angles`): rope, the
        KV write and attention in the span kernel's one call. None where the kernel does not
        apply: the caller applies rope and calls this object instead. rows (ascending,
        distinct): every row's k, v stored, the outputs of these rows only [len(rows), H, D].
        bf16 q: None too, so that rope rounds as transformers' bf16 rope does (the model's)."""
        if cos.dtype != torch.float32 or sin.dtype != torch.float32 or q.dtype != torch.float32:
            return None
        return self._in_kernel(layer, q, k, v, angles=(cos.contiguous(), sin.contiguous()), rows=rows)

    def _in_kernel(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: tuple | None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The span kernel's call (k, v stored in it), or None where it does not apply. bf16 q,
        k, v (a bf16 store) are computed with in fp32: exact copies, every sum fp32 (as
        PyTorch's CPU attention sums bf16 inputs), the output rounded back to bf16."""
        if self.kernel is None:
            return None
        if q.dtype == torch.bfloat16:
            out = self._in_kernel(layer, q.float(), k.float(), v.float(), angles, rows)
            return None if out is None else out.to(torch.bfloat16)
        keys, values = self.store.keys[layer], self.store.values[layer]
        fits = self.kernel.supports(q, keys.shape[1]) and all(
            x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] for x in (k, v)
        )  # shapes it takes, heads laid out as it reads them
        if not fits:  # PyTorch's kernels from now on, with the device spans they need
            self.kernel = None
            self.backend = "torch"
            self.plan = DevicePlan.of(self.attention_plan, keys.device)
            return None
        query_angles = None
        if rows is not None:  # one layer a step (the last): its own plan, of these rows
            p = self._kernel_plan(q, keys, rows.numpy())
            q = q[rows]  # [R, H, D]
            query_angles = None if angles is None else (angles[0][rows], angles[1][rows])
        else:
            if self.kernel_plan is None:
                self.kernel_plan = self._kernel_plan(q, keys, None)
            p = self.kernel_plan
        out, _ = self.kernel(
            q, keys, values, p.tasks, p.entry_row, p.entry_visible, p.row_ptr, p.row_entries,
            scale=self.scale, new=(k, v, self.plan.write_slots), angles=angles, query_angles=query_angles,
            num_tasks=p.num_tasks,
        )  # fmt: skip
        return out

    def _kernel_plan(self, q: torch.Tensor, keys: torch.Tensor, rows: np.ndarray | None) -> KernelPlan:
        return KernelPlan.of(
            self.attention_plan,
            group=q.shape[1] // keys.shape[1],
            num_kv_heads=keys.shape[1],
            num_threads=torch.get_num_threads(),
            dot_max_queries=self.kernel.dot_max_queries,
            rows=rows,
        )

