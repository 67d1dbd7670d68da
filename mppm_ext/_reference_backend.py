"""``impl="reference"``: the parts of :func:`mppm_ext.energy` computed by the plain-PyTorch specification
(:mod:`mppm_ext.reference`), for checking the kernels and for float64 inputs. This is the one product
module that imports the specification; every other path computes its answers independently of it, so
that the tests compare two computations.

The parts go to the compiled finish like every other backend's. Only where the compiled module is
missing (Python started in the source tree) does the specification's own finish stand in."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .parts import DEFINED_KINETIC, DEFINED_LOG_PROB, DEFINED_STATE, Parts
from .results import EnergyResult, to_float32


def energy_parts(hidden: Tensor, logits: Tensor, tokens: Tensor, real: Tensor) -> Parts:
    """Parts from ``hidden [B, T, d]``, ``logits [B, T, V]`` (any float dtype; computed in that dtype),
    ``tokens [B, T]`` and ``real [B, T]`` bool, by :func:`reference.token_log_prob` and
    :func:`reference.kinetic`."""
    log_prob = reference.token_log_prob(logits, tokens, real)
    kinetic = reference.kinetic(hidden, real)
    return Parts.of(log_prob, kinetic, real, *reference.entropy_logsumexp(logits, real))


def finish(parts: Parts) -> EnergyResult:
    """The specification's finish (:func:`reference.energy_from_parts` in float64), as float32: the
    stand-in for the compiled finish where mppm_ext._C cannot be imported."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=parts.planes.device)
    log_prob = torch.where((parts.defined & DEFINED_LOG_PROB) != 0, parts.planes[0], nan)
    kinetic = torch.where((parts.defined & DEFINED_KINETIC) != 0, parts.planes[1], nan)
    entropy, lse = (torch.where((parts.defined & DEFINED_STATE) != 0, parts.planes[i], nan) for i in (2, 3))
    return to_float32(reference.energy_from_parts(log_prob, kinetic, entropy, lse))


__all__ = ["energy_parts", "finish"]
