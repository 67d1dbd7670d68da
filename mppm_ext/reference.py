"""Plain-PyTorch definitions of every quantity mppm_ext computes: the specification the kernels must
match (docs/definitions.md). Written for clarity, not speed: it materialises ``[B, T, V]``
log-probabilities. Computes in the dtype it is given; the tests call it in float64 for the truth.

Shapes: hidden ``[B, T, d]``, logits ``[B, T, V]``, tokens ``[B, T]`` (int), attention_mask ``[B, T]``.
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
    """``[B, T]`` bool: token t takes part (mask nonzero and not ``ignore_index``)."""
    real = tokens != ignore_index
    if attention_mask is not None:
        real = real & (attention_mask != 0)
    return real


def _nan_like(x: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))


def token_log_prob(logits: Tensor, tokens: Tensor, real: Tensor) -> Tensor:
    """``[B, T]``: log softmax(z_t)[x_{t+1}] where tokens t and t+1 are real, NaN elsewhere."""
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = torch.where(real[:, 1:], tokens[:, 1:], 0).long()
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    defined = real[:, :-1] & real[:, 1:]
    out = _nan_like(logits[..., 0])
    out[:, :-1] = torch.where(defined, picked, float("nan"))
    return out


def kinetic(hidden: Tensor, real: Tensor) -> Tensor:
    """``[B, T]``: K_t = ½‖h_t − h_{t−1}‖² where tokens t−1 and t are real, NaN elsewhere."""
    velocity = hidden[:, 1:] - hidden[:, :-1]
    k = 0.5 * (velocity * velocity).sum(-1)
    defined = real[:, 1:] & real[:, :-1]
    out = _nan_like(hidden[..., 0])
    out[:, 1:] = torch.where(defined, k, float("nan"))
    return out


def token_quantities(log_prob: Tensor, kin: Tensor) -> dict[str, Tensor]:
    """Every per-token quantity from log p_t and K_t (docs/definitions.md)."""
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


def energy_from_parts(log_prob: Tensor, kin: Tensor) -> EnergyResult:
    """Every output of :func:`mppm_ext.energy` from its two parts, ``[B, T]`` log p_t and K_t with NaN
    where undefined (as :func:`token_log_prob` and :func:`kinetic` give them); results in their dtype.

    Backends that produce the parts some other way (from hidden states and the unembedding, or with
    Triton) finish here in float64: the rest is O(B*T) work."""
    q = token_quantities(log_prob, kin)
    return EnergyResult(**q, stats=sequence_stats(q))


def energy(hidden: Tensor, logits: Tensor, tokens: Tensor, *, attention_mask: Optional[Tensor] = None,
           ignore_index: int = -100) -> EnergyResult:
    """Reference for :func:`mppm_ext.energy` on batched inputs; results in the inputs' dtypes."""
    real = real_tokens(tokens, attention_mask, ignore_index)
    return energy_from_parts(token_log_prob(logits, tokens, real), kinetic(hidden, real))


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


def energy_from_hidden(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = None,
                       norm: Optional[Callable[[Tensor], Tensor]] = None, kinetic_state: str = "post",
                       attention_mask: Optional[Tensor] = None, ignore_index: int = -100) -> EnergyResult:
    """Reference for :func:`mppm_ext.energy_from_hidden` on batched inputs: the full logits
    ``norm(hidden) @ weight.T + bias``, then :func:`energy` on the post-norm states (or on ``hidden``,
    the pre-norm states, with ``kinetic_state="pre"``). Results in the inputs' dtype."""
    post = hidden if norm is None else norm(hidden)
    logits = post @ weight.T
    if bias is not None:
        logits = logits + bias
    states = hidden if kinetic_state == "pre" else post
    return energy(states, logits, tokens, attention_mask=attention_mask, ignore_index=ignore_index)
