"""One batch through one model: capture the states, then the energy's two parts (log p_t, K_t) for the
base state and for every state-variant control. Everything else is derived from the parts later.

The base state (final layer, post-norm: the one that feeds the unembedding) goes through the fused op
``mppm_ext.energy_from_hidden``, so the forward pass stops before the unembedding and the logits are never
stored. The variants only change the state that moves, not the prediction, so they reuse the base log p and
need one O(B*T*d) kinetic pass each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import mppm_ext
from mppm_ext import reference

from .token_mean import TokenMeans
from .windows import Batch

BASE = "base"
PRE_NORM = "pre_norm"
TOKEN_MEAN = "token_mean"
SHUFFLED = "shuffled"


#: A layer spec that means the middle block of each model (block L // 2), so that one scan compares models
#: of different depths at the same relative depth.
MID = "mid"


def layer_variant(layer) -> str:
    return f"layer_{layer}"


def resolve_layer(spec, num_blocks: int) -> int:
    """A layer spec (an int for ``mppm_ext.models.capture``, or MID) -> capture's layer index."""
    return num_blocks // 2 if spec == MID else int(spec)


@dataclass(frozen=True)
class StatePlan:
    """Which states besides the base one each forward pass must provide. ``layers``: (variant name,
    capture layer index) pairs."""

    layers: tuple[tuple[str, int], ...] = ()
    pre_norm: bool = False
    token_means: Optional[TokenMeans] = None


@dataclass
class BatchParts:
    """Per variant, ``(log_prob, kinetic)`` float64 [B, T] on CPU, NaN where undefined."""

    parts: dict[str, tuple[Tensor, Tensor]]
    forward_s: float
    energy_s: float


@dataclass
class ModelHandle:
    """What a pass needs from a loaded model (``mppm_ext.models.LoadedModel``), resolved once."""

    model: torch.nn.Module
    weight: Tensor
    bias: Optional[Tensor]
    num_blocks: int  # capture's layer index of the last block's output = the pre-norm state
    device: torch.device

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelHandle":
        from mppm_ext import models
        from mppm_ext.models import anatomy

        weight, bias = models.unembedding(model)
        return cls(model=model, weight=weight, bias=bias, num_blocks=len(anatomy.blocks(model)),
                   device=weight.device)


def _sync(device: torch.device) -> None:
    # Host clocks around asynchronous CUDA work would time the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_states(handle: ModelHandle, batch: Batch, plan: StatePlan):
    """Forward pass up to the unembedding: (post-norm final state, pre-norm final state or None,
    {variant: layer state})."""
    from mppm_ext import models

    ids, mask = batch.ids.to(handle.device), batch.mask.to(handle.device)
    # The pre-norm state is the last block's output (capture layer num_blocks), so one forward gives both it
    # and the post-norm state -1, also where the final chain is more than a norm (OPT's project_out).
    pre_layer = (handle.num_blocks,) if plan.pre_norm else ()
    indices = tuple(index for _, index in plan.layers)
    cap = models.capture(handle.model, ids, mask, layers=("final",) + pre_layer + indices, logits=False)
    pre = cap.hidden[handle.num_blocks] if plan.pre_norm else None
    return cap.hidden["final"], pre, {name: cap.hidden[index] for name, index in plan.layers}


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
        parts = {BASE: (log_prob, base.kinetic.double().cpu())}
        real = (mask != 0).cpu()

        def moved(state: Tensor) -> tuple[Tensor, Tensor]:
            return log_prob, reference.kinetic(state.double().cpu(), real)

        if pre is not None:
            parts[PRE_NORM] = moved(pre)
        for name, state in layers.items():
            parts[name] = moved(state)
        if plan.token_means is not None:
            parts[TOKEN_MEAN] = moved(plan.token_means.subtract(post.cpu(), batch.ids))
    _sync(handle.device)
    return BatchParts(parts=parts, forward_s=forward_s, energy_s=time.perf_counter() - start)
