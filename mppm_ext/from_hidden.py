"""``energy_from_hidden``: the outputs of :func:`mppm_ext.energy` from the hidden states and the
unembedding, streaming over the vocabulary (mppm_ext.streaming) so that the ``[B, T, V]`` logits never
exist in memory."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validate as check
from ._autocast import no_autocast
from . import streaming
from ._dispatch import backend_reasons, choose
from .kinetic import kinetic
from .parts import DEFINED_LOG_PROB, Parts, defined_bits, finish, real_tokens
from .results import EnergyResult


def energy_from_hidden(hidden: Tensor, weight: Tensor, tokens: Tensor, *, labels: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, norm: Optional[Callable[[Tensor], Tensor]] = None,
                       kinetic_state: str = "post", attention_mask: Optional[Tensor] = None,
                       ignore_index: int = -100, temperature: float = 1.0, impl: str = "auto",
                       logits_dtype: Optional[torch.dtype] = None) -> EnergyResult:
    """Every output of :func:`mppm_ext.energy`, from the hidden states and the unembedding instead of the
    logits: ``logits = norm(hidden) @ weight.T + bias`` is formed one tile at a time and folded into an
    online softmax, so nothing of size ``[B, T, V]`` is ever allocated (extra memory O(B*T*d) plus a
    tile; see mppm_ext.streaming), in the forward or the backward.

    Which state is ``hidden``:
        * ``norm=None`` (default): ``hidden`` is the state that feeds the unembedding, i.e. AFTER the
          model's final norm (layer ``"final"`` of mppm_ext.models.layers; for most Hugging Face models
          ``output.hidden_states[-1]``). The kinetic energy uses this state.
        * ``norm=module``: ``hidden`` is the state BEFORE the final norm (layer -1) and ``norm(hidden)`` is
          called once, as given (its dtype and device), to get the logits. ``kinetic_state`` picks the
          state of the kinetic energy: ``"post"`` (default, ``norm(hidden)``) or ``"pre"`` (``hidden``).

    Args:
        hidden: ``[B, T, d]`` or ``[T, d]``; float32, bfloat16 or float16 (float64 with
            ``impl="reference"``).
        weight: ``[V, d]`` unembedding (``lm_head.weight``), same dtype rules; may differ from hidden's.
        tokens: ``[B, T]`` or ``[T]`` int64/int32, the input ids.
        labels: optional ``[B, T]`` targets (default: ``tokens``); ``log_prob[:, t]`` scores
            ``labels[:, t+1]``; ``ignore_index`` there drops only that prediction.
        bias: ``[V]`` or None; -inf entries are legal (tokens that can never be predicted).
        norm: a callable ``[B, T, d] -> [B, T, d]`` (the model's final RMSNorm/LayerNorm) or None.
        kinetic_state: ``"post"`` or ``"pre"`` (``"pre"`` needs ``norm``).
        attention_mask, ignore_index, temperature: as in :func:`mppm_ext.energy`.
        impl: ``"auto"`` (cuda → triton → cpp → reference) or one backend by name; selects the backend of
            the streaming pass (the kinetic part is a few torch ops on every backend).
        logits_dtype: ``None`` (default): every logit is formed in float32 from the operands, whatever
            their dtype (float32 rounding only, the float32 reference's precision). ``torch.bfloat16`` or
            ``torch.float16``, when ``norm(hidden)``, ``weight`` and ``bias`` all have that dtype: each
            tile is their product in that dtype (float32 accumulation, the result rounded to 16 bits, as
            an eager 16-bit ``lm_head`` and the eager reference give it), widened to float32 for the
            softmax. On CPUs with AVX512-BF16 this product is several times faster than the float32 one
            (see the README's bench table). The rounding moves each logit by up to 2^-8 of its size in
            bf16 (2^-11 in fp16). Not with ``impl="triton"`` (its logits never leave float32 registers).

    Returns:
        :class:`mppm_ext.EnergyResult`, float32, as :func:`mppm_ext.energy` (log-probs accumulated in
        float64 from float32 logit tiles, kinetic energy in float64). Differentiable in ``hidden``,
        ``weight``, ``bias`` and through ``norm``.

    Raises:
        TypeError: a non-tensor argument, an unsupported dtype, or a norm that is not callable.
        ValueError: mismatched shapes, sequences shorter than 3 tokens, a token or label id outside
            ``[0, V)``, tensors on different devices, a bad temperature, NaN or inf in a used hidden state
            (naming batch and position), NaN or +inf in weight or bias, a logit that overflows, or a row
            whose logits are all -inf.
        BackendUnavailableError: ``impl`` names a backend that cannot run these inputs.
    """
    args = check.energy_from_hidden_inputs(hidden, weight, tokens, bias, norm, kinetic_state, attention_mask,
                                           labels, temperature)
    hidden, device = args.hidden, args.device
    logits_dtype = check.logits_dtype(logits_dtype, weight=weight, bias=bias,
                                      **({"hidden": hidden} if norm is None else {}))
    impl = choose("energy_from_hidden", impl, backend_reasons(device, impl, logits_dtype))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    B, T, _ = hidden.shape
    if not check.has_data(hidden):  # meta tensors: shapes only
        result = finish(Parts(torch.empty(4, B, T, dtype=torch.float64, device=device),
                              torch.empty(B, T, dtype=torch.uint8, device=device)))
    else:
        # Under autocast the tiles would come out 16-bit; the pass forms them in float32 itself.
        with no_autocast(device):
            result = _energy_from_hidden(args, weight, bias, norm, kinetic_state, ignore_index, impl, logits_dtype)
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result


def _energy_from_hidden(args, weight, bias, norm, kinetic_state, ignore_index, impl, logits_dtype) -> EnergyResult:
    hidden, tokens, labels, mask = args.hidden, args.tokens, args.labels, args.mask
    real = real_tokens(tokens, mask, ignore_index)
    scored = real_tokens(labels, mask, ignore_index)
    bits = defined_bits(real, scored)
    post = hidden if norm is None else norm(hidden)
    if norm is not None and (not isinstance(post, Tensor) or post.shape != hidden.shape):
        raise ValueError(f"norm(hidden) must return a tensor of hidden's shape {tuple(hidden.shape)}, got "
                         f"{tuple(post.shape) if isinstance(post, Tensor) else type(post).__name__}")
    if norm is not None:
        check.logits_dtype(logits_dtype, **{"norm(hidden)": post})
    B, T, d = hidden.shape
    V = weight.shape[0]
    has_lp = (bits & DEFINED_LOG_PROB) != 0
    # Every position goes through the pass (entropy and logsumexp are wanted at every real state), the
    # positions that are not real as zero rows: selecting the real rows would read the mask back to the
    # host (a synchronisation) for what is, in scans and batches, a few padded positions' worth of GEMM.
    rows = torch.where(real.unsqueeze(-1), post, 0).reshape(-1, d)
    next_label = torch.zeros_like(labels)
    next_label[:, :-1] = labels[:, 1:]
    targets = torch.where(has_lp, next_label, 0).long().clamp(0, V - 1).reshape(-1)
    r = streaming.log_prob_pass(impl, rows, weight, bias, targets.contiguous(), args.inv_temperature, logits_dtype)
    kin = kinetic(hidden if kinetic_state == "pre" else post, real)
    planes = torch.stack([r.log_prob.view(B, T), kin, r.entropy.view(B, T), r.logsumexp.view(B, T)])

    # Every data check of the call in one read-back: ids, the states some output reads, bias, the logits.
    used = bits != 0
    none = torch.zeros((), dtype=torch.bool, device=hidden.device)
    target_ok = torch.zeros_like(has_lp)
    target_ok[:, 1:] = has_lp[:, :-1]
    bad_rows = real & r.bad.view(B, T)
    faults = torch.stack([
        (real & ((tokens < 0) | (tokens >= V))).any(),
        (target_ok & ((labels < 0) | (labels >= V))).any(),
        (used & ~torch.isfinite(hidden).all(-1)).any(),
        (used & ~torch.isfinite(post).all(-1)).any() if norm is not None else none,
        (bias.isnan() | (bias == float("inf"))).any() if bias is not None else none,
        bad_rows.any(),
        (real & ~r.bad.view(B, T) & (r.logsumexp.view(B, T) == float("-inf"))).any(),
    ])
    if bool(faults.any()):
        _raise_first(faults.tolist(), args, real, target_ok, used, post, bias, weight, bad_rows,
                     r.logsumexp.view(B, T))
    return finish(Parts(planes, bits))


def _raise_first(faults, args, real, target_ok, used, post, bias, weight, bad_rows, lse) -> None:
    """The error path: name the first fault, in the order ids, labels, hidden, norm(hidden), bias, logits."""
    token_bad, label_bad, hidden_bad, post_bad, bias_bad, logits_bad, _ = faults
    V = weight.shape[0]
    if token_bad:
        check.token_range(args.tokens, real, V)
    if label_bad:
        check.token_range(args.labels, target_ok, V, "labels")
    if hidden_bad:
        check.finite_rows(args.hidden, used, "hidden")
    if post_bad:
        check.finite_rows(post, used, "norm(hidden)")
    if bias_bad:
        raise ValueError("bias holds NaN or +inf (-inf entries are legal: tokens that are never predicted)")
    if logits_bad:
        # The states were finite, so a non-finite logit comes from weight or is a float32 overflow.
        check.finite(weight, "weight")
        b, t = bad_rows.nonzero()[0].tolist()
        raise ValueError(f"the logits at batch {b}, position {t} overflow float32 (hidden or weight too large)")
    b, t = (real & (lse == float("-inf"))).nonzero()[0].tolist()
    raise ValueError(f"the logits at batch {b}, position {t} have no finite entry (every one is -inf)")
