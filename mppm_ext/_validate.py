"""Argument checks for the public API. Each failure names the argument and what was expected;
ValueError for wrong values and shapes, TypeError for wrong types and dtypes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_dtype(x: Tensor, name: str, allow_float64: bool) -> None:
    allowed = KERNEL_FLOAT_DTYPES + ((torch.float64,) if allow_float64 else ())
    if x.dtype not in allowed:
        hint = " (float64 runs only with impl='reference')" if x.dtype == torch.float64 else ""
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {list(allowed)}{hint}")


def logits_dtype(dtype, **named: Optional[Tensor]) -> Optional[torch.dtype]:
    """``logits_dtype`` of the streaming ops: None, or the 16-bit dtype every named tensor (None skipped)
    already has; TypeError naming the argument otherwise."""
    if dtype is None:
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"logits_dtype must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    wrong = [f"{name} is {t.dtype}" for name, t in named.items() if t is not None and t.dtype != dtype]
    if wrong:
        raise TypeError(f"logits_dtype={dtype} rounds the product of {dtype} operands, but {', '.join(wrong)} "
                        "(convert them, or leave logits_dtype=None for float32 logits)")
    return dtype


def index_dtype(x: Tensor, name: str) -> None:
    if x.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must hold token ids as int32 or int64, got dtype {x.dtype}")


def same_device(named: dict[str, Optional[Tensor]]) -> torch.device:
    devices = {name: t.device for name, t in named.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    return first


def has_data(x: Tensor) -> bool:
    """False for meta tensors, whose values cannot be checked."""
    return x.device.type != "meta"


def finite(x: Tensor, name: str) -> None:
    if has_data(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf")


def token_range(tokens: Tensor, real: Tensor, vocab: int, name: str = "tokens") -> None:
    """Every real token id lies in [0, vocab)."""
    if not has_data(tokens):
        return
    bad = real & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(_out_of_vocabulary(name, where, int(tokens[tuple(where)]), vocab))


def _out_of_vocabulary(name: str, where: list[int], value: int, vocab: int) -> str:
    return f"{name}{where} = {value} is outside the vocabulary [0, {vocab})"


def unit_last_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension is contiguous (what the kernels stream over), else a copy."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def finite_rows(x: Tensor, rows: Tensor, name: str, what: str = "", extra: str = "") -> None:
    """The rows of ``x`` ([B, T, n], or [B, T] values) selected by the bool ``rows`` ([B, T]) hold no NaN or
    inf; the message names the first offending (batch, position), as the compiled kernels do."""
    first_at(rows & ~torch.isfinite(x).all(-1), name, what, extra)


def first_at(bad: Tensor, name: str, what: str = "", extra: str = "") -> None:
    """Raise ValueError naming the first (batch, position) where the ``[B, T]`` bool ``bad`` holds."""
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} holds NaN or inf {what + ' ' if what else ''}at batch {b}, position {t}{extra}")


#: The message of each data fault, by the names of the compiled module's ENERGY_FAULTS; every backend raises
#: these words (the id faults' wording is :func:`token_range`'s).
DATA_FAULTS = {
    "non_finite_logits": "logits holds NaN or inf in the row at batch {b}, position {t}",
    "no_finite_logit": "logits row at batch {b}, position {t} has no finite entry",
    "non_finite_hidden": "hidden holds NaN or inf in the step into at batch {b}, position {t} (the state there or "
                         "one position before)",
}
_ID_FAULTS = {"token_out_of_range": "tokens", "label_out_of_range": "labels"}


def fused_fault(fault: Tensor, tokens: Tensor, labels: Tensor, vocab: int) -> None:
    """Raise ValueError for the fault word of the fused ``energy`` op (``mppm_ext.ops.energy_op``'s last
    output: -1, or the first faulty position ``b * T + t`` shifted by ENERGY_FAULT_BITS, or-ed with the kind),
    with the message every backend gives. Reading the word is the public call's one host synchronisation."""
    if not has_data(fault):
        return
    word = int(fault[0])
    if word < 0:
        return
    from ._dispatch import compiled

    c = compiled()
    kind = c.ENERGY_FAULTS[word & ((1 << c.ENERGY_FAULT_BITS) - 1)]
    b, t = divmod(word >> c.ENERGY_FAULT_BITS, tokens.shape[1])
    if kind in _ID_FAULTS:
        name = _ID_FAULTS[kind]
        ids = tokens if name == "tokens" else labels
        raise ValueError(_out_of_vocabulary(name, [b, t], int(ids[b, t]), vocab))
    raise ValueError(DATA_FAULTS[kind].format(b=b, t=t))


