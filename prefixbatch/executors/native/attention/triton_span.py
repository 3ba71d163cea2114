"""The Triton backend: every span of a step in one kernel launch per layer, flash-style.

The grid is (tile, kv head). A tile is one block of `BLOCK_M` consecutive entries of one span
(`_tile_table`, built on the host from the plan once per `SpanBatch` and block size). Its
program stacks the block's queries for the G = H / Hkv query heads of its kv head into one
[BLOCK_M·G, D] matrix (GQA native: each key is read once for all G heads), then walks the
span's keys in `BLOCK_N` blocks straight from the store (pointer offset `key_start`, never
gathered): scores by `tl.dot`, an online softmax in fp32 (base 2), and the value product.
Key blocks past the block's last visible key (its last entry's causal limit) are never
loaded; inside the last ones, each entry's own causal limit is a mask. The result is the
span contract's (`spans.py`): part_out [E, H, D] fp32 and the natural-log part_lse [E, H];
an entry that sees no key gets 0 and -inf.

Head sizes are padded to a power of two ≥ 16 with masks: the GPU compiler rejects smaller
dots. CPU tensors run through Triton's interpreter (no GPU, no compiler needed: the tests),
which computes bf16 `tl.dot` wrongly, so bf16 operands are upcast to fp32 there. The kernel
calls Triton builtins only (`tl.full`, `tl.reduce` with the standard combine functions, not
`tl.zeros`/`tl.max`/`tl.sum`): those are `@triton.jit` functions, fixed as compiled or
interpreted when triton is imported, so using them would make the interpreter work only if
TRITON_INTERPRET=1 was set before the first `import triton` of the process.
`compile_for_sm90` builds the kernel for an H100 without one and reports registers and
spills from the binary.

in → out: q [T, H, D], one layer's keys/values [capacity, Hkv, D] (fp32, fp16 or bf16),
`SpanBatch` → (part_out [E, H, D], part_lse [E, H]) fp32.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from prefixbatch.executors.native.attention.spans import SpanBatch

__all__ = ["CompiledVariant", "attend_spans", "compile_for_sm90"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE_ROWS = 64  # stacked rows (entries × heads of a group) per program
BLOCK_N = 64  # keys per step of the key loop
NUM_WARPS = 4


@triton.jit
def _span_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # q [T, H, D]; k, v [capacity, Hkv, D]; out [E, H, D]; lse [E, H]
    tiles_ptr, entry_rows_ptr, span_first_ptr, key_start_ptr, num_keys_ptr, causal_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    qk_scale,  # scale · log2(e): the softmax runs in base 2
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    span = tl.load(tiles_ptr + 2 * tile)
    block_start = tl.load(tiles_ptr + 2 * tile + 1)  # the block's first entry, within its span
    first_entry = tl.load(span_first_ptr + span)
    span_rows = tl.load(span_first_ptr + span + 1) - first_entry
    key_start = tl.load(key_start_ptr + span)
    num_keys = tl.load(num_keys_ptr + span)
    causal = tl.load(causal_ptr + span)

    # Stacked row r = m · GROUP_P + j: entry m of the block, query head j of this kv head.
    r = tl.arange(0, BLOCK_M * GROUP_P)
    m = block_start + r // GROUP_P
    head = kv_head * GROUP + r % GROUP_P
    is_row = (m < span_rows) & (r % GROUP_P < GROUP)
    entry = first_entry + m  # int64, as every offset below: stores pass 2^31 elements
    d = tl.arange(0, HEAD_DIM_P)
    is_dim = d < HEAD_DIM
    q_row = tl.load(entry_rows_ptr + entry, mask=is_row, other=0)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=is_row[:, None] & is_dim[None, :], other=0.0,
    )  # [BLOCK_M·GROUP_P, HEAD_DIM_P]
    if UPCAST:
        q = q.to(tl.float32)

    # Keys each row sees (0 for padding rows), and the most any row of the block sees.
    if causal < 0:
        row_limit = tl.where(is_row, num_keys, 0)
        block_limit = num_keys
    else:
        row_limit = tl.where(is_row, tl.minimum(num_keys, causal + m + 1), 0)
        block_limit = tl.minimum(num_keys, causal + tl.minimum(block_start + BLOCK_M, span_rows))

    row_max = tl.full([BLOCK_M * GROUP_P], float("-inf"), tl.float32)
    row_sum = tl.full([BLOCK_M * GROUP_P], 0.0, tl.float32)
    acc = tl.full([BLOCK_M * GROUP_P, HEAD_DIM_P], 0.0, tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + key_start * stride_kt + kv_head * stride_kh
    v_base = v_ptr + key_start * stride_vt + kv_head * stride_vh
    for key in range(0, block_limit, BLOCK_N):
        keys_n = key + n
        is_key = keys_n < block_limit
        k_t = tl.load(
            k_base + keys_n[None, :] * stride_kt + d[:, None],
            mask=is_key[None, :] & is_dim[:, None], other=0.0,
        )  # [HEAD_DIM_P, BLOCK_N]
        v = tl.load(
            v_base + keys_n[:, None] * stride_vt + d[None, :],
            mask=is_key[:, None] & is_dim[None, :], other=0.0,
        )  # [BLOCK_N, HEAD_DIM_P]
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        # "ieee": fp32 inputs get exact products, not tf32's 10-bit mantissa (ignored for 16-bit).
        scores = tl.dot(q, k_t, input_precision="ieee") * qk_scale
        scores = tl.where(keys_n[None, :] < row_limit[:, None], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.reduce(scores, 1, tl.standard._elementwise_max))
        # A row that has seen no key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp2(row_max - shift)
        p = tl.exp2(scores - shift[:, None])
        row_sum = row_sum * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max

    seen = row_sum > 0
    safe_sum = tl.where(seen, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(seen, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
    out_offsets = entry[:, None] * (NUM_HEADS * HEAD_DIM) + head[:, None] * HEAD_DIM + d[None, :]
    tl.store(out_ptr + out_offsets, out, mask=is_row[:, None] & is_dim[None, :])
    tl.store(lse_ptr + entry * NUM_HEADS + head, lse, mask=is_row)


def attend_spans(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: SpanBatch, *, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entry of the batch against its span's keys → (part_out [E, H, D], part_lse [E, H]) fp32.
    One kernel launch; on CPU tensors, Triton's interpreter."""
    _check(q, keys, values)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = keys.shape[1]
    part_out = torch.empty((batch.num_entries, num_heads, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((batch.num_entries, num_heads), dtype=torch.float32, device=q.device)
    if batch.num_entries == 0:
        return part_out, part_lse
    if q.stride(-1) != 1:
        q = q.contiguous()  # rows and heads may be strided (a view of a fused qkv), dims not
    kernel = _kernel_for(q.device)
    interpreted = isinstance(kernel, InterpretedFunction)
    group = num_heads // num_kv_heads
    tiles = _tile_table(batch, _block_m(group))
    kernel[(tiles.shape[0], num_kv_heads)](
        q, keys, values, part_out, part_lse,
        tiles, batch.entry_rows, batch.span_first, batch.key_start, batch.num_keys, batch.causal,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        scale * math.log2(math.e),
        **_constexprs(num_heads, group, head_dim, upcast=interpreted and q.dtype == torch.bfloat16),
        num_warps=NUM_WARPS,
    )
    return part_out, part_lse


def _block_m(group: int) -> int:
    """Entries per tile: with G query heads each (padded to a power of two) they make
    `TILE_ROWS` stacked rows, at least 16 (tl.dot's least size on a GPU)."""
    return max(1, TILE_ROWS // triton.next_power_of_2(group))


def _constexprs(num_heads: int, group: int, head_dim: int, *, upcast: bool) -> dict:
    return {
        "NUM_HEADS": num_heads,
        "GROUP": group,
        "GROUP_P": triton.next_power_of_2(group),
        "HEAD_DIM": head_dim,
        "HEAD_DIM_P": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_M": _block_m(group),
        "BLOCK_N": BLOCK_N,
        "UPCAST": upcast,
    }


def _check(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    if q.dtype not in DTYPES:
        raise ValueError(f"`q` must be one of {DTYPES}, got {q.dtype}")
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        raise ValueError(f"`keys` and `values` must be {q.dtype} as `q` is, got {keys.dtype} and {values.dtype}")
    if keys.shape != values.shape or keys.shape[2] != q.shape[2] or q.shape[1] % keys.shape[1]:
        raise ValueError(
            f"`keys`/`values` must be [capacity, Hkv, D] with H a multiple of Hkv and D of `q` {tuple(q.shape)},"
            f" got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("`keys` and `values` must be contiguous in their last dimension (the store's layout)")


_interpreted_kernel: InterpretedFunction | None = None


def _kernel_for(device: torch.device):
    """The compiled kernel for a GPU; Triton's interpreter for CPU tensors (or everywhere under
    TRITON_INTERPRET=1, when `triton.jit` already returned an interpreted function). Choosing
    by device, not by that variable, means no test has to set it before triton is imported."""
    global _interpreted_kernel
    if device.type != "cpu" or isinstance(_span_kernel, InterpretedFunction):
        return _span_kernel
    if _interpreted_kernel is None:
        _interpreted_kernel = InterpretedFunction(_span_kernel.fn)
    return _interpreted_kernel


def _tile_table(batch: SpanBatch, block_m: int) -> torch.Tensor:
    """[num_tiles, 2] int32: (span, first entry within the span) of each block of `block_m`
    entries. Made once per step (`SpanBatch.prepared`): every layer's launch uses it."""
    tables = batch.prepared.setdefault("triton", {})
    if block_m not in tables:
        sizes = np.array([len(span.rows) for span in batch.spans], dtype=np.int64)
        blocks = -(-sizes // block_m)  # ceil
        span = np.repeat(np.arange(len(sizes)), blocks)
        start = (np.arange(int(blocks.sum())) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * block_m
        table = np.stack([span, start], axis=1).astype(np.int32)
        tables[block_m] = torch.from_numpy(table).to(batch.span_first.device)
    return tables[block_m]


@dataclass(frozen=True)
class CompiledVariant:
    """The kernel built for one GPU target, as its binary reports it."""

    dtype: str  # "bf16" or "fp16"
    head_dim: int
    group: int  # query heads per kv head
    num_regs: int  # registers per thread
    num_spills: int  # local memory per thread in 4-byte words (what Triton calls n_spills)
    shared_bytes: int  # shared memory per program (the key/value pipeline's buffers)


def compile_for_sm90(
    *, head_dim: int = 128, group: int = 4, dtypes: tuple[str, ...] = ("bf16", "fp16")
) -> list[CompiledVariant]:
    """Build the kernel for an H100 (sm_90) on any machine, with the ptxas inside the Triton
    wheel, and read its resource use from the cubin with the wheel's `cuobjdump`. Pointer and
    stride arguments are marked 16-divisible as a launch on real tensors specialises them; the
    variant is a model's with 4 kv heads (the head count only moves output offsets)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    # Under TRITON_INTERPRET=1 `triton.jit` gave an interpreted function: compile the source.
    kernel = _span_kernel if isinstance(_span_kernel, JITFunction) else JITFunction(_span_kernel.fn)
    target = GPUTarget("cuda", 90, 32)
    variants = []
    for dtype in dtypes:
        constexprs = _constexprs(4 * group, group, head_dim, upcast=False)
        signature = {name: _SIGNATURE.get(name, "constexpr") for name in kernel.arg_names}
        for name in ("q_ptr", "k_ptr", "v_ptr"):
            signature[name] = f"*{dtype}"
        divisible = [["tt.divisibility", 16]]
        attrs = {(kernel.arg_names.index(name),): divisible for name in _DIVISIBLE}
        source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
        # enable_fp_fusion: Triton's default today, named so that 3.9 does not warn about it.
        options = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}
        compiled = triton.compile(source, target=target, options=options)
        usage = _resource_usage(compiled.asm["cubin"])
        spills = usage["LOCAL"] // 4  # local memory is spills here: the kernel has no local arrays
        variants.append(CompiledVariant(dtype, head_dim, group, usage["REG"], spills, compiled.metadata.shared))
    return variants


_SIGNATURE = {
    "out_ptr": "*fp32", "lse_ptr": "*fp32", "tiles_ptr": "*i32",
    "entry_rows_ptr": "*i64", "span_first_ptr": "*i64", "key_start_ptr": "*i64",
    "num_keys_ptr": "*i64", "causal_ptr": "*i64",
    "stride_qt": "i32", "stride_qh": "i32", "stride_kt": "i32", "stride_kh": "i32",
    "stride_vt": "i32", "stride_vh": "i32", "qk_scale": "fp32",
}  # q_ptr, k_ptr, v_ptr: the variant's dtype; every other argument is a constexpr
_DIVISIBLE = (
    "q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr", "tiles_ptr", "entry_rows_ptr", "span_first_ptr",
    "key_start_ptr", "num_keys_ptr", "causal_ptr",
    "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """`cuobjdump -res-usage` of a cubin: {"REG": …, "STACK": …, "SHARED": …, "LOCAL": …, …}."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_cuobjdump(), "-res-usage", str(path)], check=True, capture_output=True, text=True
        ).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "REG" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage printed no register count:\n{text}")
    return usage


def _cuobjdump() -> str:
    try:
        return triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # a Triton without knobs: the wheel's own copy
        import triton.backends.nvidia as nvidia

        return str(Path(nvidia.__file__).parent / "bin" / "cuobjdump")
