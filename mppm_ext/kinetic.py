"""Kinetic energy of the hidden state, written once for every product path (``energy_from_hidden``, the
steering solver, steered generation, the scans): ``K = ½‖h_t − h_{t−1}‖²``, formed in float64.

The compiled ``energy`` kernels compute the same quantity inside their fused row pass; this module is
for the paths that already hold the states as torch tensors."""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements of one float64 block of state differences (16 MiB): the states are differenced a few
#: positions at a time instead of converting all of ``[B, T, d]`` to float64 at once.
BLOCK_ELEMENTS = 1 << 21


def step_kinetic(current: Tensor, previous: Tensor) -> Tensor:
    """``½‖current − previous‖²`` over the last dimension, in float64.

    Args:
        current, previous: ``[..., d]`` float tensors of one shape (any float dtype; differences are
            taken after converting to float64, so 16-bit states lose nothing more).

    Returns:
        ``[...]`` float64.
    """
    step = current.double() - previous.double()
    return 0.5 * (step * step).sum(-1)


def kinetic(states: Tensor, real: Tensor) -> Tensor:
    """Per-position kinetic energy of a batch of sequences.

    Args:
        states: ``[B, T, d]`` float (the state whose motion is measured).
        real: ``[B, T]`` bool, which positions are real.

    Returns:
        ``[B, T]`` float64: ``K[:, t]`` is the step from state t−1 into state t, defined where positions
        t−1 and t are both real; NaN elsewhere (always at t = 0).
    """
    B, T, d = states.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float64, device=states.device)
    step = max(1, BLOCK_ELEMENTS // max(1, B * d))
    for t0 in range(1, T, step):
        t1 = min(T, t0 + step)
        out[:, t0:t1] = step_kinetic(states[:, t0:t1], states[:, t0 - 1:t1 - 1])
    out[:, 1:] = torch.where(real[:, 1:] & real[:, :-1], out[:, 1:], float("nan"))
    return out


__all__ = ["step_kinetic", "kinetic", "BLOCK_ELEMENTS"]
