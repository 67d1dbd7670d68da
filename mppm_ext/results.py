"""The result types every backend of :func:`mppm_ext.energy` returns, so that kernels, the reference,
the CLI and downstream code all agree on names and layout."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Mapping

import torch
from torch import Tensor

#: Per-token quantities, in the order of the kernels' output planes (csrc/include/mppm/energy.h).
TOKEN_QUANTITIES = (
    "log_prob",
    "surprisal",
    "kinetic",
    "log_kinetic",
    "energy",
    "log_energy",
    "additive_energy",
    "log_lagrangian",
    "entropy",
    "logsumexp",
)
#: Quantities with per-sequence statistics: the per-token ones plus point perplexity exp(surprisal).
STAT_QUANTITIES = TOKEN_QUANTITIES + ("ppl",)


@dataclass(frozen=True)
class EnergyStats:
    """Per-sequence statistics over the *used* positions of each sequence.

    The used positions are the ``valid`` ones with ``kinetic > 0``; valid positions with a zero step
    (log K = -inf) are counted in ``zero_kinetic`` and left out of every statistic.

    Attributes (``[B]`` tensors, or 0-d for unbatched input):
        count: int64, number of used positions.
        zero_kinetic: int64, valid positions left out because kinetic == 0.
        mean, std, cv: mappings from each name in ``STAT_QUANTITIES`` to float tensors. ``std`` is
            the population standard deviation (ddof = 0); ``cv = std / |mean|``.
        corr_log_kinetic_surprisal: Pearson correlation of log K and surprisal.

    A sequence with no used position has count 0 and NaN statistics; with one used position the std
    and cv are 0 and the correlation is NaN. The correlation is also NaN when log K or surprisal is
    constant along the sequence (std below 1e-12 of its mean: rounding of a constant).
    """

    count: Tensor
    zero_kinetic: Tensor
    mean: Mapping[str, Tensor]
    std: Mapping[str, Tensor]
    cv: Mapping[str, Tensor]
    corr_log_kinetic_surprisal: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> "EnergyStats":
        """A copy with ``fn`` applied to every tensor."""
        return EnergyStats(
            count=fn(self.count),
            zero_kinetic=fn(self.zero_kinetic),
            mean={k: fn(v) for k, v in self.mean.items()},
            std={k: fn(v) for k, v in self.std.items()},
            cv={k: fn(v) for k, v in self.cv.items()},
            corr_log_kinetic_surprisal=fn(self.corr_log_kinetic_surprisal),
        )


@dataclass(frozen=True)
class EnergyResult:
    """Output of :func:`mppm_ext.energy`.

    Every per-token attribute is a ``[B, T]`` float32 tensor (``[T]`` for unbatched input). Index t
    follows docs/definitions.md: ``log_prob[:, t]`` scores token t+1 from state t, and
    ``kinetic[:, t]`` is the step from state t-1 into state t.

    Attributes:
        log_prob: log p(x_{t+1} | state t). Defined where tokens t and t+1 are real.
        surprisal: -log_prob (the potential, log point perplexity).
        kinetic: K_t = 0.5 * ||h_t - h_{t-1}||^2. Defined where tokens t-1 and t are real.
        log_kinetic: log K_t (-inf where the state did not move).
        energy: product energy K_t * PPL_t = exp(log K_t + s_t) (may overflow to inf in float32
            where log_energy > 88.7; use log_energy).
        log_energy: log K_t + s_t.
        additive_energy: K_t + log p_t (what the paper's code computed).
        log_lagrangian: log K_t - s_t.
        entropy: H_t = -sum_v p_t(v) log p_t(v) of the next-token distribution at state t, in nats
            (with ``temperature``, of softmax(z_t / temperature)). Defined at every real state t,
            t = T-1 included.
        logsumexp: logsumexp(z_t / temperature), the log-partition (for a z-loss). Defined as entropy.
        valid: bool, where the step into t (states t-1, t real) and the surprisal of the target t+1
            (scored) are both defined, i.e. where every energy-type quantity is.
        stats: :class:`EnergyStats` per sequence.

    Which positions count: a *state* t is real when attention_mask is nonzero there and tokens[t] is not
    ignore_index; a *target* t+1 is scored when attention_mask is nonzero there and labels[t+1] (tokens
    when no labels are given) is not ignore_index. log_prob[t] needs state t real and target t+1 scored;
    kinetic[t] needs states t-1 and t real. Entries that are not defined are NaN: log_prob/surprisal may
    be defined where ``valid`` is False (e.g. t = 0), as may kinetic/log_kinetic (e.g. t = T-1); the
    energy-type quantities are NaN exactly where ``valid`` is False.
    """

    log_prob: Tensor
    surprisal: Tensor
    kinetic: Tensor
    log_kinetic: Tensor
    energy: Tensor
    log_energy: Tensor
    additive_energy: Tensor
    log_lagrangian: Tensor
    entropy: Tensor
    logsumexp: Tensor
    valid: Tensor
    stats: EnergyStats

    def map(self, fn: Callable[[Tensor], Tensor]) -> "EnergyResult":
        """A copy with ``fn`` applied to every tensor, statistics included."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return EnergyResult(**{k: (v.map(fn) if k == "stats" else fn(v)) for k, v in values.items()})


def unpack_energy(per_token: Tensor, defined: Tensor, stats: Tensor, counts: Tensor) -> EnergyResult:
    """Build an :class:`EnergyResult` from the packed outputs of the ``mppm_ext::energy`` op.

    Args:
        per_token: ``[len(TOKEN_QUANTITIES), B, T]`` float32, 0 where undefined.
        defined: ``[B, T]`` uint8 masks: ``& 1`` log_prob is defined, ``& 2`` kinetic is defined,
            ``& 4`` the state is real (entropy and logsumexp are defined).
        stats: ``[B, 3 * len(STAT_QUANTITIES) + 1]`` float32: means, stds, cvs, then the correlation.
        counts: ``[B, 2]`` int64: used positions, zero-kinetic positions.
    """
    n = len(STAT_QUANTITIES)
    has_log_prob = (defined & 1) != 0
    has_kinetic = (defined & 2) != 0
    has_state = (defined & 4) != 0
    valid = has_log_prob & has_kinetic
    where = {"log_prob": has_log_prob, "surprisal": has_log_prob, "kinetic": has_kinetic, "log_kinetic": has_kinetic,
             "entropy": has_state, "logsumexp": has_state}

    def block(offset: int) -> dict[str, Tensor]:
        return {name: stats[:, offset + i] for i, name in enumerate(STAT_QUANTITIES)}

    return EnergyResult(
        **{name: torch.where(where.get(name, valid), per_token[i], float("nan"))
           for i, name in enumerate(TOKEN_QUANTITIES)},
        valid=valid,
        stats=EnergyStats(
            count=counts[:, 0],
            zero_kinetic=counts[:, 1],
            mean=block(0),
            std=block(n),
            cv=block(2 * n),
            corr_log_kinetic_surprisal=stats[:, 3 * n],
        ),
    )


def to_float32(result: EnergyResult) -> EnergyResult:
    """``result`` with every floating tensor cast to float32 (the public contract's dtype)."""
    return result.map(lambda t: t.float() if t.is_floating_point() else t)


__all__ = ["TOKEN_QUANTITIES", "STAT_QUANTITIES", "EnergyStats", "EnergyResult", "unpack_energy", "to_float32"]
