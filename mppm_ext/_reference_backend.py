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


def _upcast(x: Tensor) -> Tensor:
    """16-bit inputs computed in float32, as every other backend accumulates (a bf16 log_softmax errs by up
    to 0.03 nats a token at V = 2053); float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def energy_parts(hidden: Tensor, logits: Tensor, labels: Tensor, real: Tensor, scored: Tensor,
                 inv_temperature: float) -> Parts:
    """Parts from ``hidden [B, T, d]``, ``logits [B, T, V]`` (float32, or float64 computed in float64;
    16-bit upcast to float32), ``labels [B, T]`` ids in the vocabulary, the ``[B, T]`` bool real states
    and scored targets, by the specification's functions. Differentiable in hidden and logits."""
    hidden, logits = _upcast(hidden), _upcast(logits)
    temperature = 1.0 / inv_temperature
    log_prob = reference.token_log_prob(logits, labels, real, scored, temperature)
    entropy, lse = reference.entropy_logsumexp(logits, real, temperature)
    return Parts.of(log_prob, reference.kinetic(hidden, real), entropy, lse, real, scored)


def finish(parts: Parts) -> EnergyResult:
    """The specification's finish (:func:`reference.energy_from_parts` in float64), as float32: the
    stand-in for the compiled finish where mppm_ext._C cannot be imported."""
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=parts.planes.device)
    planes = [torch.where((parts.defined & bit) != 0, plane, nan) for bit, plane in
              zip((DEFINED_LOG_PROB, DEFINED_KINETIC, DEFINED_STATE, DEFINED_STATE), parts.planes)]
    return to_float32(reference.energy_from_parts(*planes))


__all__ = ["energy_parts", "finish"]
