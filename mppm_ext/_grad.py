"""Backward formulas of the energy ops, registered on the custom ops in :mod:`mppm_ext.ops`.

Two pieces, chained by every backend:
    finish_vjp          gradients of the finish's outputs (per-token planes and per-sequence statistics)
                        with respect to the parts ``[4, B, T]``: O(B*T) work, by torch.func over a float64
                        torch expression of the finish (the forward itself stays the compiled one);
    logits_parts_vjp    gradients of the parts with respect to ``hidden`` and ``logits``: the softmax of
                        each row is formed again from the saved logsumexp, a block of rows at a time, so the
                        backward reads each logits row once more and stores nothing of size [B, T, V] but
                        the gradient itself.
The fused-linear path has its own tiled backward next to its pass (:class:`mppm_ext.streaming._LogProbPass`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .parts import DEFINED_KINETIC, DEFINED_LOG_PROB, DEFINED_STATE
from .results import STAT_QUANTITIES, TOKEN_QUANTITIES
from .streaming import softmax_grad

#: Elements of one block of logits rows formed again in float64 by the backward (32 MiB).
ROW_BLOCK_ELEMENTS = 1 << 22


def _values(planes: Tensor, defined: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """Per-position values of every quantity, finite everywhere (so that no NaN reaches a gradient), where
    each is defined, and the used mask of the statistics (valid and K > 0)."""
    has_lp = (defined & DEFINED_LOG_PROB) != 0
    has_k = (defined & DEFINED_KINETIC) != 0
    state = (defined & DEFINED_STATE) != 0
    moved = has_k & (planes[1] > 0)
    valid = has_lp & has_k
    lp = torch.where(has_lp, planes[0], 0.0)
    kin = torch.where(has_k, planes[1], 0.0)
    log_k = torch.log(torch.where(moved, planes[1], 1.0))  # log K = -inf at K = 0: no gradient there
    s = -lp
    values = {
        "log_prob": lp, "surprisal": s, "kinetic": kin, "log_kinetic": log_k,
        "energy": torch.exp(log_k + s), "log_energy": log_k + s, "additive_energy": kin + lp,
        "log_lagrangian": log_k - s, "entropy": torch.where(state, planes[2], 0.0),
        "logsumexp": torch.where(state, planes[3], 0.0), "ppl": torch.exp(s),
    }
    energies = valid & moved
    where = {"log_prob": has_lp, "surprisal": has_lp, "kinetic": has_k, "log_kinetic": moved,
             "energy": energies, "log_energy": energies, "additive_energy": valid, "log_lagrangian": energies,
             "entropy": state, "logsumexp": state}
    return values, where, valid & moved


def _finish_values(planes: Tensor, defined: Tensor) -> tuple[Tensor, Tensor]:
    """``(per_token [10, B, T], stats [B, 34])`` of the finish in float64 torch ops (the layout of
    csrc/include/mppm/energy.h), differentiable in ``planes``; where a plane or statistic is undefined
    the value is 0 with gradient 0."""
    values, where, used = _values(planes, defined)
    per_token = torch.stack([torch.where(where[name], values[name], 0.0) for name in TOKEN_QUANTITIES])
    n = used.sum(-1, keepdim=True).to(planes.dtype).clamp_min(1.0)
    means, stds, cvs, centred = [], [], [], {}
    for name in STAT_QUANTITIES:
        x = torch.where(used, values[name], 0.0)
        mean = x.sum(-1, keepdim=True) / n
        c = torch.where(used, x - mean, 0.0)
        var = (c * c).sum(-1, keepdim=True) / n
        std = torch.where(var > 0, torch.sqrt(torch.where(var > 0, var, 1.0)), 0.0)  # sqrt' is infinite at 0
        centred[name] = c
        means.append(mean)
        stds.append(std)
        cvs.append(std / torch.where(mean != 0, mean.abs(), 1.0))
    a, b = centred["log_kinetic"], centred["surprisal"]
    saa, sbb = (a * a).sum(-1, keepdim=True), (b * b).sum(-1, keepdim=True)
    corr = (a * b).sum(-1, keepdim=True) / torch.sqrt(torch.where((saa > 0) & (sbb > 0), saa * sbb, 1.0))
    return per_token, torch.cat(means + stds + cvs + [corr], dim=-1)


def finish_vjp(planes: Tensor, defined: Tensor, g_tokens: Optional[Tensor], g_stats: Optional[Tensor]) -> Tensor:
    """``[4, B, T]`` float64: the gradient with respect to the parts of a loss whose gradients with respect
    to the finish's outputs are ``g_tokens [10, B, T]`` and ``g_stats [B, 34]`` (None: 0)."""
    planes = planes.detach().double()
    _, vjp = torch.func.vjp(lambda p: _finish_values(p, defined), planes)
    zeros_tok = torch.zeros(len(TOKEN_QUANTITIES), *planes.shape[1:], dtype=torch.float64, device=planes.device)
    zeros_stats = torch.zeros(planes.shape[1], 3 * len(STAT_QUANTITIES) + 1, dtype=torch.float64,
                              device=planes.device)
    g_tokens = zeros_tok if g_tokens is None else torch.nan_to_num(g_tokens.double(), nan=0.0)
    g_stats = zeros_stats if g_stats is None else torch.nan_to_num(g_stats.double(), nan=0.0)
    (g_planes,) = vjp((g_tokens, g_stats))
    return g_planes


