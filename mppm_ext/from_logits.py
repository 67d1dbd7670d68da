"""``energy``: every output from the hidden states and the logits. Validates its arguments and picks the
backend once; each backend produces the parts (:mod:`mppm_ext.parts`) and the compiled finish does the
rest (the fused ``cpp`` / ``cuda`` kernels run the same finish inside their one call)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _validate as check
from ._dispatch import backend_reasons, choose
from .parts import DEFINED_LOG_PROB, Parts, finish, real_tokens
from .results import EnergyResult, unpack_energy


def energy(hidden: Tensor, logits: Tensor, tokens: Tensor, *, attention_mask: Optional[Tensor] = None,
           ignore_index: int = -100, impl: str = "auto") -> EnergyResult:
    """Kinetic energy, point perplexity and the energies built from them, per token and per sequence.

    Each logits row is read once (online logsumexp + target gather, fp32 accumulation); nothing of
    size ``[B, T, V]`` is allocated by the kernels.

    Args:
        hidden: ``[B, T, d]`` or ``[T, d]``; float32, bfloat16 or float16. The state that feeds the
            unembedding (Hugging Face: ``hidden_states[-1]``; layer ``"final"`` of mppm_ext.models.layers).
        logits: ``[B, T, V]`` or ``[T, V]``; float32, bfloat16 or float16 (may differ from hidden's).
            ``logits[:, t]`` predicts token t+1.
        tokens: ``[B, T]`` or ``[T]``; int64 or int32 token ids.
        attention_mask: optional ``[B, T]`` bool or integer; zero marks padding.
        ignore_index: token id that marks a position as not real (as in cross-entropy labels).
        impl: ``"auto"`` (cuda → triton → cpp → reference), or one backend by name (``"triton"``
            runs CPU tensors only in Triton's interpreter, for tests; ``"auto"`` skips that). float64 inputs
            run only with ``"reference"``. The environment variable ``MPPM_EXT_IMPL`` overrides
            ``"auto"``.

    Returns:
        :class:`mppm_ext.EnergyResult` with float32 ``[B, T]`` tensors (``[T]`` for unbatched input)
        and per-sequence statistics.

    Raises:
        TypeError: a non-tensor argument, or an unsupported dtype.
        ValueError: mismatched shapes, sequences shorter than 3 tokens, a token id outside
            ``[0, V)``, tensors on different devices, NaN or inf in a used logits row or hidden state.
        BackendUnavailableError: ``impl`` names a backend that cannot run these inputs.
    """
    args = check.energy_inputs(hidden, logits, tokens, attention_mask)
    hidden, logits, tokens, mask = args.hidden, args.logits, args.tokens, args.mask
    impl = choose("energy", impl, backend_reasons(args.device, impl))
    check.float_dtypes(impl == "reference", hidden=hidden, logits=logits)
    if impl in ("cpp", "cuda"):
        # The fused kernels check token ids and NaN/inf themselves, while reading (one sync on CUDA).
        result = unpack_energy(*_fused(hidden, logits, tokens, mask, ignore_index))
    else:
        result = finish(_parts(impl, hidden, logits, tokens, real_tokens(tokens, mask, ignore_index)))
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result


def _fused(hidden, logits, tokens, mask, ignore_index):
    from .ops import energy_op

    return energy_op(check.unit_last_stride(hidden), check.unit_last_stride(logits), tokens, tokens, mask, ignore_index,
                     1.0)


def _parts(impl: str, hidden: Tensor, logits: Tensor, tokens: Tensor, real: Tensor) -> Parts:
    """The parts by the ``reference`` or ``triton`` backend. Token ids are clamped into the vocabulary for
    the computation and every data check (ids, NaN/inf in a used row) is read back once, after it; a fault
    raises with the fused kernels' messages."""
    V = logits.shape[-1]
    safe = tokens.clamp(0, V - 1)
    if impl == "reference":
        from . import _reference_backend

        parts = _reference_backend.energy_parts(hidden, logits, safe, real)
    else:
        from .triton.energy import energy_parts

        log_prob, kinetic = energy_parts(check.unit_last_stride(hidden), check.unit_last_stride(logits), safe, real)
        parts = Parts.of(log_prob, kinetic, real)
    scored = (parts.defined & DEFINED_LOG_PROB) != 0
    faults = [(real & ((tokens < 0) | (tokens >= V))).any(), *check.non_finite_parts(parts)]
    if impl == "reference":  # the fused kernels reject any non-finite logit of a scored row, -inf included
        faults.append((scored & ~torch.isfinite(logits).all(-1)).any())
    if bool(torch.stack(faults).any()):
        check.token_range(tokens, real, V)
        if impl == "reference":
            check.finite_rows(logits, scored, "logits", "in the row")
        check.finite_parts(parts)
    return parts


__all__ = ["energy"]
