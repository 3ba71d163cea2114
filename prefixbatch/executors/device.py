"""Turns the spec's device and dtype choices into a torch device and dtype.

`auto` means: CUDA when a GPU is visible, else the CPU; float32 on the CPU, bfloat16 on CUDA.
Asking for CUDA on a machine without one is the user's mistake, reported as a `UserError`.

in → out: ("auto" | "cpu" | "cuda", "auto" | dtype name) → (torch.device, torch.dtype).
"""

from __future__ import annotations

import torch

from prefixbatch.errors import UserError

__all__ = ["free_device_bytes", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`executor.device` → the device to run on."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        msg = "executor.device is 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'"
        raise UserError(msg)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`model.dtype` → the dtype of weights and activations on `device`."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def free_device_bytes(device: torch.device) -> int:
    """Free memory on a CUDA device right now, in bytes."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)