def _part_faults(parts) -> list[tuple[Tensor, str]]:
    """(``[B, T]`` bool, message template) for each way a part can be wrong, in the order the fused kernels
    report them: a read logits row with NaN or +inf (its logsumexp is NaN or +inf), a read row with no
    finite logit (logsumexp -inf), a step whose states hold NaN or inf (K not finite)."""
    from .parts import DEFINED_KINETIC, DEFINED_STATE

    state = (parts.defined & DEFINED_STATE) != 0
    lse, kinetic = parts.planes[3], parts.planes[1]
    return [
        (state & (lse.isnan() | (lse == float("inf"))), DATA_FAULTS["non_finite_logits"]),
        (state & (lse == float("-inf")), DATA_FAULTS["no_finite_logit"]),
        (((parts.defined & DEFINED_KINETIC) != 0) & ~torch.isfinite(kinetic), DATA_FAULTS["non_finite_hidden"]),
    ]


def non_finite_parts(parts) -> list[Tensor]:
    """0-d bool tensors (on the parts' device, not read back), one per fault of :func:`finite_parts`."""
    return [bad.any() for bad, _ in _part_faults(parts)]


def finite_parts(parts) -> None:
    """Raise for a part that shows bad data (NaN/+inf in a read logits row, a row without a finite logit,
    NaN/inf in a state of a step), with the messages of the compiled kernels; ``parts`` is a
    :class:`mppm_ext.parts.Parts`."""
    for bad, message in _part_faults(parts):
        if bool(bad.any()):
            b, t = bad.nonzero()[0].tolist()
            raise ValueError(message.format(b=b, t=t))


@dataclass(frozen=True)
class EnergyInputs:
    """The arguments of :func:`mppm_ext.energy`, checked and batched."""

    hidden: Tensor  # [B, T, d]
    logits: Tensor  # [B, T, V]
    tokens: Tensor  # [B, T]
    labels: Tensor  # [B, T]: the tokens themselves when the caller gave none
    mask: Optional[Tensor]  # [B, T]
    unbatched: bool  # the caller passed [T, ...] tensors
    device: torch.device
    inv_temperature: float


def temperature(x) -> float:
    """``temperature`` is a finite real number > 0; returns 1 / temperature (what the kernels multiply by)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(x).__name__}")
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {x}")
    return 1.0 / float(x)


def labels_like(labels, tokens: Tensor, unbatched: bool) -> Tensor:
    """``labels`` (None: the tokens) as a batched ``[B, T]`` int tensor of the tokens' shape and device."""
    if labels is None:
        return tokens
    labels = tensor(labels, "labels")
    batched = labels.unsqueeze(0) if unbatched and labels.dim() == 1 else labels
    if tuple(batched.shape) != tuple(tokens.shape):
        raise ValueError(f"labels must have the shape of tokens {tuple(tokens.shape[unbatched:])}, got "
                         f"{tuple(labels.shape)}")
    index_dtype(batched, "labels")
    return batched


def _mask_layout(tokens: Tensor, mask: Optional[Tensor]) -> None:
    """attention_mask has the shape of tokens and an integer or bool dtype."""
    if mask is not None and mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    if mask is not None and (mask.is_floating_point() or mask.is_complex()):
        raise TypeError(f"attention_mask must be bool or integer, got dtype {mask.dtype}")


def _sequence_sizes(B: int, T: int) -> None:
    """B >= 1 sequences of T >= 3 tokens (shared by energy and energy_from_hidden)."""
    if B == 0:
        raise ValueError("the batch is empty (B = 0)")
    if T < 3:
        raise ValueError(f"sequences need at least 3 tokens (an energy pairs the step into t with the "
                         f"surprisal of token t+1), got length {T}")


def energy_inputs(hidden, logits, tokens, attention_mask, labels=None, temperature_=1.0) -> EnergyInputs:
    """Types, ranks, shapes, devices and the token dtype of energy's arguments (dtypes of the floating
    tensors depend on the backend and are checked after it is chosen)."""
    hidden, logits, tokens = tensor(hidden, "hidden"), tensor(logits, "logits"), tensor(tokens, "tokens")
    mask = None if attention_mask is None else tensor(attention_mask, "attention_mask")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, d] or [T, d], got shape {tuple(hidden.shape)}")
    unbatched = hidden.dim() == 2
    if logits.dim() != hidden.dim() or tokens.dim() != hidden.dim() - 1:
        layout = "[T, ...]" if unbatched else "[B, T, ...]"
        raise ValueError(
            f"with hidden of shape {tuple(hidden.shape)} ({layout}), logits must have {hidden.dim()} dimensions "
            f"and tokens {hidden.dim() - 1}; got logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}")
    _mask_layout(tokens, mask)
    if unbatched:
        hidden, logits, tokens = hidden.unsqueeze(0), logits.unsqueeze(0), tokens.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    B, T, d = hidden.shape
    V = logits.shape[-1]
    if tuple(logits.shape[:2]) != (B, T) or tuple(tokens.shape) != (B, T):
        raise ValueError(f"hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)} and tokens "
                         f"{tuple(tokens.shape)} must agree on batch and length")
    _sequence_sizes(B, T)
    if d == 0 or V == 0:
        raise ValueError(f"hidden size d and vocabulary V must be >= 1, got d={d}, V={V}")
    index_dtype(tokens, "tokens")
    labels = labels_like(labels, tokens, unbatched)
    device = same_device({"hidden": hidden, "logits": logits, "tokens": tokens, "labels": labels,
                          "attention_mask": mask})
    return EnergyInputs(hidden, logits, tokens, labels, mask, unbatched, device, temperature(temperature_))


