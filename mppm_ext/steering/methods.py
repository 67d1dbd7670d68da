"""The steering methods of ``mppm steer-bench``, each as a hook or a delta function of
:func:`mppm_ext.steering.generate.steered_generate` (docs/steer-eval/README.md has their definitions).

- ``logit_bias``: ``b`` nats added to the logit of every target token at each generated step
  (:class:`LogitBias`, a forward hook on the LM head that edits the newest position's logits only);
- ``jacobian_final``: the minimal-norm δ of :func:`mppm_ext.steer_step` at the state that feeds the LM head,
  raising log p of every target token by the gain ``g`` (:class:`generate.FinalStateSteerer`);
- ``jacobian_mid``: the same at a middle layer, with :func:`mppm_ext.steering.steer_layer`
  (:class:`generate.LayerSteerer`; autograd through the remaining blocks, one prompt at a time);
- ``actadd``: ``s · ||h_t|| · u`` at a middle layer, ``u`` the unit difference of the states of one contrastive
  prompt pair at their last token (:class:`FixedDirection`);
- ``caa``: the same with ``u`` the unit mean difference over all of a concept's pairs.

Every method edits the newest position only, at each forward call of the generation: the last prompt
position (which predicts the first generated token) and then each generated token's position. So every
position that predicts a generated token is steered once, and no prompt position before the last is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .generate import StepContext, StepDelta, _left_padded, _positions, _unsteered, no_steering, steered_generate

#: name -> (where it acts, what its strength means, the accepted (low, high] range of strengths).
KINDS = {
    "logit_bias": ("logits", "nats added to each target logit", (0.0, 50.0)),
    "jacobian_final": ("final", "asked log-p gain of each target token per step (nats)", (0.0, 20.0)),
    "jacobian_mid": ("mid", "asked log-p gain of each target token per step (nats)", (0.0, 20.0)),
    "actadd": ("mid", "||delta|| / ||h|| (multiple of the steered state's own norm)", (0.0, 20.0)),
    "caa": ("mid", "||delta|| / ||h|| (multiple of the steered state's own norm)", (0.0, 20.0)),
}


@dataclass(frozen=True)
class Method:
    """One method of the benchmark: ``name`` (a key of :data:`KINDS`), the resolved ``layer`` it edits
    ("logits", "final" or an int state index) and its strengths in increasing order."""

    name: str
    layer: object
    strengths: tuple

    @property
    def unit(self) -> str:
        return KINDS[self.name][1]


def make_method(name: str, strengths: Sequence[float], mid_layer: int) -> Method:
    """A checked :class:`Method`. ValueError naming the method for an unknown name, an empty grid, or a
    strength that is not a finite number inside its range (:data:`KINDS`)."""
    if name not in KINDS:
        raise ValueError(f"unknown steering method {name!r}; expected one of {sorted(KINDS)}")
    site, _, (low, high) = KINDS[name]
    values = []
    for s in strengths:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not low < s <= high:
            raise ValueError(f"strengths of {name}: each must be a number in ({low:g}, {high:g}] "
                             f"({KINDS[name][1]}), got {s!r}")
        values.append(float(s))
    if not values:
        raise ValueError(f"strengths of {name}: give at least one strength")
    return Method(name, mid_layer if site == "mid" else site, tuple(sorted(set(values))))


class LogitBias:
    """Context manager: while active, a forward hook on the model's LM head adds ``bias`` nats to the
    logits of each row's target tokens at the newest position (the one generation reads); the other
    positions' logits are left as they are. A forward call over another number of rows than
    ``row_targets`` has (the shared prompt prefix of :func:`steered_generate`, one row per distinct prompt,
    whose logits nothing reads) passes unchanged.

    Args:
        model: a Hugging Face causal LM; row_targets: per batch row ``[m_b]`` int64 target ids;
        bias: the nats added (float).
    """

    def __init__(self, model: nn.Module, row_targets: Sequence[Tensor], bias: float):
        head = model.get_output_embeddings()
        self.head = head
        add = torch.zeros(len(row_targets), head.weight.shape[0], dtype=torch.float32)
        for i, t in enumerate(row_targets):
            add[i, t] = float(bias)
        self.add = add.to(head.weight.device)

    def _hook(self, module, args, output: Tensor) -> Optional[Tensor]:
        if output.shape[0] != self.add.shape[0]:
            return None
        out = output.clone()
        out[:, -1] += self.add.to(out.dtype)
        return out

    def __enter__(self) -> "LogitBias":
        self._handle = self.head.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class FixedDirection:
    """Delta function: ``δ = strength · ||h|| · u`` for each row's unit direction ``u`` (``[B, d]``), ``h``
    the steered layer's state at the newest position, so ``||δ|| / ||h|| = strength`` at every step."""

    def __init__(self, directions: Tensor, strength: float):
        self.directions = torch.nn.functional.normalize(directions.double(), dim=-1)
        self.strength = float(strength)

    def __call__(self, ctx: StepContext) -> StepDelta:
        out = _unsteered(ctx.state)
        scale = self.strength * ctx.state.double().norm(dim=-1, keepdim=True)
        out.delta[:] = (scale * self.directions.to(ctx.state.device)).to(ctx.state.dtype)
        return out


