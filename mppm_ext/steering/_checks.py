"""Argument checks of the steering API; each failure names the argument and what was expected
(ValueError for values and shapes, TypeError for types and dtypes), as in mppm_ext._validate."""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from .. import _validate as check


@dataclass(frozen=True)
class SteerInputs:
    device: torch.device
    max_iter: int


def _number(x, name: str, *, minimum: float, strict: bool) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or x < minimum or (strict and x == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {x}")


def _count(x, name: str, minimum: int) -> None:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x}")


def solver_options(lam, tol, max_iter, newton_steps, gain_tol, max_step, m: int) -> int:
    """Checks the solver's scalar options; returns max_iter with its default (2 m + 10) filled in."""
    _number(lam, "lam", minimum=0.0, strict=False)
    _number(tol, "tol", minimum=0.0, strict=True)
    _number(gain_tol, "gain_tol", minimum=0.0, strict=True)
    _number(max_step, "max_step", minimum=0.0, strict=True)
    _count(newton_steps, "newton_steps", 1)
    if max_iter is None:
        return 2 * m + 10
    _count(max_iter, "max_iter", 1)
    return max_iter


def targets_and_delta(targets, delta, B: int, vocab: int) -> int:
    """targets [B, m] int ids in [0, vocab), delta [B, m] finite float; returns m."""
    targets, delta = check.tensor(targets, "targets"), check.tensor(delta, "delta")
    if targets.dim() != 2 or targets.shape[0] != B:
        raise ValueError(f"targets must be [B, m] with B = {B}, got shape {tuple(targets.shape)}")
    if targets.shape[1] == 0:
        raise ValueError("targets must name at least one token (m >= 1)")
    if tuple(delta.shape) != tuple(targets.shape):
        raise ValueError(f"delta must have the shape of targets {tuple(targets.shape)}, got {tuple(delta.shape)}")
    check.index_dtype(targets, "targets")
    if not delta.is_floating_point():
        raise TypeError(f"delta must be a floating tensor of wanted log-p gains, got dtype {delta.dtype}")
    check.token_range(targets, torch.ones_like(targets, dtype=torch.bool), vocab, "targets")
    check.finite(delta, "delta")
    return targets.shape[1]


def steer_inputs(hidden, weight, targets, delta, bias, lam, tol, max_iter, newton_steps, gain_tol,
                 max_step) -> SteerInputs:
    hidden = check.tensor(hidden, "hidden")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [B, d] (one state per row to steer), got shape {tuple(hidden.shape)}")
    B, d = hidden.shape
    if B == 0:
        raise ValueError("the batch is empty (B = 0)")
    check.unembedding(weight, bias, d)
    V = weight.shape[0]
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")
    m = targets_and_delta(targets, delta, B, V)
    device = check.same_device({"hidden": hidden, "weight": weight, "targets": targets, "delta": delta,
                                "bias": bias})
    if device.type == "meta":
        raise ValueError("steer_step needs values (its Gauss-Newton loop branches on them); got meta tensors")
    # weight is not scanned here (a pass over V d): the streaming pass finds its NaN/inf itself.
    check.finite(hidden, "hidden")
    if bias is not None:
        check.finite(bias, "bias")
    return SteerInputs(device, solver_options(lam, tol, max_iter, newton_steps, gain_tol, max_step, m))
