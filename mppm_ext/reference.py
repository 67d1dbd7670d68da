"""Plain-PyTorch definitions of every quantity mppm_ext computes: the specification the kernels must
match (docs/definitions.md). Written for clarity, not speed: it materialises ``[B, T, V]``
log-probabilities. Computes in the dtype it is given; the tests call it in float64 for the truth.

Shapes: hidden ``[B, T, d]``, logits ``[B, T, V]``, tokens and labels ``[B, T]`` (int), attention_mask
``[B, T]``. ``temperature`` divides the logits before every softmax quantity. A logit of -inf is legal
(that vocabulary entry has probability 0).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .results import STAT_QUANTITIES, EnergyResult, EnergyStats

#: corr(log K, s) is NaN when either part's std is below this fraction of its mean (kFlatRelativeStd in
#: csrc/include/mppm/energy_math.h): sum/n need not reproduce a constant exactly.
FLAT_RELATIVE_STD = 1e-12


def real_tokens(tokens: Tensor, attention_mask: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """``[B, T]`` bool: state t is real (mask nonzero and ``tokens[t]`` not ``ignore_index``)."""
    real = tokens != ignore_index
    if attention_mask is not None:
        real = real & (attention_mask != 0)
    return real


def scored_targets(tokens: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                   ignore_index: int = -100) -> Tensor:
    """``[B, T]`` bool: token t is a scored target (mask nonzero and ``labels[t]`` not ``ignore_index``;
    without labels, the tokens are the labels and this is :func:`real_tokens`)."""
    return real_tokens(tokens if labels is None else labels, attention_mask, ignore_index)


def _nan_like(x: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))


def token_log_prob(logits: Tensor, targets: Tensor, real: Tensor, scored: Optional[Tensor] = None,
                   temperature: float = 1.0) -> Tensor:
    """``[B, T]``: log softmax(z_t / temperature)[targets[t+1]] where state t is real and target t+1 is
    scored (``scored`` defaults to ``real``), NaN elsewhere; -inf where that target's logit is -inf."""
    scored = real if scored is None else scored
    log_probs = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    defined = real[:, :-1] & scored[:, 1:]
    picked = log_probs.gather(-1, torch.where(defined, targets[:, 1:], 0).long().unsqueeze(-1)).squeeze(-1)
    out = _nan_like(logits[..., 0])
    out[:, :-1] = torch.where(defined, picked, float("nan"))
    return out


