"""Steering the output of any transformer block of a Hugging Face causal LM (science.md: "Steering an
earlier layer needs the Jacobian through the remaining blocks").

The perturbation is added to block ``layer``'s output at one position by a forward hook, and the
targets' log p at the last position is differentiated with torch.func through the whole forward: the
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


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks: the ModuleList whose length is config.num_hidden_layers
    (GPT-2's ``transformer.h``, Llama's ``model.layers``, ...)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (a ModuleList of "
                     f"config.num_hidden_layers = {n} modules)")


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
    """log p of the targets at the last position as a function of a perturbation of block ``block``'s
    output at ``position``."""

    def __init__(self, model, block: nn.Module, input_ids, attention_mask, position: int, targets: Tensor,
                 jacobian: str):
        self.model, self.block, self.input_ids, self.mask = model, block, input_ids, attention_mask
        self.position, self.targets, self.mode = position, targets, jacobian
        self._delta: Optional[Tensor] = None

    def _hook(self, module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        at = torch.zeros(hidden.shape[1], 1, dtype=hidden.dtype, device=hidden.device)
        at[self.position] = 1.0
        hidden = hidden + at * self._delta.to(hidden.dtype)[:, None, :]  # out of place: torch.func traces it
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def log_prob(self, delta_h: Tensor) -> Tensor:
        """[B, m] float32 log p of the targets with ``delta_h`` [B, d] added; differentiable in delta_h."""
        self._delta = delta_h
        handle = self.block.register_forward_hook(self._hook)
        try:
            logits = self.model(input_ids=self.input_ids, attention_mask=self.mask, use_cache=False).logits[:, -1]
        finally:
            handle.remove()
            self._delta = None
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


def steer_layer(model: nn.Module, input_ids: Tensor, layer: int, targets: Tensor, delta: Tensor, *,
                position: int = -1, attention_mask: Optional[Tensor] = None, lam: float = 0.0, tol: float = 1e-4,
                max_iter: Optional[int] = None, newton_steps: int = 5, gain_tol: float = 1e-3,
                max_step: float = 0.25, jacobian: str = "vjp") -> SteerResult:
    """The smallest perturbation of block ``layer``'s output at ``position`` that raises log p of the
    targets at the last position by ``delta``; same solver and diagnostics as :func:`mppm_ext.steer_step`.

    Args:
        model: a Hugging Face causal LM (anything whose forward takes input_ids / attention_mask and
            returns ``.logits``, with a ModuleList of ``config.num_hidden_layers`` blocks). Run in float32
            or float64 for meaningful derivatives.
        input_ids: ``[B, T]`` int64 prompt.
        layer: block index, negative counts from the end (-1: the last block's output, before the final norm).
        targets, delta: ``[B, m]`` target ids and wanted log-p gains at the last position.
        position: the position whose state is perturbed (negative counts from the end; -1 by default).
        attention_mask: optional ``[B, T]`` (left padding keeps the last position real).
        jacobian: "vjp" (m backward passes per Gauss-Newton step) or "jvp" (d forward-mode passes).
        lam, tol, max_iter, newton_steps, gain_tol, max_step: as in :func:`mppm_ext.steer_step`.

    Returns:
        :class:`mppm_ext.steering.SteerResult`; ``delta_h`` is ``[B, d]`` float32.
    """
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
    blocks = decoder_blocks(model)
    n = len(blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer must be an int in [-{n}, {n}) for this model's {n} blocks, got {layer!r}")
    B, T = input_ids.shape
    if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
        raise ValueError(f"position must be an int in [-{T}, {T}) for input_ids of length {T}, got {position!r}")
    vocab = model.get_output_embeddings().weight.shape[0]
    m = _checks.targets_and_delta(targets, delta, B, vocab)
    check.token_range(input_ids, torch.ones_like(input_ids, dtype=torch.bool), vocab, "input_ids")
    max_iter = _checks.solver_options(lam, tol, max_iter, newton_steps, gain_tol, max_step, m)
    device = check.same_device({"input_ids": input_ids, "targets": targets, "delta": delta,
                                "model": next(model.parameters())})
    block = blocks[layer % n]
    position %= T
    with eager_attention(model), torch.no_grad():
        captured = {}

        def capture(module, inputs, output):  # returns None: the output is left as it is
            captured["h"] = (output[0] if isinstance(output, tuple) else output)[:, position]

        handle = block.register_forward_hook(capture)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
    hidden = captured["h"].float()
    with eager_attention(model), torch.no_grad():  # torch.func's vjp/jvp still differentiate inside
        problem = LayerProblem(model, block, input_ids, attention_mask, position, targets.long().to(device), jacobian)
        options = GaussNewtonOptions(lam=float(lam), tol=float(tol), max_iter=max_iter, newton_steps=int(newton_steps),
                                     gain_tol=float(gain_tol), max_step=float(max_step), cg_backend="reference")
        return gauss_newton(problem, hidden, targets.long(), delta.double(), options)
