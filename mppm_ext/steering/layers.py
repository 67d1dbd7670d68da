"""Steering any residual-stream state of a Hugging Face causal LM, with the Jacobian taken through the blocks
that follow it (docs/definitions.md, "Jacobian steering"); layers are numbered as :mod:`mppm_ext.models.layers`.

The perturbation is added to ``layer``'s state at one position by a hook (``models.layers.edit_hook``), and
the targets' log p at the last position is differentiated with torch.func through the whole forward: the
blocks before ``layer`` do not depend on the perturbation, so no derivative flows through them, and
the model's own code handles its masks and position embeddings (no per-architecture re-implementation
of the remaining blocks). J is formed row by row with one VJP per target (m backward passes reuse one
forward), or column by column with forward-mode JVPs (d passes; ``jacobian="jvp"``, for small d).

Attention runs in the "eager" implementation for the duration of the call: forward-mode AD is not
implemented for the fused SDPA / flash-attention kernels, and eager makes both modes compute the same
function. The model's previous setting is restored afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _validate as check
from . import _checks
from .gauss_newton import GaussNewtonOptions, Linearization, SteerResult, gauss_newton


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Switches the model to eager attention (HF ``set_attn_implementation`` where it exists, else the
    config field the attention modules read) and restores the previous choice."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)

    def use(name):
        if callable(setter):
            setter(name)
        else:
            config._attn_implementation = name

    if before != "eager":
        use("eager")
    try:
        yield
    finally:
        if before is not None and before != "eager":
            use(before)


class LayerProblem:
    """log p of the targets at the last position as a function of a perturbation of the state ``ref`` (a
    resolved :class:`mppm_ext.models.layers.LayerRef`) at ``position``."""

    def __init__(self, model, ref, input_ids, attention_mask, position: int, targets: Tensor, jacobian: str):
        self.model, self.ref, self.input_ids, self.mask = model, ref, input_ids, attention_mask
        self.position, self.targets, self.mode = position, targets, jacobian

    def log_prob(self, delta_h: Tensor) -> Tensor:
        """[B, m] float32 log p of the targets with ``delta_h`` [B, d] added; differentiable in delta_h."""
        from ..models import layers

        # add_at is out of place: torch.func traces it.
        handle = layers.edit_hook(self.model, self.ref, lambda h: layers.add_at(h, self.position, delta_h))
        try:
            logits = self.model(input_ids=self.input_ids, attention_mask=self.mask, use_cache=False).logits[:, -1]
        finally:
            handle.remove()
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, self.targets)

    def at(self, delta_h: Tensor) -> Linearization:
        with torch.no_grad():
            lp = self.log_prob(delta_h).double()
        return Linearization(lp, lambda: (self.jacobian(delta_h), None))

    def jacobian(self, delta_h: Tensor) -> Tensor:
        """J [B, m, d] float32 at ``delta_h``: m VJPs, or d JVPs (rows are independent, so one basis
        tangent repeated in every row gives column j for the whole batch)."""
        B, d = delta_h.shape
        if self.mode == "jvp":
            cols = []
            for j in range(d):
                tangent = torch.zeros_like(delta_h)
                tangent[:, j] = 1.0
                cols.append(torch.func.jvp(self.log_prob, (delta_h,), (tangent,))[1])
            return torch.stack(cols, dim=-1).float()
        out, vjp = torch.func.vjp(self.log_prob, delta_h)
        rows = [vjp(torch.nn.functional.one_hot(torch.full((B,), i, device=out.device), out.shape[1]).to(out.dtype))[0]
                for i in range(out.shape[1])]
        return torch.stack(rows, dim=1).float()


def steer_layer(model: nn.Module, input_ids: Tensor, layer, targets: Tensor, delta: Tensor, *,
                position: int = -1, attention_mask: Optional[Tensor] = None, lam: float = 0.0, tol: float = 1e-4,
                max_iter: Optional[int] = None, newton_steps: int = 5, gain_tol: float = 1e-3,
                max_step: float = 0.25, jacobian: str = "vjp") -> SteerResult:
    """The smallest perturbation of ``layer``'s state at ``position`` that raises log p of the targets at
    the last position by ``delta``; same solver and diagnostics as :func:`mppm_ext.steer_step`.

    Args:
        model: a Hugging Face causal LM of a family :mod:`mppm_ext.models.anatomy` knows (its forward takes
            input_ids / attention_mask and returns ``.logits``). Run in float32 or float64 for meaningful
            derivatives.
        input_ids: ``[B, T]`` int64 prompt.
        layer: an int or ``"final"``, numbered as :mod:`mppm_ext.models.layers` (0: the embeddings, i: the
            i-th block's output, -1: the last block's output before the final norm, "final": after it).
        targets, delta: ``[B, m]`` target ids and wanted log-p gains at the last position.
        position: the position whose state is perturbed (negative counts from the end; -1 by default).
        attention_mask: optional ``[B, T]`` (left padding keeps the last position real).
        jacobian: "vjp" (m backward passes per Gauss-Newton step) or "jvp" (d forward-mode passes).
        lam, tol, max_iter, newton_steps, gain_tol, max_step: as in :func:`mppm_ext.steer_step`.

    Returns:
        :class:`mppm_ext.steering.SteerResult`; ``delta_h`` is ``[B, d]`` float32.
    """
    from ..models import layers

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    input_ids = check.tensor(input_ids, "input_ids")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] tensor, got shape {tuple(input_ids.shape)}")
    check.index_dtype(input_ids, "input_ids")
    mask_shape = None if attention_mask is None else tuple(check.tensor(attention_mask, "attention_mask").shape)
    if mask_shape is not None and mask_shape != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if jacobian not in ("vjp", "jvp"):
        raise ValueError(f"jacobian must be 'vjp' or 'jvp', got {jacobian!r}")
    ref = layers.resolve(model, layer)
    B, T = input_ids.shape
    if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
        raise ValueError(f"position must be an int in [-{T}, {T}) for input_ids of length {T}, got {position!r}")
    vocab = model.get_output_embeddings().weight.shape[0]
    m = _checks.targets_and_delta(targets, delta, B, vocab)
    check.token_range(input_ids, torch.ones_like(input_ids, dtype=torch.bool), vocab, "input_ids")
    max_iter = _checks.solver_options(lam, tol, max_iter, newton_steps, gain_tol, max_step, m)
    device = check.same_device({"input_ids": input_ids, "targets": targets, "delta": delta,
                                "model": next(model.parameters())})
    position %= T
    with eager_attention(model), torch.no_grad():
        captured = {}
        handle = layers.read_hook(model, ref, lambda h: captured.__setitem__("h", h[:, position]))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
    hidden = captured["h"].float()
    with eager_attention(model), torch.no_grad():  # torch.func's vjp/jvp still differentiate inside
        problem = LayerProblem(model, ref, input_ids, attention_mask, position, targets.long().to(device), jacobian)
        options = GaussNewtonOptions(lam=float(lam), tol=float(tol), max_iter=max_iter, newton_steps=int(newton_steps),
                                     gain_tol=float(gain_tol), max_step=float(max_step), cg_backend="reference")
        return gauss_newton(problem, hidden, targets.long(), delta.double(), options)
