"""Our C attention kernel (`kernels/span_attention.c`): built on first use, loaded with ctypes.

One call per layer runs every span of a step's attention plan, all rows in a few loops on
the library's thread pool (`kernels/pool.c`), reading keys and values in place in the store (no gather, no
padding, no kernel call per row); see the C file for the algorithm. The same call can first
store the step's keys and values and apply rope to q and k (`TreeAttention.attend_unroped`).
The library also holds the residual add + RMSNorm pass the packed model's layers use
(`kernels/residual_norm.c`, `SpanKernel.add_rms_norm`) and, on AVX-512 CPUs, their dense
products (`kernels/dense.c`, `SpanKernel.dense`; `dense.PackedWeight` calls it). It exists because
PyTorch's CPU API has no variable-length attention: there, a step's decode rows are either
one fused-kernel call each or a padded gather of their keys (BENCHMARKS.md, "Prefill and
decode apart").

The library's interface is one header (`kernels/prefixbatch_kernels.h`): its entry points,
and `struct pb_span_args`, the attention call's arguments, which `SpanArgs` mirrors field for
field; a library whose struct is not the size of ours is refused. It is compiled with the C
compiler on PATH (`$CC`, else `cc`/`gcc`) for `-march=$PREFIXBATCH_KERNEL_MARCH` (default
`native`: this CPU; `x86-64-v3`, `x86-64-v2`: portable builds, AVX-512 paths left out; an x86
build without AVX-512 keeps PyTorch's attention by default, being slower: `attention_wins`), into
a cache folder it is loaded from only when it can be trusted (`kernel_library`:
`$PREFIXBATCH_KERNEL_CACHE`, else `~/.cache/prefixbatch/kernels`, else a private temporary
folder; ownership, permissions and the SHA-256 recorded at build are checked). Where there is
no compiler, or the build fails (recorded: not retried by every process), the engine keeps
PyTorch's kernels (same results within fp32 rounding) and says so once. docs/kernels.md has
the details.

in → out: nothing → `SpanKernel` (a loaded library) or None.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import threading
from pathlib import Path

import torch

from prefixbatch.executors.native.kernel_library import CACHE_ENV, Recipe, load_library

__all__ = ["SpanArgs", "SpanKernel", "attention_wins", "load_span_kernel", "takes"]

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
# One library: the attention call, the thread pool every loop runs on (`pool.c`), the residual
# add and RMSNorm in one pass (`add_rms_norm`) and the dense layers' products (`dense`).
SOURCES = tuple(
    KERNELS / name for name in ("span_attention.c", "span_attention_bf16.c", "pool.c", "residual_norm.c", "dense.c")
)
HEADERS = (KERNELS / "prefixbatch_kernels.h", KERNELS / "pool.h")
FLAGS = (
    "-O3", "-pthread", "-fPIC", "-shared", "-std=c11",
    "-fvisibility=hidden",  # exported: what prefixbatch_kernels.h marks PB_EXPORT, nothing else
    "-Wno-psabi",  # 64-byte vectors passed between static functions of a narrower build: no ABI at stake
    # Vectorised sums (reassociation, no errno, no traps) and fused multiply-adds (ISO C mode
    # would otherwise keep every a·b + c two roundings and two instructions).
    "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros", "-ffp-contract=fast",
)
DISABLE_ENV = "PREFIXBATCH_SPAN_KERNEL"  # "0": never build or use it (PyTorch's kernels only)
MARCH_ENV = "PREFIXBATCH_KERNEL_MARCH"  # the build's -march: "native" (the default), "x86-64-v3", ...
_MARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_FALLBACK = "uses PyTorch's attention kernels, which are slower on decode steps"

_lock = threading.Lock()
_loaded: dict[tuple[str, str | None], SpanKernel | None] = {}  # by (march, cache folder setting)


class SpanArgs(ctypes.Structure):
    """`struct pb_span_args` (kernels/prefixbatch_kernels.h), field for field: one attention call."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("q_row_stride", ctypes.c_int64),
        ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
        ("num_tasks", ctypes.c_int64), ("tasks", ctypes.c_void_p),
        ("entry_row", ctypes.c_void_p), ("entry_visible", ctypes.c_void_p),
        ("row_ptr", ctypes.c_void_p), ("row_entries", ctypes.c_void_p),
        ("k_new", ctypes.c_void_p), ("k_row_stride", ctypes.c_int64),
        ("v_new", ctypes.c_void_p), ("v_row_stride", ctypes.c_int64),
        ("slots", ctypes.c_void_p), ("num_new", ctypes.c_int64),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("q_cos", ctypes.c_void_p), ("q_sin", ctypes.c_void_p),
        ("part_out", ctypes.c_void_p), ("part_lse", ctypes.c_void_p), ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p),
        ("num_rows_out", ctypes.c_int32), ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
        ("scale", ctypes.c_float), ("num_threads", ctypes.c_int32),
    ]  # fmt: skip


