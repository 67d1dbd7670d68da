"""Minimal-norm Jacobian steering of the state that feeds the unembedding (docs/definitions.md,
"Jacobian steering").

For targets y_1..y_m of one batch row, J has rows g_i = d log p(y_i | h) / dh. For the post-norm state
x with logits z = W x + b, g_i = W[y_i] - W^T softmax(z): one streaming pass over W
(:func:`mppm_ext.streaming.moments_pass`) gives logsumexp(z) and wbar = W^T softmax(z) together, after
which J is the gathered rows W[y] minus wbar, O(m d), and the CG iterations never touch W again. With a
final norm, h is the pre-norm state and J = J_x N'(h): N'^T is applied to W[y] and wbar by one batched
VJP through the norm alone (O(m d)).

The nonlinear problem log p(y_i | h + delta) = log p(y_i | h) + Delta_i is solved by damped minimum-norm
Gauss-Newton (:mod:`mppm_ext.steering.gauss_newton`), re-linearising with one streaming pass per step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _validate as check
from ..kinetic import step_kinetic
from ..streaming import moments_pass
from .._dispatch import backend_reasons, choose
from . import _checks, cg
from .gauss_newton import GaussNewtonOptions, Linearization, SteerResult, gauss_newton


def _norm_fn(norm) -> Callable[[Tensor], Tensor]:
    """``norm`` as a function of a float32 state: a module's parameters and buffers are cast to float32
    (a bf16 LayerNorm would refuse a float32 input, and its VJP in bf16 would lose the 1e-3 level)."""
    if isinstance(norm, torch.nn.Module):
        state = {k: (v.float() if v.is_floating_point() else v)
                 for k, v in list(norm.named_parameters()) + list(norm.named_buffers())}
        return lambda x: torch.func.functional_call(norm, state, (x,)).float()
    return lambda x: norm(x).float()


class FinalStateProblem:
    """log p of the targets as a function of the steered final state, evaluated with streaming passes."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, norm, impl: str):
        self.hidden = hidden.float()
        self.weight, self.bias, self.targets, self.impl = weight, bias, targets, impl
        # Whether any evaluation met a non-finite softmax, kept on the device: an evaluation never reads
        # back to the host; steer_step checks the flag once, after the solve.
        self.non_finite = torch.zeros((), dtype=torch.bool, device=hidden.device)
        self.norm = None if norm is None else _norm_fn(norm)
        # Gathered once: O(B m d), the only part of W the Jacobian and the CG need.
        self.w_targets = weight[targets].float()
        self.b_targets = None if bias is None else bias[targets].double()

    def at(self, delta_h: Tensor) -> Linearization:
        h = self.hidden + delta_h
        x = h if self.norm is None else self.norm(h)
        x = x.double() if self.weight.dtype == torch.float64 else x
        lse, wbar, bad = moments_pass(self.impl, x, self.weight, self.bias)
        self.non_finite |= bad.any()
        z_targets = torch.einsum("bmd,bd->bm", self.w_targets.double(), x.double())
        if self.b_targets is not None:
            z_targets = z_targets + self.b_targets
        log_prob = z_targets - lse.double()[:, None]
        return Linearization(log_prob, lambda: self._jacobian(h, wbar.float()))

    def _jacobian(self, h: Tensor, wbar: Tensor) -> tuple[Tensor, Tensor]:
        if self.norm is None:
            return self.w_targets, wbar
        _, vjp = torch.func.vjp(self.norm, h)
        cot = torch.cat([self.w_targets, wbar[:, None]], dim=1)  # [B, m + 1, d]
        (pulled,) = torch.func.vmap(vjp, in_dims=1, out_dims=1)(cot)
        return pulled[:, :-1], pulled[:, -1]


def steer_reasons(device: torch.device, impl: str, m: int) -> dict:
    """The backend reasons of steer_step: the streaming pass's, and for triton also the CG's (m = 1 uses
    the closed form on every backend)."""
    reasons = backend_reasons(device, impl)
    streaming_triton = reasons["triton"]
    reasons["triton"] = lambda: streaming_triton() or (cg.triton_reason(m) if m > 1 else None)
    return reasons