@dataclass(frozen=True)
class FromHiddenInputs:
    """The arguments of :func:`mppm_ext.energy_from_hidden`, checked and batched."""

    hidden: Tensor  # [B, T, d]
    tokens: Tensor  # [B, T]
    labels: Tensor  # [B, T]: the tokens themselves when the caller gave none
    mask: Optional[Tensor]  # [B, T]
    unbatched: bool
    device: torch.device
    inv_temperature: float


KINETIC_STATES = ("post", "pre")


def energy_from_hidden_inputs(hidden, weight, tokens, bias, norm, kinetic_state, attention_mask, labels=None,
                              temperature_=1.0) -> FromHiddenInputs:
    """Types, ranks, shapes, devices and the token dtype of energy_from_hidden's arguments."""
    hidden, tokens = tensor(hidden, "hidden"), tensor(tokens, "tokens")
    mask = None if attention_mask is None else tensor(attention_mask, "attention_mask")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, d] or [T, d], got shape {tuple(hidden.shape)}")
    unbatched = hidden.dim() == 2
    if tokens.dim() != hidden.dim() - 1:
        raise ValueError(f"with hidden of shape {tuple(hidden.shape)}, tokens must have {hidden.dim() - 1} "
                         f"dimensions; got {tuple(tokens.shape)}")
    _mask_layout(tokens, mask)
    if unbatched:
        hidden, tokens = hidden.unsqueeze(0), tokens.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if tuple(tokens.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden {tuple(hidden.shape)} and tokens {tuple(tokens.shape)} must agree on batch "
                         f"and length")
    _sequence_sizes(hidden.shape[0], hidden.shape[1])
    unembedding(weight, bias, hidden.shape[-1])
    if norm is not None and not callable(norm):
        raise TypeError(f"norm must be callable (e.g. the model's final norm module) or None, got "
                        f"{type(norm).__name__}")
    if kinetic_state not in KINETIC_STATES:
        raise ValueError(f"kinetic_state must be one of {KINETIC_STATES}, got {kinetic_state!r}")
    if kinetic_state == "pre" and norm is None:
        raise ValueError("kinetic_state='pre' needs norm: without it hidden is the post-norm state and the "
                         "pre-norm one is unknown")
    index_dtype(tokens, "tokens")
    labels = labels_like(labels, tokens, unbatched)
    device = same_device({"hidden": hidden, "weight": weight, "tokens": tokens, "labels": labels, "bias": bias,
                          "attention_mask": mask})
    inv_temperature = temperature(temperature_)
    return FromHiddenInputs(hidden, tokens, labels, mask, unbatched, device, inv_temperature)


def unembedding_inputs(hidden, weight, bias, rows: str) -> torch.device:
    """Types, ranks, shapes and devices of ``hidden [rows, d]``, ``weight [V, d]`` and ``bias [V]``
    (the streaming functions' arguments); returns their device."""
    hidden, weight = tensor(hidden, "hidden"), tensor(weight, "weight")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [{rows}, d], got shape {tuple(hidden.shape)}")
    unembedding(weight, bias, hidden.shape[-1])
    return same_device({"hidden": hidden, "weight": weight, "bias": bias})


def unembedding(weight, bias, d: int) -> None:
    """``weight`` is a ``[V, d]`` tensor with V, d >= 1 and ``bias`` None or ``[V]``."""
    tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight must be [V, d] with d = {d} (hidden's last dimension), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[0] == 0 or d == 0:
        raise ValueError(f"the vocabulary V and hidden size d must be >= 1, got weight {tuple(weight.shape)}")
    if bias is not None:
        tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")


def float_dtypes(allow_float64: bool, **named: Optional[Tensor]) -> None:
    """:func:`float_dtype` for every tensor given (None skipped)."""
    for name, t in named.items():
        if t is not None:
            float_dtype(t, name, allow_float64)
