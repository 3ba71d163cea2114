"""Turns the spec's device and dtype choices into a torch device and dtype.

`auto` means: CUDA when a GPU is visible, else the CPU; float32 on the CPU, bfloat16 on CUDA.
Asking for CUDA on a machine without one is the user's mistake, reported as a `UserError`.
A job resolves them once (`registry.resolve_executor`, as names); an executor turns the
names into torch objects with `placement`.

in → out: ("auto" | "cpu" | "cuda", "auto" | dtype name) → (torch.device, torch.dtype).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from prefixbatch.errors import UserError

if TYPE_CHECKING:
    from prefixbatch.executors.registry import ResolvedExecutor

__all__ = ["dtype_name", "free_device_bytes", "placement", "resolve_device", "resolve_dtype", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`executor.device` → the device to run on."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        msg = "executor.device is 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'"
        raise UserError(msg)
    return torch.device(device)


def dtype_name(dtype: str, device_type: str) -> str:
    """`model.dtype` → the name of the dtype of weights and activations on a `device_type` device."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`model.dtype` → the dtype of weights and activations on `device`."""
    return torch_dtype(dtype_name(dtype, device.type))


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def placement(resolved: ResolvedExecutor) -> tuple[torch.device, torch.dtype]:
    """A `ResolvedExecutor`'s device and dtype as torch objects."""
    return torch.device(resolved.device), torch_dtype(resolved.dtype)


def free_device_bytes(device: torch.device | str) -> int:
    """Free memory on a CUDA device right now, in bytes."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
