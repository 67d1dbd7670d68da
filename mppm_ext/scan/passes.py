"""One batch through one model: capture the states, then the energy's two parts (log p_t, K_t) and the
predictive entropy H_t for the base state and for every state-variant control. Everything else is derived from the parts later.

The base state (layer "final": after the final norm, the one that feeds the unembedding) goes through the fused op
``mppm_ext.energy_from_hidden``, so the forward pass stops before the unembedding and the logits are never
stored. The variants only change the state that moves, not the prediction, so they reuse the base log p and
entropy and need one O(B*T*d) kinetic pass each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

import mppm_ext
from mppm_ext.kinetic import kinetic

from .token_mean import TokenMeans
from .windows import Batch

if TYPE_CHECKING:  # mppm_ext.models needs the optional transformers: imported where a model is at hand
    from mppm_ext.models.layers import LayerRef

BASE = "base"
PRE_NORM = "pre_norm"
TOKEN_MEAN = "token_mean"
SHUFFLED = "shuffled"


#: A layer spec that means the middle of each model, state L // 2 (the output of the (L // 2)-th block), so
#: that one scan compares models of different depths at the same relative depth.
MID = "mid"
#: The pre-norm control's state: the last block's output (see mppm_ext.models.layers).
PRE_NORM_LAYER = -1


def layer_variant(layer) -> str:
    return f"layer_{layer}"


def resolve_layer(model: torch.nn.Module, spec) -> LayerRef:
    """A ``--layers`` spec (a layer as :mod:`mppm_ext.models.layers` numbers them, or MID) -> its LayerRef
    for ``model``; ValueError naming ``layers`` and the valid values otherwise."""
    from mppm_ext.models import anatomy, layers

    n = len(anatomy.blocks(model))
    try:
        return layers.resolve(model, n // 2 if spec == MID else spec)
    except ValueError:
        raise ValueError(f"layers holds {spec!r}; each must be {MID!r} or {layers.valid_range(n)}") from None


@dataclass(frozen=True)
class StatePlan:
    """Which states besides the base one (``"final"``) each forward pass must provide. ``layers``: (variant
    name, LayerRef) pairs; ``pre_norm``: also the pre-norm state (layer -1)."""

    layers: tuple[tuple[str, LayerRef], ...] = ()
    pre_norm: bool = False
    token_means: Optional[TokenMeans] = None


@dataclass
class BatchParts:
    """Per variant, ``(log_prob, kinetic, entropy)`` float64 [B, T] on CPU, NaN where undefined (the entropy
    H_t of the prediction of token t, defined where log p_t is)."""

    parts: dict[str, tuple[Tensor, Tensor, Tensor]]
    forward_s: float
    energy_s: float


@dataclass
class ModelHandle:
    """What a pass needs from a loaded model (``mppm_ext.models.LoadedModel``), resolved once."""

    model: torch.nn.Module
    weight: Tensor
    bias: Optional[Tensor]
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelHandle":
        from mppm_ext import models

        weight, bias = models.unembedding(model)
        return cls(model=model, weight=weight, bias=bias, device=weight.device)


def _sync(device: torch.device) -> None:
    # Host clocks around asynchronous CUDA work would time the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_states(handle: ModelHandle, batch: Batch, plan: StatePlan):
    """Forward pass up to the unembedding: (state "final", state -1 or None, {variant: layer state}), layers
    as :mod:`mppm_ext.models.layers` numbers them."""
    from mppm_ext import models
    from mppm_ext.models.layers import FINAL

    ids, mask = batch.ids.to(handle.device), batch.mask.to(handle.device)
    # One forward gives the base state and every other one, also where the final chain is more than a norm
    # (OPT's project_out), so the pre-norm state -1 is not the base state.
    pre_layer = (PRE_NORM_LAYER,) if plan.pre_norm else ()
    refs = tuple(ref for _, ref in plan.layers)
    cap = models.capture(handle.model, ids, mask, layers=(FINAL,) + pre_layer + refs, logits=False)
    pre = cap.hidden[PRE_NORM_LAYER] if plan.pre_norm else None
    return cap.hidden[FINAL], pre, {name: cap.hidden[ref] for name, ref in plan.layers}


def batch_parts(handle: ModelHandle, batch: Batch, plan: StatePlan) -> BatchParts:
    """Capture one batch and compute each variant's parts (see module docstring)."""
    start = time.perf_counter()
    post, pre, layers = capture_states(handle, batch, plan)
    _sync(handle.device)
    forward_s = time.perf_counter() - start

    start = time.perf_counter()
    ids, mask = batch.ids.to(handle.device), batch.mask.to(handle.device)
    with torch.no_grad():
        base = mppm_ext.energy_from_hidden(post, handle.weight, ids, bias=handle.bias, attention_mask=mask)
        log_prob = base.log_prob.double().cpu()
        entropy = base.entropy.double().cpu()
        parts = {BASE: (log_prob, base.kinetic.double().cpu(), entropy)}
        real = mask != 0

        def moved(state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return log_prob, kinetic(state.to(real.device), real).cpu(), entropy

        if pre is not None:
            parts[PRE_NORM] = moved(pre)
        for name, state in layers.items():
            parts[name] = moved(state)
        if plan.token_means is not None:
            parts[TOKEN_MEAN] = moved(plan.token_means.subtract(post.cpu(), batch.ids))
    _sync(handle.device)
    return BatchParts(parts=parts, forward_s=forward_s, energy_s=time.perf_counter() - start)
