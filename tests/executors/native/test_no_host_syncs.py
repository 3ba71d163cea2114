"""A step's forward pass and its draws never make the host wait for the device.

On a GPU every read of a device value by the host (`.item()`, `.tolist()`, `bool(t)`, and the
ops whose output size depends on values: `nonzero`, `unique`, `masked_select`,
`repeat_interleave` without its size) stalls the host until the device has caught up: the next
kernels cannot be queued meanwhile. Counted here on the CPU, where the same ops run, with a
dispatch mode that sees every op: the model's forward over a tree-shaped step (reference
backend, and FA2's varlen packing around a kernel's stand-in) and the sampled draw do none.
The engine reads the drawn tokens once per step (`tolist`), after them: the one read it needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefixbatch.executors.native.attention import flash_varlen
from prefixbatch.executors.native.attention.plan import QueryRun, SegmentKV, plan_attention
from prefixbatch.executors.native.attention.spans import SpanBatch
from prefixbatch.executors.native.attention.tree import TreeAttention
from prefixbatch.executors.native.kv import KVStore
from prefixbatch.executors.native.weights import load_model
from prefixbatch.executors.sampling import draw_tokens, uniforms
from prefixbatch.types import SamplingParams

READS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select", "item"}


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in READS or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
                             and isinstance(args[0], torch.Tensor) and len(args) > 1):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _tree_step(model, store: KVStore):
    """A step over a shared prompt (segment 0, 40 tokens, stored) with three sequences
    decoding under it and a fourth's prompt suffix prefilled, logits of four rows."""
    segments = [SegmentKV(0, None, store.allocate(0, 40).start, 40)]
    for s, stored in ((1, 6), (2, 3), (3, 9), (4, 12)):
        segments.append(SegmentKV(s, 0, store.allocate(s, 16).start, stored))
    runs = [QueryRun(1, 0, 5, 1), QueryRun(2, 1, 2, 1), QueryRun(3, 2, 8, 1), QueryRun(4, 3, 0, 12)]
    return plan_attention(segments, runs)


def test_the_forward_pass_reads_nothing_back(tiny_llama):
    model = load_model(tiny_llama, dtype=torch.float32, device="cpu")
    store = KVStore.for_model(model.config, capacity_tokens=128, dtype=torch.float32, device="cpu")
    plan = _tree_step(model, store)
    token_ids = torch.arange(5, 5 + plan.num_rows)
    logits_rows = torch.tensor([0, 1, 2, plan.num_rows - 1])  # on the CPU, as the engine hands them
    for backend in ("reference", "torch"):
        attention = TreeAttention(store, plan, scale=model.config.attention_scale, backend=backend)
        with torch.inference_mode(), _HostReads() as watch:
            logits = model(token_ids, attention.positions, attention, logits_rows=logits_rows)
        assert logits.shape[0] == 4
        assert watch.reads == [], (backend, watch.reads)


def test_fa2_packing_reads_nothing_back_after_the_step_is_planned():
    store = KVStore(num_layers=1, num_kv_heads=2, head_dim=16, capacity_tokens=128, dtype=torch.float32, device="cpu")
    plan = _tree_step(None, store)
    batch = SpanBatch.of(plan, "cpu")
    q = torch.randn(plan.num_rows, 4, 16)

    def kernel(q, keys, values, call, scale):  # the GPU kernel's stand-in: shapes only
        return torch.zeros(q.shape), torch.zeros(q.shape[:2])

    with _HostReads() as watch:
        for _ in range(2):  # two layers: the sequences are made once, at the first
            flash_varlen._run(q, store.keys[0], store.values[0], batch, scale=0.25, kernel=kernel)
    assert watch.reads == []
    assert len(batch.prepared["flash"]) == 2  # the shared prompt's call and the own segments'


def test_a_sampled_draw_reads_nothing_back():
    logits = torch.randn(3, 64)
    params = [SamplingParams(max_tokens=1, temperature=0.7, top_k=k, top_p=p) for k, p in ((None, 1.0), (5, 1.0), (None, 0.9))]
    with _HostReads() as watch:
        drawn = draw_tokens(logits, params, uniforms([1, 2, 3], [0, 0, 0]))
    assert watch.reads == [] and drawn.shape == (3,)
    assert np.all((drawn >= 0).numpy())