@torch.no_grad()
def last_token_states(model: nn.Module, tokenizer, texts: Sequence[str], layer) -> Tensor:
    """``[N, d]`` float64 states of ``layer`` at the last token of each text (one left-padded batch, position
    ids that ignore the padding)."""
    from ..models import layers

    device = next(model.parameters()).device
    with _left_padded(tokenizer):
        enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    seen = {}
    handle = layers.read_hook(model, layer, lambda h: seen.__setitem__("h", h[:, -1].double()))
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    finally:
        handle.remove()
    return seen["h"].cpu()


def contrast_directions(model: nn.Module, tokenizer, concepts, layer) -> dict:
    """Per concept, the ActAdd and CAA directions at ``layer`` (``[C, d]`` float64, not normalised):
    ``actadd`` = h(positive) − h(negative) of the first pair, ``caa`` = the mean of that difference over all
    pairs, h the state at the pair sentence's last token. Also ``state_norm`` ``[C]``, the mean ||h|| of the
    positive sentences (for the report: how long the raw differences are next to the states)."""
    texts, owner = [], []
    for c, concept in enumerate(concepts):
        for pos, neg in concept.pairs:
            texts += [pos, neg]
            owner.append(c)
    h = last_token_states(model, tokenizer, texts, layer)
    diff = h[0::2] - h[1::2]
    owner = torch.tensor(owner)
    first = torch.tensor([int((owner == c).nonzero()[0]) for c in range(len(concepts))])
    caa = torch.stack([diff[owner == c].mean(0) for c in range(len(concepts))])
    norm = torch.stack([h[0::2][owner == c].norm(dim=-1).mean() for c in range(len(concepts))])
    return dict(actadd=diff[first], caa=caa, state_norm=norm)


def generate(model: nn.Module, tokenizer, method: Method, strength: float, prompts: Sequence[str],
             row_targets: Sequence[Tensor], directions: Optional[Tensor] = None, *, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0, use_cache: bool = True,
             solver_options: Optional[dict] = None):
    """One generation of ``prompts`` under ``method`` at ``strength`` (row i steered towards
    ``row_targets[i]``; ``directions`` ``[B, d]`` for actadd / caa). Returns the
    :class:`~mppm_ext.steering.generate.GenerationResult`; its target log-probabilities are always
    recorded (from the logits generation used)."""
    targets = [t.tolist() for t in row_targets]
    common = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, seed=seed,
                  use_cache=use_cache)
    if method.name == "logit_bias":
        with LogitBias(model, row_targets, strength):
            return steered_generate(model, tokenizer, prompts, targets, delta_fn=no_steering, **common)
    if method.name in ("jacobian_final", "jacobian_mid"):
        return steered_generate(model, tokenizer, prompts, targets, gain=strength, layer=method.layer,
                                solver_options=solver_options, **common)
    if directions is None:
        raise ValueError(f"{method.name} needs one direction per prompt")
    return steered_generate(model, tokenizer, prompts, targets, layer=method.layer,
                            delta_fn=FixedDirection(directions, strength), **common)


__all__ = ["KINDS", "Method", "make_method", "LogitBias", "FixedDirection", "last_token_states",
           "contrast_directions", "generate"]