class SpanKernel:
    """The loaded library; a task holds at most `max_queries_per_task` queries (rows × query
    heads per kv head), and heads of at most `max_head_dim`, a multiple of 16. A task of at most
    `dot_max_queries` queries a kv head (a decode row) is computed by dot products, all its kv
    heads in one pass over whole key slots."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library
        # Entry points by the store's dtype: the attention call and the residual norm pass.
        self._attention = {torch.float32: library.pb_span_attention, torch.bfloat16: library.pb_span_attention_bf16}
        for fn in self._attention.values():
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(SpanArgs)]
        limits = [ctypes.c_int() for _ in range(3)]
        library.pb_span_attention_limits(*(ctypes.byref(x) for x in limits))
        self.max_queries_per_task, self.max_head_dim, self.dot_max_queries = (x.value for x in limits)
        self.vector_bytes = library.pb_vector_bytes()  # 64: an AVX-512 build (`attention_wins`)
        self._norm = {torch.float32: library.pb_add_rms_norm, torch.bfloat16: library.pb_add_rms_norm_bf16}
        for norm in self._norm.values():
            norm.restype = None
            norm.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
            ]  # fmt: skip
        self.has_dense = bool(library.pb_dense_available())
        if self.has_dense:
            library.pb_dense_packed_floats.restype = ctypes.c_int64
            library.pb_dense_packed_floats.argtypes = [ctypes.c_int64, ctypes.c_int64]
            library.pb_dense_pack.restype = None
            library.pb_dense_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
            library.pb_dense.restype = None
            library.pb_dense.argtypes = [
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ]  # fmt: skip
            self._dense = library.pb_dense
        self.has_dense_bf16 = bool(library.pb_dense_bf16_available())
        if self.has_dense_bf16:
            for name in ("pb_dense_bf16_packed_halves", "pb_dense_bf16_scratch_floats"):
                getattr(library, name).restype = ctypes.c_int64
            library.pb_dense_bf16_packed_halves.argtypes = [ctypes.c_int64, ctypes.c_int64]
            library.pb_dense_bf16_scratch_floats.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
            library.pb_dense_bf16_pack.restype = None
            library.pb_dense_bf16_pack.argtypes = library.pb_dense_pack.argtypes
            library.pb_dense_bf16.restype = None
            library.pb_dense_bf16.argtypes = [
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
            ]  # fmt: skip

    def dense_takes(self, dtype: torch.dtype, num_in: int = 2) -> bool:
        """Whether the library has products for weights of this dtype (fp32, bf16) and input size
        (bf16 products take k in pairs: an even num_in)."""
        if dtype == torch.bfloat16:
            return self.has_dense_bf16 and num_in % 2 == 0
        return dtype == torch.float32 and self.has_dense

    def pack_dense(self, weight: torch.Tensor) -> torch.Tensor:
        """W [out, in] fp32 or bf16 (in even) → its copy in the layout `dense` reads (kernels/dense.c)."""
        num_out, num_in = weight.shape
        weight = weight.detach().contiguous()
        assert weight.device.type == "cpu" and self.dense_takes(weight.dtype, num_in)
        if weight.dtype == torch.bfloat16:
            packed = torch.empty(self.library.pb_dense_bf16_packed_halves(num_out, num_in), dtype=torch.bfloat16)
            pack = self.library.pb_dense_bf16_pack
        else:
            packed = torch.empty(self.library.pb_dense_packed_floats(num_out, num_in), dtype=torch.float32)
            pack = self.library.pb_dense_pack
        pack(weight.data_ptr(), num_out, num_in, packed.data_ptr(), torch.get_num_threads())
        return packed

    def dense(
        self, x: torch.Tensor, packed: torch.Tensor, num_out: int, bias: torch.Tensor | None, then: str = "none",
        other: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [T, in] → x Wᵀ + bias [T, out] (W packed by `pack_dense`); then "swish": silu of
        that, "times": that · other [T, out], in the same pass."""
        rows, num_in = x.shape
        x = x.contiguous()
        dtype = packed.dtype  # fp32 or bf16, as `pack_dense` made it: x, bias, other and out too
        assert x.dtype == dtype and (bias is None or (bias.shape == (num_out,) and bias.dtype == dtype))
        assert (other is not None) == (then == "times") and then in _THEN
        if other is not None:
            assert other.shape == (rows, num_out) and other.dtype == dtype
            other = other.contiguous()
        bias = None if bias is None else bias.contiguous()
        out = torch.empty((rows, num_out), dtype=dtype)
        args = (x.data_ptr(), rows, num_in, packed.data_ptr(), num_out, _pointer(bias), _THEN[then],
                _pointer(other), out.data_ptr())  # fmt: skip
        if dtype == torch.bfloat16:
            floats = self.library.pb_dense_bf16_scratch_floats(rows, num_out, num_in)
            scratch = torch.empty(floats, dtype=torch.float32) if floats else None
            call, args = self.library.pb_dense_bf16, (*args, _pointer(scratch), torch.get_num_threads())
        else:
            call, args = self._dense, (*args, torch.get_num_threads())
        if torch.autograd._profiler_enabled():  # named in profiles, as the attention call is
            with torch.profiler.record_function("prefixbatch::dense"):
                call(*args)
        else:
            call(*args)
        return out

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x += delta (in place: the residual stream), then RMSNorm(x) · weight, in one pass.
        x, delta [T, E] fp32 (or bf16, rounded as Hugging Face's bf16 modules round) CPU
        contiguous, weight [E] → out [T, E]."""
        rows, dim = x.shape
        assert x.is_contiguous() and delta.shape == x.shape and weight.shape == (dim,)
        assert x.dtype == delta.dtype == weight.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
        delta, weight = delta.contiguous(), weight.contiguous()
        out = torch.empty_like(x)
        self._norm[x.dtype](x.data_ptr(), delta.data_ptr(), weight.data_ptr(), eps, out.data_ptr(), rows, dim, torch.get_num_threads())
        return out

    def supports(self, q: torch.Tensor, num_kv_heads: int) -> bool:
        """Whether the kernel takes q [T, H, D] (fp32; bf16 once made fp32) over a CPU store with
        num_kv_heads heads."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        return (
            _fits(q.device, q.dtype, head_dim)
            and num_heads // num_kv_heads <= self.max_queries_per_task
            and head_dim <= self.max_head_dim
            and q.stride(2) == 1
            and q.stride(1) == head_dim
        )

    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tasks: torch.Tensor,
        entry_row: torch.Tensor,
        entry_visible: torch.Tensor,
        row_ptr: torch.Tensor,
        row_entries: torch.Tensor,
        *,
        scale: float,
        new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        angles: tuple[torch.Tensor, torch.Tensor] | None = None,
        query_angles: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_tasks: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D] (rows strided as a view may be), keys/values [capacity, Hkv, D] contiguous;
        tasks [N, 6] (key_start, num_keys, entry0, num_rows, kv head or -1 for all, the row of
        the next key range the task goes on with or -1), of which the first num_tasks (all when
        None) are run and the rest only chained; entries [E] (row, visible keys); row_ptr [T + 1]
        and row_entries: each row's entries (not those of chained ranges) → (out [T, H, D],
        lse [T, H]) fp32.

        new (k, v [T', Hkv, D] rows strided as views may be, slots [T'] int64): stored at the
        slots first, in the same call. angles (cos, sin [T', D/2] fp32): new k and q are not yet
        rotated; the call applies rope to both (`apply_rope`'s form), to q with query_angles
        ([T, D/2] each) when given: q's rows are then some of the new keys' rows (the rows whose
        outputs are wanted), else they are the same rows (T' = T).
        """
        num_rows, num_heads, head_dim = q.shape
        num_kv_heads = keys.shape[1]
        assert keys.is_contiguous() and values.is_contiguous() and keys.dtype == values.dtype
        assert q.dtype == torch.float32 and keys.dtype in (torch.float32, torch.bfloat16)
        assert tasks.shape[1:] == (6,) and tasks.dtype == torch.int64 and tasks.is_contiguous()
        k_new = v_new = slots = cos = sin = None
        num_new = 0
        if new is not None:
            k_new, v_new, slots = new
            num_new = slots.shape[0]
            assert k_new.shape == v_new.shape == (num_new, num_kv_heads, head_dim) and slots.shape == (num_new,)
            assert k_new.dtype == v_new.dtype == torch.float32  # rounded to the store's dtype as stored
            assert all(x.stride(2) == 1 and x.stride(1) == head_dim for x in (k_new, v_new))
            assert slots.dtype == torch.int64 and slots.is_contiguous()
        assert query_angles is None or angles is not None, "query_angles go with the new keys' angles"
        q_cos = q_sin = None
        if angles is not None:
            assert new is not None, "rotating q alone would leave the stored keys unrotated"
            cos, sin = angles
            q_cos, q_sin = query_angles or angles
            assert cos.shape == sin.shape == (num_new, head_dim // 2)
            assert q_cos.shape == q_sin.shape == (num_rows, head_dim // 2)
            assert all(x.dtype == torch.float32 and x.is_contiguous() for x in (cos, sin, q_cos, q_sin))
        num_entries = entry_row.shape[0]
        part_out = torch.empty((num_entries, num_heads, head_dim), dtype=torch.float32)
        part_lse = torch.empty((num_entries, num_heads), dtype=torch.float32)
        out = torch.empty((num_rows, num_heads, head_dim), dtype=torch.float32)
        lse = torch.empty((num_rows, num_heads), dtype=torch.float32)
        args = SpanArgs(
            q=q.data_ptr(), q_row_stride=q.stride(0), keys=keys.data_ptr(), values=values.data_ptr(),
            num_tasks=tasks.shape[0] if num_tasks is None else num_tasks, tasks=tasks.data_ptr(),
            entry_row=entry_row.data_ptr(), entry_visible=entry_visible.data_ptr(),
            row_ptr=row_ptr.data_ptr(), row_entries=row_entries.data_ptr(),
            k_new=_pointer(k_new), k_row_stride=0 if k_new is None else k_new.stride(0),
            v_new=_pointer(v_new), v_row_stride=0 if v_new is None else v_new.stride(0),
            slots=_pointer(slots), num_new=num_new, cos=_pointer(cos), sin=_pointer(sin),
            q_cos=_pointer(q_cos), q_sin=_pointer(q_sin), part_out=part_out.data_ptr(), part_lse=part_lse.data_ptr(),
            out=out.data_ptr(), lse=lse.data_ptr(), num_rows_out=num_rows, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, scale=scale, num_threads=torch.get_num_threads(),
        )  # fmt: skip
        fn = self._attention[keys.dtype]
        if torch.autograd._profiler_enabled():  # named in profiles (the marker costs ~5 µs a call)
            with torch.profiler.record_function("prefixbatch::span_attention"):
                status = fn(args)
        else:
            status = fn(args)
        if status:
            raise ValueError(f"span attention kernel refused shapes q {tuple(q.shape)}, kv heads {num_kv_heads}")
        return out, lse


_THEN = {"none": 0, "swish": 1, "times": 2}  # kernels/dense.c's post-ops


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def takes(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether "auto" runs the kernel for tensors like these: fp32 or bf16 on the CPU, heads a multiple
    of its 16-lane vectors (checked before the library is built), and a library whose attention
    is the faster one here (`attention_wins`)."""
    if not _fits(device, dtype, head_dim):
        return False
    kernel = load_span_kernel()
    return kernel is not None and attention_wins(kernel)


def _fits(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim % 16 == 0


def attention_wins(kernel: SpanKernel) -> bool:
    """Whether the library's attention beats PyTorch's kernels, as far as measured: everywhere
    but in x86 builds without AVX-512, where a 16-lane vector takes two or four registers (the
    kernel's blocking is sized for AVX-512's 32 of one vector each): on an AVX2 AMD EPYC (native and
    x86-64-v3 builds alike, one thread) a layer of 32 decode rows under a shared prefix took
    21 ms against PyTorch's 10, a 256-row prefill chunk 219 ms against 31. Those CPUs ran
    PyTorch's kernels before such builds compiled, and still do; the residual add + RMSNorm
    pass, 3x faster there than PyTorch's two ops, is used on every build."""
    return kernel.vector_bytes >= 64 or platform.machine() not in ("x86_64", "AMD64")


def load_span_kernel() -> SpanKernel | None:
    """The kernel for this machine, built on first use; None where it cannot be built (said once)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    march = os.environ.get(MARCH_ENV) or "native"
    with _lock:
        key = (march, os.environ.get(CACHE_ENV))
        if key not in _loaded:
            _loaded[key] = _load(march)
        return _loaded[key]


def _load(march: str) -> SpanKernel | None:
    if not _MARCH.fullmatch(march):
        log.warning("$%s must name a -march value (native, x86-64-v3, ...), got %r: the native engine %s",
                    MARCH_ENV, march, _FALLBACK)  # fmt: skip
        return None
    recipe = Recipe("span_attention", SOURCES, HEADERS, (*FLAGS, f"-march={march}"), _FALLBACK)
    library = load_library(recipe)
    if library is None:
        return None
    library.pb_span_args_size.restype = ctypes.c_int64
    if library.pb_span_args_size() != ctypes.sizeof(SpanArgs):
        log.warning(
            "the kernel library's struct pb_span_args is %d bytes, span_kernel.SpanArgs %d: they no longer "
            "match (kernels/prefixbatch_kernels.h); the native engine %s",
            library.pb_span_args_size(), ctypes.sizeof(SpanArgs), _FALLBACK,
        )  # fmt: skip
        return None
    return SpanKernel(library)
