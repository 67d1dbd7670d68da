"""``energy``: every output from the hidden states and the logits. Validates its arguments and picks the
backend once; each backend produces the parts (:mod:`mppm_ext.parts`) and the compiled finish does the
rest (the fused ``cpp`` / ``cuda`` kernels run the same finish inside their one call)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as validate
from ._autocast import no_autocast
from ._dispatch import backend_reasons, choose
from .parts import DEFINED_LOG_PROB, Parts, defined_bits, finish, real_tokens
from .results import EnergyResult, unpack_energy


def energy(hidden: Tensor, logits: Tensor, tokens: Tensor, *, labels: Optional[Tensor] = None,
           attention_mask: Optional[Tensor] = None, ignore_index: int = -100, temperature: float = 1.0,
           impl: str = "auto", check: bool = True) -> EnergyResult:
    """Kinetic energy, point perplexity, entropy and the energies built from them, per token and per
    sequence.

    Each logits row is read once (online softmax: max, sum of exponentials and the entropy's sum, target
    gather; fp32 accumulation); nothing of size ``[B, T, V]`` is allocated by the kernels, in the forward
    or the backward (which reads each row once more).

    Args:
        hidden: ``[B, T, d]`` or ``[T, d]``; float32, bfloat16 or float16. The state that feeds the
            unembedding (Hugging Face: ``hidden_states[-1]``; layer ``"final"`` of mppm_ext.models.layers).
        logits: ``[B, T, V]`` or ``[T, V]``; float32, bfloat16 or float16 (may differ from hidden's).
            ``logits[:, t]`` predicts the target at t+1. -inf entries are legal (probability 0).
        tokens: ``[B, T]`` or ``[T]``; int64 or int32, the input ids.
        labels: optional ``[B, T]`` (or ``[T]``) int targets, default ``tokens``: ``log_prob[:, t]`` scores
            ``labels[:, t+1]``, and ``ignore_index`` in labels drops only that prediction (Hugging Face's
            ``labels`` with -100 on the prompt: the first completion token is still scored from the last
            prompt state).
        attention_mask: optional ``[B, T]`` bool or integer; zero marks padding (neither a state nor a
            target).
        ignore_index: in ``tokens``, a position that is not a real state; in ``labels``, a target that is
            not scored.
        temperature: > 0; the logits are divided by it inside the kernel (log_prob, entropy and
            logsumexp are of softmax(logits / temperature)).
        impl: ``"auto"`` (cuda → triton → cpp → reference), or one backend by name (``"triton"``
            runs CPU tensors only in Triton's interpreter, for tests; ``"auto"`` skips that). float64 inputs
            run only with ``"reference"``, which upcasts 16-bit inputs to float32. The environment variable
            ``MPPM_EXT_IMPL`` overrides ``"auto"``.
        check: look for bad data (ids outside the vocabulary, NaN or +inf in a used logits row or hidden
            state, a used logits row without a finite entry) and raise ValueError for the first one. The
            kernels find these while they read, and reading their finding back is the call's one host
            synchronisation. With ``check=False`` nothing is read back: bad data gives NaN or otherwise
            unspecified outputs at the positions concerned and in the statistics of their sequences
            (the fused ``cpp`` / ``cuda`` kernels make every per-token output of a faulty position NaN and
            leave the other sequences exactly as a clean call would), never an exception, and on CUDA the
            call can be captured in a CUDA graph. The arguments' types, shapes and devices are checked
            either way; good data gives bitwise the same results either way.

    Returns:
        :class:`mppm_ext.EnergyResult` with float32 ``[B, T]`` tensors (``[T]`` for unbatched input)
        and per-sequence statistics; differentiable in ``hidden`` and ``logits`` on every backend.

    Raises:
        TypeError: a non-tensor argument, or an unsupported dtype.
        ValueError: mismatched shapes, sequences shorter than 3 tokens, tensors on different devices, a bad
            temperature; with ``check`` also a token or label id outside ``[0, V)``, NaN or +inf in a
            logits row or a hidden state that is used, or a logits row that is used and has no finite entry.
        BackendUnavailableError: ``impl`` names a backend that cannot run these inputs.
    """
    args = validate.energy_inputs(hidden, logits, tokens, attention_mask, labels, temperature)
    hidden, logits = args.hidden, args.logits
    impl = choose("energy", impl, backend_reasons(args.device, impl))
    validate.float_dtypes(impl == "reference", hidden=hidden, logits=logits)
    # Under autocast the inputs arrive as the caller made them; every backend accumulates in float32.
    with no_autocast(args.device):
        if impl in ("cpp", "cuda"):
            # The fused kernels check ids and NaN/inf themselves, while reading, into their fault word.
            out = _fused(args, ignore_index)
            if check:
                validate.fused_fault(out[5], args.tokens, args.labels, args.logits.shape[-1])
            result = unpack_energy(*out[:4])
        else:
            real = real_tokens(args.tokens, args.mask, ignore_index)
            scored = real_tokens(args.labels, args.mask, ignore_index)
            result = finish(_parts(impl, args, real, scored, check))
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result


def _fused(args, ignore_index):
    from .ops import energy_op

    return energy_op(validate.unit_last_stride(args.hidden), validate.unit_last_stride(args.logits), args.tokens,
                     args.labels, args.mask, ignore_index, args.inv_temperature)


def _parts(impl: str, args, real: Tensor, scored: Tensor, check_data: bool) -> Parts:
    """The parts by the ``reference`` or ``triton`` backend. Ids are clamped into the vocabulary for the
    computation and, with ``check_data``, every data check (ids, NaN/inf, rows without a finite logit) is
    read back once, after it; a fault raises with the fused kernels' messages."""
    hidden, logits, tokens, labels = args.hidden, args.logits, args.tokens, args.labels
    V = logits.shape[-1]
    safe = labels.clamp(0, V - 1)
    if impl == "reference":
        from . import _reference_backend

        parts = _reference_backend.energy_parts(hidden, logits, safe, real, scored, args.inv_temperature)
    else:
        defined = defined_bits(real, scored)
        planes = _TritonParts.apply(validate.unit_last_stride(hidden), validate.unit_last_stride(logits), tokens, safe,
                                    real, scored, defined, args.inv_temperature)
        parts = Parts(planes, defined)
    if not check_data:
        return parts
    target = torch.zeros_like(real)
    target[:, 1:] = (parts.defined[:, :-1] & DEFINED_LOG_PROB) != 0
    faults = [(real & ((tokens < 0) | (tokens >= V))).any(), (target & ((labels < 0) | (labels >= V))).any(),
              *validate.non_finite_parts(parts)]
    if bool(torch.stack(faults).any()):
        validate.token_range(tokens, real, V)
        validate.token_range(labels, target, V, "labels")
        validate.finite_parts(parts)
    return parts


class _TritonParts(torch.autograd.Function):
    """The Triton parts kernel with the backward every logits path shares (:func:`_grad.logits_parts_vjp`)."""

    @staticmethod
    def forward(ctx, hidden, logits, tokens, labels, real, scored, defined, inv_temperature):
        from .triton.energy import energy_parts

        planes = energy_parts(hidden, logits, tokens, labels, real, scored, inv_temperature)
        ctx.save_for_backward(hidden, logits, labels, defined, planes)
        ctx.inv_temperature = inv_temperature
        return planes

    @staticmethod
    def backward(ctx, g_planes):
        from ._grad import logits_parts_vjp

        hidden, logits, labels, defined, planes = ctx.saved_tensors
        g_hidden, g_logits = logits_parts_vjp(hidden, logits, labels, defined, planes, ctx.inv_temperature,
                                              g_planes, ctx.needs_input_grad[:2])
        return g_hidden, g_logits, None, None, None, None, None, None


__all__ = ["energy"]