def logits_parts_vjp(hidden: Tensor, logits: Tensor, labels: Tensor, defined: Tensor, planes: Tensor,
                     inv_temperature: float, g_planes: Tensor, needs: tuple[bool, bool]):
    """``(dL/dhidden, dL/dlogits)`` (None where not needed) from the parts' gradient ``g_planes [4, B, T]``.

    hidden ``[B, T, d]``, logits ``[B, T, V]``, labels ``[B, T]`` (ids in the vocabulary where a target is
    scored), ``defined`` and ``planes`` as the forward produced them (logsumexp and entropy are reused)."""
    B, T, V = logits.shape
    has_lp = (defined & DEFINED_LOG_PROB) != 0
    has_k = (defined & DEFINED_KINETIC) != 0
    state = (defined & DEFINED_STATE) != 0
    g_lp = torch.where(has_lp, g_planes[0], 0.0)
    g_k = torch.where(has_k, g_planes[1], 0.0)
    g_ent = torch.where(state, g_planes[2], 0.0)
    g_lse = torch.where(state, g_planes[3], 0.0)
    g_hidden = g_logits = None
    with torch.no_grad():
        if needs[0]:
            step = torch.zeros(B, T, hidden.shape[-1], dtype=torch.float64, device=hidden.device)
            step[:, 1:] = hidden[:, 1:].double() - hidden[:, :-1].double()
            pull = torch.where(has_k.unsqueeze(-1), g_k.unsqueeze(-1) * step, 0.0)  # dK_t/dh_t = h_t - h_{t-1}
            g = pull.clone()
            g[:, :-1] -= pull[:, 1:]
            g_hidden = g.to(hidden.dtype)
        if needs[1]:
            target = torch.full((B, T), -1, dtype=torch.long, device=logits.device)
            target[:, :-1] = torch.where(has_lp[:, :-1], labels[:, 1:].long(), -1)
            flat = logits.reshape(B * T, V)
            g_logits = torch.zeros_like(flat)
            lse = torch.where(state, planes[3], float("inf")).reshape(-1)  # rows that are not read: p = 0
            entropy = torch.where(state, planes[2], 0.0).reshape(-1)
            g_lp, g_lse, g_ent, target, state = (x.reshape(-1) for x in (g_lp, g_lse, g_ent, target, state))
            step = max(1, ROW_BLOCK_ELEMENTS // V)
            for r0 in range(0, B * T, step):
                rows = slice(r0, min(B * T, r0 + step))
                x = flat[rows].double() * inv_temperature
                gx = softmax_grad(x, lse[rows], entropy[rows], g_lp[rows], g_lse[rows], g_ent[rows], target[rows],
                                  inv_temperature)
                g_logits[rows] = torch.where(state[rows].unsqueeze(1), gx, 0.0).to(logits.dtype)
            g_logits = g_logits.view(B, T, V)
    return g_hidden, g_logits


__all__ = ["finish_vjp", "logits_parts_vjp"]
