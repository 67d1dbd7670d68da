"""Damped minimum-norm Gauss-Newton shared by every steering problem (final state, earlier layers).

A problem maps a perturbation delta_h [B, d] to a :class:`Linearization`: the targets' log p there and,
on demand, the Jacobian in the structured form G = rows - 1 center^T of :mod:`mppm_ext.steering.cg`.
Step k solves (G G^T + lam I) u = r + G delta_h with r the remaining gain, takes delta_full = G^T u
(the minimum-norm point of the linear model, so delta_h stays in J's row space) and moves towards it,
the step capped at max_step * ||h|| and halved until ||r|| decreases (at most ``_HALVINGS`` times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .cg import apply_j, apply_jt, solve

_HALVINGS = 6  # step lengths down to 1/64 of the Gauss-Newton step before a row is declared stalled


@dataclass
class Linearization:
    """The targets' log p at one point, [B, m] float64, and a thunk giving (rows [B, m, d], center [B, d]|None)."""

    log_prob: Tensor
    jacobian: Callable[[], tuple[Tensor, Optional[Tensor]]]


@dataclass(frozen=True)
class GaussNewtonOptions:
    lam: float
    tol: float
    max_iter: int
    newton_steps: int
    gain_tol: float
    max_step: float
    cg_backend: str


@dataclass(frozen=True)
class SteerResult:
    """Result of :func:`mppm_ext.steer_step` (and :func:`mppm_ext.steering.steer_layer`).

    Per batch row b (S = Gauss-Newton steps run, entries of steps a row did not take are NaN / 0):
        delta_h: [B, d] float32, the perturbation to add to the steered state.
        delta_norm: [B] float32, ||delta_h||; relative_norm: ||delta_h|| / ||h||.
        log_prob_before, log_prob_after: [B, m] float64, log p of each target before and after.
        surprisal_before, surprisal_after: [B, m] float64, their negatives.
        requested: [B, m] float64, the asked gains; achieved: [B, m] float64, log_prob_after - before.
        predicted_gain: [B, S, m] float64, the gain the linear model promised for the step taken
            (relative to the start); achieved_gain: [B, S, m] float64, the gain measured after it.
        step_scale: [B, S] float64, the fraction of the Gauss-Newton step taken (trust region x halvings).
        cg_iters: [B, S] int64, cg_residual: [B, S] float64 (relative), cg_converged_steps: [B, S] bool.
        cg_converged: [B] bool, every CG solve of the row met ``tol``.
        converged: [B] bool, every achieved gain is within ``gain_tol`` of the asked one.
        feasible: [B] bool, the request is possible at all (every wanted log p < 0 and the wanted
            probabilities of the distinct targets sum to < 1).
        steps: [B] int64, Gauss-Newton steps the row took.
        kinetic_before, kinetic_after: [B] float64, K = 0.5 ||h - h_prev||^2 of the step into the steered
            state before and after steering; log_energy_before, log_energy_after: [B, m] float64,
            log K + s of each target (the product energy of docs/definitions.md, with that target as the next token).
            Only when ``previous`` (h_prev) is given to :func:`mppm_ext.steer_step`, else None.
    """

    delta_h: Tensor
    delta_norm: Tensor
    relative_norm: Tensor
    log_prob_before: Tensor
    log_prob_after: Tensor
    surprisal_before: Tensor
    surprisal_after: Tensor
    requested: Tensor
    achieved: Tensor
    predicted_gain: Tensor
    achieved_gain: Tensor
    step_scale: Tensor
    cg_iters: Tensor
    cg_residual: Tensor
    cg_converged_steps: Tensor
    cg_converged: Tensor
    converged: Tensor
    feasible: Tensor
    steps: Tensor
    kinetic_before: Optional[Tensor] = None
    kinetic_after: Optional[Tensor] = None
    log_energy_before: Optional[Tensor] = None
    log_energy_after: Optional[Tensor] = None


def feasible(log_prob: Tensor, targets: Tensor, delta: Tensor) -> Tensor:
    """[B] bool: the wanted log p = log_prob + delta is < 0 for every target, and the wanted
    probabilities of distinct targets (a repeated id counts once, with its largest wish) sum to < 1."""
    wanted = log_prob + delta
    same = targets[:, :, None] == targets[:, None, :]  # [B, m, m]
    m = targets.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=targets.device).tril(-1)
    wanted_max = torch.where(same, wanted[:, None, :], -torch.inf).amax(-1)
    first = ~(same & earlier).any(-1)
    total = torch.where(first, wanted_max, -torch.inf).logsumexp(-1)
    return (wanted < 0).all(-1) & (total < 0)


