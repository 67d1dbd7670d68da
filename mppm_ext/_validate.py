"""Argument checks for the public API. Each failure names the argument and what was expected;
ValueError for wrong values and shapes, TypeError for wrong types and dtypes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_dtype(x: Tensor, name: str, allow_float64: bool) -> None:
    allowed = KERNEL_FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in allowed:
        hint = " (float64 runs only with impl='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {list(allowed)}{hint}")


def index_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold token ids as int32 or int64, got dtype {x.dtype}")


def same_device(named: dict[str, Optional[Tensor]]) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def has_data(x: Tensor) -> bool:
    """False for meta tensors, whose values cannot be checked."""
    return x.device.type != "meta"


def finite(x: Tensor, name: str) -> None:
    if has_data(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")


def token_range(tokens: Tensor, real: Tensor, vocab: int, name: str = "tokens") -> None:
    """Every real token id lies in [0, vocab)."""
    if not has_data(tokens):
        return
    bad = real & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}{where} = {int(tokens[tuple(where)])} is outside the vocabulary [0, {vocab})")


def unit_last_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension is contiguous (what the kernels stream over), else a copy."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def finite_rows(x: Tensor, rows: Tensor, name: str) -> None:
    """The rows of ``x`` ([B, T, n]) selected by the bool ``rows`` ([B, T]) hold no NaN or inf."""
    if has_data(x) and not bool(torch.isfinite(x[rows]).all()):
        raise ValueError(f"{name} holds NaN or inf in a position that is used")
