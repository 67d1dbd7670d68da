"""Autocast off inside the package's ops: a caller's ``torch.autocast`` would otherwise turn the tiles and
products the kernels form into 16-bit tensors, while every op accumulates in float32 by contract."""

from __future__ import annotations

import contextlib

import torch


def no_autocast(device: torch.device):
    """A context with autocast disabled for ``device`` (a no-op context for devices autocast does not know,
    such as ``meta``)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