def _where_rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def gauss_newton(problem, hidden: Tensor, targets: Tensor, delta: Tensor, opt: GaussNewtonOptions) -> SteerResult:
    """Run the damped Gauss-Newton loop; ``problem.at(delta_h) -> Linearization``; hidden [B, d] float32
    (for ||h|| only), targets [B, m] int64, delta [B, m] float64."""
    B, m = delta.shape
    dev = hidden.device
    delta_h = torch.zeros_like(hidden, dtype=torch.float32)
    state = problem.at(delta_h)
    lp0 = state.log_prob
    want = lp0 + delta
    cap = opt.max_step * hidden.float().norm(dim=-1).clamp_min(1e-30)  # [B]
    active = torch.ones(B, dtype=torch.bool, device=dev)
    record = {k: [] for k in ("predicted", "achieved", "scale", "iters", "residual", "cg_ok")}
    steps = torch.zeros(B, dtype=torch.int64, device=dev)

    def remaining(lin: Linearization) -> Tensor:
        return want - lin.log_prob

    for _ in range(opt.newton_steps):
        r = remaining(state)
        active = active & ~(r.abs() <= opt.gain_tol).all(-1)
        if not bool(active.any()):
            break
        rows, center = state.jacobian()
        dh64 = delta_h.double()
        rhs = r + apply_j(rows, center, dh64)
        sol = solve(rows, center, rhs, lam=opt.lam, tol=opt.tol, max_iter=opt.max_iter, backend=opt.cg_backend)
        step = apply_jt(rows, center, sol.u) - dh64  # [B, d] float64
        length = step.norm(dim=-1)
        scale = torch.where(length > cap, cap / length.clamp_min(1e-300), 1.0)
        scale = torch.where(active, scale, 0.0)
        merit = (r * r).sum(-1)
        accepted = ~active
        trial_state = state
        for _ in range(_HALVINGS + 1):
            trial = (dh64 + scale[:, None] * step).float()
            trial_state = problem.at(trial)
            tr = remaining(trial_state)
            better = (tr * tr).sum(-1) < merit
            newly = ~accepted & better
            accepted = accepted | newly
            if bool(accepted.all()):
                break
            scale = torch.where(accepted, scale, scale / 2)
        stalled = ~accepted
        scale = torch.where(stalled, 0.0, scale)
        new_delta = _where_rows(active & accepted, (dh64 + scale[:, None] * step).float(), delta_h)
        predicted = state.log_prob + scale[:, None] * apply_j(rows, center, step) - lp0
        if not torch.equal(new_delta, trial):  # some row took another step length than the last trial
            trial_state = problem.at(new_delta)
        state = trial_state
        delta_h = new_delta
        took = active & accepted
        nan = torch.full_like(predicted, float("nan"))
        record["predicted"].append(torch.where(took[:, None], predicted, nan))
        record["achieved"].append(torch.where(took[:, None], state.log_prob - lp0, nan))
        record["scale"].append(torch.where(active, scale, float("nan")))
        record["iters"].append(torch.where(active, sol.iters, 0))
        record["residual"].append(torch.where(active, sol.residual, float("nan")))
        record["cg_ok"].append(sol.converged | ~active)
        steps = steps + took.long()
        active = took

    lp1 = state.log_prob
    achieved = lp1 - lp0

    def stacked(key: str, empty_dtype) -> Tensor:
        if not record[key]:
            return torch.empty(B, 0, *([m] if key in ("predicted", "achieved") else []), dtype=empty_dtype, device=dev)
        return torch.stack(record[key], dim=1)

    cg_ok = stacked("cg_ok", torch.bool)
    norm = delta_h.norm(dim=-1)
    return SteerResult(
        delta_h=delta_h,
        delta_norm=norm,
        relative_norm=norm / hidden.float().norm(dim=-1),
        log_prob_before=lp0,
        log_prob_after=lp1,
        surprisal_before=-lp0,
        surprisal_after=-lp1,
        requested=delta,
        achieved=achieved,
        predicted_gain=stacked("predicted", torch.float64),
        achieved_gain=stacked("achieved", torch.float64),
        step_scale=stacked("scale", torch.float64),
        cg_iters=stacked("iters", torch.int64),
        cg_residual=stacked("residual", torch.float64),
        cg_converged_steps=cg_ok,
        cg_converged=cg_ok.all(-1),
        converged=((achieved - delta).abs() <= opt.gain_tol).all(-1),
        feasible=feasible(lp0, targets, delta),
        steps=steps,
    )
