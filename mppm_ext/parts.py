"""The parts contract: what every backend of :func:`mppm_ext.energy` and
:func:`mppm_ext.energy_from_hidden` (and the scans and steered generation) produces, and the one compiled
finish that turns parts into every derived quantity and per-sequence statistic.

A backend computes, per position t of sequence b, the four parts
    log_prob[b, t]   log p(x_{t+1} | state t), defined where tokens t and t+1 are real,
    kinetic[b, t]    K_t = ½‖h_t − h_{t−1}‖², defined where tokens t−1 and t are real,
    entropy[b, t],   the entropy and logsumexp of the softmax at state t, defined where state t is real,
    logsumexp[b, t]
and says which are defined. :func:`finish` hands them to the ``mppm_ext::energy_finish`` op
(csrc/include/mppm/finish.h: the same C++ / CUDA code the fused ``energy`` kernels finish with), so that
the ten per-token planes and the statistics are computed once, in one place, for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .results import EnergyResult, unpack_energy

#: Bits of ``Parts.defined`` (kDefinedLogProb / kDefinedKinetic / kDefinedState in
#: csrc/include/mppm/energy.h).
DEFINED_LOG_PROB = 1
DEFINED_KINETIC = 2
DEFINED_STATE = 4


@dataclass(frozen=True)
class Parts:
    """The parts of a batch of sequences.

    Attributes:
        planes: ``[4, B, T]`` float64, contiguous: plane 0 log p_t, plane 1 K_t, plane 2 the entropy,
            plane 3 the logsumexp (values where a part is not defined are ignored by the finish).
        defined: ``[B, T]`` uint8 bits: DEFINED_LOG_PROB | DEFINED_KINETIC | DEFINED_STATE.
    """

    planes: Tensor
    defined: Tensor

    @classmethod
    def of(cls, log_prob: Tensor, kinetic: Tensor, real: Tensor, entropy: Optional[Tensor] = None,
           logsumexp: Optional[Tensor] = None) -> "Parts":
        """Parts from ``[B, T]`` log p_t and K_t (any float dtype, any value where undefined), the entropy
        and logsumexp (NaN planes when not given, and then not defined) and the ``[B, T]`` bool ``real``
        tokens, which decide what is defined."""
        planes = torch.stack([log_prob, kinetic, _or_nan(entropy, log_prob), _or_nan(logsumexp, log_prob)])
        with_state = entropy is not None and logsumexp is not None
        return cls(planes.to(torch.float64).contiguous(), defined_bits(real, with_state))

    @classmethod
    def where_not_nan(cls, log_prob: Tensor, kinetic: Tensor) -> "Parts":
        """Parts from ``[B, T]`` log p_t and K_t that are NaN exactly where undefined (as stored by the
        scans)."""
        defined = ((~log_prob.isnan()).to(torch.uint8) * DEFINED_LOG_PROB
                   + (~kinetic.isnan()).to(torch.uint8) * DEFINED_KINETIC)
        planes = torch.stack([log_prob, kinetic, _or_nan(None, log_prob), _or_nan(None, log_prob)])
        return cls(planes.to(torch.float64).nan_to_num(0.0).contiguous(), defined)


def _or_nan(plane: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.full_like(like, float("nan")) if plane is None else plane


def real_tokens(tokens: Tensor, attention_mask, ignore_index: int) -> Tensor:
    """``[B, T]`` bool: token t takes part (attention_mask nonzero there and not ``ignore_index``)."""
    real = tokens != ignore_index
    if attention_mask is not None:
        real = real & (attention_mask != 0)
    return real


def defined_bits(real: Tensor, with_state: bool = True) -> Tensor:
    """``[B, T]`` uint8 parts bits from ``real`` ``[B, T]`` bool: log p_t needs tokens t and t+1, K_t
    needs tokens t−1 and t, the entropy and logsumexp need token t (their bit, DEFINED_STATE, is left
    clear without ``with_state``: a backend that does not compute them)."""
    has_lp = torch.zeros_like(real)
    has_lp[:, :-1] = real[:, :-1] & real[:, 1:]
    has_k = torch.zeros_like(real)
    has_k[:, 1:] = has_lp[:, :-1]
    return (has_lp.to(torch.uint8) * DEFINED_LOG_PROB + has_k.to(torch.uint8) * DEFINED_KINETIC
            + (real & with_state).to(torch.uint8) * DEFINED_STATE)


def finish(parts: Parts) -> EnergyResult:
    """Every output of :func:`mppm_ext.energy` from ``parts``, by the compiled finish (float32 outputs;
    the statistics are accumulated in float64 from the float64 parts).

    Where the compiled module is missing (Python started in the source tree), the reference backend's
    own finish stands in: see :mod:`mppm_ext._reference_backend`."""
    from ._dispatch import compiled_or_none

    if compiled_or_none() is None:
        from . import _reference_backend

        return _reference_backend.finish(parts)
    from .ops import energy_finish_op

    per_token, stats, counts = energy_finish_op(parts.planes, parts.defined)
    return unpack_energy(per_token, parts.defined, stats, counts)


__all__ = ["Parts", "finish", "real_tokens", "defined_bits", "DEFINED_LOG_PROB", "DEFINED_KINETIC", "DEFINED_STATE"]