def entropy_logsumexp(logits: Tensor, real: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """``([B, T], [B, T])``: the entropy -sum p log p of softmax(z_t / temperature) (entries of
    probability 0 add 0) and logsumexp(z_t / temperature), at every real state t; NaN elsewhere."""
    z = logits / temperature
    lse = torch.logsumexp(z, dim=-1)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    # -sum p log p over the entries with p > 0 (log p is replaced by 0 elsewhere *before* the product, so
    # that neither the value nor the gradient meets 0 * -inf). Summing the terms p log p keeps a nearly
    # one-hot row's tiny entropy exact, where lse - sum p z would cancel it to 0.
    entropy = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    return torch.where(real, entropy, float("nan")), torch.where(real, lse, float("nan"))


def kinetic(hidden: Tensor, real: Tensor) -> Tensor:
    """``[B, T]``: K_t = ½‖h_t − h_{t−1}‖² where tokens t−1 and t are real, NaN elsewhere."""
    velocity = hidden[:, 1:] - hidden[:, :-1]
    k = 0.5 * (velocity * velocity).sum(-1)
    defined = real[:, 1:] & real[:, :-1]
    out = _nan_like(hidden[..., 0])
    out[:, 1:] = torch.where(defined, k, float("nan"))
    return out


def token_quantities(log_prob: Tensor, kin: Tensor, entropy: Optional[Tensor] = None,
                     logsumexp: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Every per-token quantity from log p_t and K_t, with the entropy and logsumexp riding along (NaN
    when not given) (docs/definitions.md)."""
    valid = ~log_prob.isnan() & ~kin.isnan()
    surprisal = -log_prob
    log_kinetic = torch.log(kin)

    def where_valid(x: Tensor) -> Tensor:
        return torch.where(valid, x, float("nan"))

    return {
        "log_prob": log_prob,
        "surprisal": surprisal,
        "kinetic": kin,
        "log_kinetic": log_kinetic,
        "energy": where_valid(kin * torch.exp(surprisal)),
        "log_energy": where_valid(log_kinetic + surprisal),
        "additive_energy": where_valid(kin + log_prob),
        "log_lagrangian": where_valid(log_kinetic - surprisal),
        "entropy": _nan_like(log_prob) if entropy is None else entropy,
        "logsumexp": _nan_like(log_prob) if logsumexp is None else logsumexp,
        "valid": valid,
    }


def sequence_stats(q: dict[str, Tensor]) -> EnergyStats:
    """Per-sequence mean, population std, CV and corr(log K, s) over the valid positions with K > 0."""
    used = q["valid"] & (q["kinetic"] > 0)
    zero = q["valid"] & (q["kinetic"] == 0)
    count = used.sum(-1)
    n = count.to(q["kinetic"].dtype)
    values = {name: q[name] for name in STAT_QUANTITIES if name != "ppl"}
    values["ppl"] = torch.exp(q["surprisal"])
    mean, std, cv, centred = {}, {}, {}, {}
    for name, x in values.items():
        x = torch.where(used, x, 0.0)
        mean[name] = x.sum(-1) / n
        centred[name] = torch.where(used, x - mean[name].unsqueeze(-1), 0.0)
        std[name] = torch.sqrt((centred[name] ** 2).sum(-1) / n)
        cv[name] = std[name] / mean[name].abs()
    cross = (centred["log_kinetic"] * centred["surprisal"]).sum(-1)
    corr = cross / torch.sqrt((centred["log_kinetic"] ** 2).sum(-1) * (centred["surprisal"] ** 2).sum(-1))
    # A part that is constant up to the rounding of its mean correlates with nothing.
    flat = torch.zeros_like(count, dtype=torch.bool)
    for name in ("log_kinetic", "surprisal"):
        flat |= (centred[name] ** 2).sum(-1) <= n * (FLAT_RELATIVE_STD * mean[name]) ** 2
    corr = torch.where(flat, float("nan"), corr)
    return EnergyStats(count=count, zero_kinetic=zero.sum(-1), mean=mean, std=std, cv=cv,
                       corr_log_kinetic_surprisal=corr)


def energy_from_parts(log_prob: Tensor, kin: Tensor, entropy: Optional[Tensor] = None,
                      logsumexp: Optional[Tensor] = None) -> EnergyResult:
    """Every output of :func:`mppm_ext.energy` from its parts, ``[B, T]`` log p_t and K_t (and the entropy
    and logsumexp, NaN when not given) with NaN where undefined (as :func:`token_log_prob`,
    :func:`kinetic` and :func:`entropy_logsumexp` give them); results in their dtype."""
    q = token_quantities(log_prob, kin, entropy, logsumexp)
    return EnergyResult(**q, stats=sequence_stats(q))


def energy(hidden: Tensor, logits: Tensor, tokens: Tensor, *, labels: Optional[Tensor] = None,
           attention_mask: Optional[Tensor] = None, ignore_index: int = -100,
           temperature: float = 1.0) -> EnergyResult:
    """Reference for :func:`mppm_ext.energy` on batched inputs; results in the inputs' dtypes."""
    real = real_tokens(tokens, attention_mask, ignore_index)
    scored = scored_targets(tokens, labels, attention_mask, ignore_index)
    targets = tokens if labels is None else labels
    entropy, lse = entropy_logsumexp(logits, real, temperature)
    return energy_from_parts(token_log_prob(logits, targets, real, scored, temperature), kinetic(hidden, real),
                             entropy, lse)


def steer_jacobian(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                   norm=None) -> Tensor:
    """``[B, m, d]``: J rows d log softmax(norm(h) W^T + b)[y_i] / dh by autograd, one row of the batch
    at a time (materialises the ``[V]`` logits; for tests). Computes in hidden's dtype."""
    rows = []
    for b in range(hidden.shape[0]):
        def log_p(h, b=b):
            x = h if norm is None else norm(h)
            z = x @ weight.T.to(x.dtype) + (0.0 if bias is None else bias.to(x.dtype))
            return torch.log_softmax(z, dim=-1)[targets[b]]

        # vectorize: the m backward passes run as one batched pass (the same products, m times fewer
        # reads of W).
        rows.append(torch.autograd.functional.jacobian(log_p, hidden[b], vectorize=True))
    return torch.stack(rows)


def steer_direction(hidden: Tensor, weight: Tensor, targets: Tensor, delta: Tensor, bias: Optional[Tensor] = None,
                    lam: float = 0.0, norm=None) -> Tensor:
    """Reference for one linear steering step of :func:`mppm_ext.steer_step` (``newton_steps=1``):
    ``delta_h = J^T (J J^T + lam I)^+ delta`` per row, J from :func:`steer_jacobian` in hidden's dtype,
    the solve with a float64 pseudo-inverse. Shapes: hidden ``[B, d]``, weight ``[V, d]``, targets and
    delta ``[B, m]``; returns ``[B, d]`` float64."""
    J = steer_jacobian(hidden, weight, targets, bias, norm).double()
    eye = torch.eye(J.shape[1], dtype=torch.float64, device=J.device)
    A = J @ J.transpose(1, 2) + lam * eye
    u = torch.linalg.pinv(A, hermitian=True) @ delta.double().unsqueeze(-1)
    return (J.transpose(1, 2) @ u).squeeze(-1)


def energy_from_hidden(hidden: Tensor, weight: Tensor, tokens: Tensor, *, labels: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, norm: Optional[Callable[[Tensor], Tensor]] = None,
                       kinetic_state: str = "post", attention_mask: Optional[Tensor] = None,
                       ignore_index: int = -100, temperature: float = 1.0) -> EnergyResult:
    """Reference for :func:`mppm_ext.energy_from_hidden` on batched inputs: the full logits
    ``norm(hidden) @ weight.T + bias``, then :func:`energy` on the post-norm states (or on ``hidden``,
    the pre-norm states, with ``kinetic_state="pre"``). Results in the inputs' dtype."""
    post = hidden if norm is None else norm(hidden)
    logits = post @ weight.T
    if bias is not None:
        logits = logits + bias
    states = hidden if kinetic_state == "pre" else post
    return energy(states, logits, tokens, labels=labels, attention_mask=attention_mask, ignore_index=ignore_index,
                  temperature=temperature)