def steer_step(hidden: Tensor, weight: Tensor, targets: Tensor, delta: Tensor, *, bias: Optional[Tensor] = None,
               norm=None, lam: float = 0.0, tol: float = 1e-4, max_iter: Optional[int] = None,
               newton_steps: int = 5, impl: str = "auto", gain_tol: float = 1e-3,
               max_step: float = 0.25, previous: Optional[Tensor] = None) -> SteerResult:
    """The smallest perturbation of ``hidden`` that raises log p of each target by the asked amount.

    Solves min ||delta_h|| subject to log p(y_i | h + delta_h) = log p(y_i | h) + delta_i for every
    row, by damped minimum-norm Gauss-Newton: each step solves (J J^T + lam I) u = r + J delta_h with
    conjugate gradients (m = 1: closed form) and sets delta_h = J^T u, so delta_h stays in the row space
    of the current J. Each step is one streaming pass over W (plus one per halving of the line search).

    Args:
        hidden: ``[B, d]`` float32/bfloat16/float16 (float64 with ``impl="reference"``): the state to
            steer. With ``norm`` it is the pre-norm state, else the state that feeds the unembedding.
        weight: ``[V, d]`` unembedding, same dtype family as hidden.
        targets: ``[B, m]`` int64/int32 token ids in [0, V).
        delta: ``[B, m]`` float: wanted increase of each target's log p (negative lowers it).
        bias: optional ``[V]`` unembedding bias.
        norm: optional final norm (an ``nn.Module`` such as the model's RMSNorm/LayerNorm, or a row-wise
            callable ``[B, d] -> [B, d]``) applied to hidden before the unembedding.
        lam: Tikhonov damping lam >= 0 of J J^T; lam > 0 makes duplicate or near-duplicate targets
            (rank-deficient J) solvable, at the price of gains below the asked ones.
        tol: CG stopping rule, relative residual ||r - A u|| / ||r||.
        max_iter: CG iterations per Gauss-Newton step (default 2 m + 10; exact arithmetic needs m).
        newton_steps: at most this many Gauss-Newton steps (each one re-linearises).
        impl: "auto" | "cuda" | "triton" | "cpp" | "reference": backend of the streaming pass and of
            the CG (an explicit "triton" with more targets than the Triton CG holds raises
            BackendUnavailableError; "auto" then goes on to the next backend).
        gain_tol: a row has converged when every achieved gain is within gain_tol nats of the asked one.
        max_step: trust region: a Gauss-Newton step is at most ``max_step * ||hidden||`` long
            (an undamped step on an infeasible request was seen to reach ||delta_h|| = 1e42).
        previous: optional ``[B, d]`` state of the previous position (same space as ``hidden``): the
            result then also holds the kinetic energy of the step into the steered state and the log
            energy log K + s of each target, before and after steering.

    Returns:
        :class:`SteerResult`: ``delta_h`` [B, d] float32 and per-row diagnostics. Not differentiable: the
        solve runs without a graph, so ``delta_h`` never requires grad, whatever the inputs do (it is a value
        to add to the state, not a function of ``hidden`` that autograd could follow).

    Infeasible requests (some wanted log p >= 0, or the wanted probabilities of distinct targets sum
    to 1 or more) are flagged in ``feasible``; they are still attempted within the trust region, so
    ``||delta_h|| <= newton_steps * max_step * ||hidden||`` and ``converged`` is False.
    """
    args = _checks.steer_inputs(hidden, weight, targets, delta, bias, lam, tol, max_iter, newton_steps,
                                gain_tol, max_step)
    device = args.device
    impl = choose("steer_step", impl, steer_reasons(device, impl, targets.shape[1]))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    problem = FinalStateProblem(hidden, weight, bias, targets.long(), norm, impl)
    options = GaussNewtonOptions(lam=float(lam), tol=float(tol), max_iter=args.max_iter,
                                 newton_steps=int(newton_steps), gain_tol=float(gain_tol), max_step=float(max_step),
                                 cg_backend=impl)
    if previous is not None:
        previous = check.tensor(previous, "previous")
        if previous.shape != hidden.shape:
            raise ValueError(f"previous must have the shape of hidden {tuple(hidden.shape)}, got {tuple(previous.shape)}")
        check.same_device({"hidden": hidden, "previous": previous})
        check.float_dtype(previous, "previous", allow_float64=impl == "reference")
        check.finite(previous, "previous")
    with torch.no_grad():  # no graph to the norm's parameters; torch.func's vjp still differentiates
        result = gauss_newton(problem, problem.hidden, targets.long(), delta.double(), options)
    if bool(problem.non_finite):
        raise ValueError("weight or bias holds NaN or inf (the softmax over W h + b is not finite)")
    return result if previous is None else with_energy(result, hidden, previous)


def with_energy(result: SteerResult, hidden: Tensor, previous: Tensor) -> SteerResult:
    """``result`` with the kinetic and log energies of the step from ``previous`` into ``hidden``, before
    and after ``result.delta_h`` (float64)."""
    k_before = step_kinetic(hidden, previous)
    k_after = step_kinetic(hidden.double() + result.delta_h.double(), previous)
    return dataclasses.replace(result, kinetic_before=k_before, kinetic_after=k_after,
                               log_energy_before=k_before.log()[:, None] + result.surprisal_before,
                               log_energy_after=k_after.log()[:, None] + result.surprisal_after)

