"""The parts contract: what every backend of :func:`mppm_ext.energy` and
:func:`mppm_ext.energy_from_hidden` (and the scans and steered generation) produces, and the one compiled
finish that turns parts into every derived quantity and per-sequence statistic.

A backend computes, per position t of sequence b, the parts
    log_prob[b, t]   log p(labels_{t+1} | state t), defined where state t is real and target t+1 scored,
    kinetic[b, t]    K_t = ½‖h_t − h_{t−1}‖², defined where states t−1 and t are real,
    entropy[b, t]    H of the next-token distribution at state t, defined where state t is real,
    logsumexp[b, t]  the log-partition there, likewise,
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

#: Bits of ``Parts.defined`` (kDefinedLogProb / kDefinedKinetic / kDefinedState in csrc/include/mppm/energy.h).
DEFINED_LOG_PROB = 1
DEFINED_KINETIC = 2
DEFINED_STATE = 4
#: The planes of ``Parts.planes``, in order.
PLANES = ("log_prob", "kinetic", "entropy", "logsumexp")


@dataclass(frozen=True)
class Parts:
    """The parts of a batch of sequences.

    Attributes:
        planes: ``[4, B, T]`` float64, contiguous, in the order of PLANES (values where a part is not
            defined are ignored by the finish).
        defined: ``[B, T]`` uint8 bits: DEFINED_LOG_PROB | DEFINED_KINETIC | DEFINED_STATE.
    """

    planes: Tensor
    defined: Tensor

    @classmethod
    def of(cls, log_prob: Tensor, kinetic: Tensor, entropy: Tensor, logsumexp: Tensor, real: Tensor,
           scored: Optional[Tensor] = None) -> "Parts":
        """Parts from ``[B, T]`` planes (any float dtype, any value where undefined) and the ``[B, T]``
        bool real states and scored targets (default: the real states), which decide what is defined."""
        planes = torch.stack([log_prob, kinetic, entropy, logsumexp]).to(torch.float64).contiguous()
        return cls(planes, defined_bits(real, scored))

    @classmethod
    def where_not_nan(cls, log_prob: Tensor, kinetic: Tensor) -> "Parts":
        """Parts from ``[B, T]`` log p_t and K_t that are NaN exactly where undefined (as stored by the
        scans, which keep no entropy: those planes are left undefined)."""
        defined = ((~log_prob.isnan()).to(torch.uint8) * DEFINED_LOG_PROB
                   + (~kinetic.isnan()).to(torch.uint8) * DEFINED_KINETIC)
        zero = torch.zeros_like(log_prob)
        planes = torch.stack([log_prob.nan_to_num(0.0), kinetic.nan_to_num(0.0), zero, zero])
        return cls(planes.to(torch.float64).contiguous(), defined)


def real_tokens(tokens: Tensor, attention_mask, ignore_index: int) -> Tensor:
    """``[B, T]`` bool: token t takes part (attention_mask nonzero there and not ``ignore_index``)."""
    real = tokens != ignore_index
    if attention_mask is not None:
        real = real & (attention_mask != 0)
    return real


def defined_bits(real: Tensor, scored: Optional[Tensor] = None) -> Tensor:
    """``[B, T]`` uint8 parts bits from the ``[B, T]`` bool real states and scored targets (default: the
    real states): log p_t needs state t and target t+1, K_t states t−1 and t, the entropy state t."""
    scored = real if scored is None else scored
    has_lp = torch.zeros_like(real)
    has_lp[:, :-1] = real[:, :-1] & scored[:, 1:]
    has_k = torch.zeros_like(real)
    has_k[:, 1:] = real[:, :-1] & real[:, 1:]
    return (has_lp.to(torch.uint8) * DEFINED_LOG_PROB + has_k.to(torch.uint8) * DEFINED_KINETIC
            + real.to(torch.uint8) * DEFINED_STATE)


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


__all__ = ["Parts", "finish", "real_tokens", "defined_bits", "DEFINED_LOG_PROB", "DEFINED_KINETIC", "DEFINED_STATE",
           "PLANES"]
