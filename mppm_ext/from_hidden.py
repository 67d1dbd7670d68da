"""``energy_from_hidden``: the outputs of :func:`mppm_ext.energy` from the hidden states and the
unembedding, streaming over the vocabulary (mppm_ext.streaming) so that the ``[B, T, V]`` logits never
exist in memory."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validate as check
from . import streaming
from ._dispatch import backend_reasons, choose
from .kinetic import kinetic
from .parts import DEFINED_LOG_PROB, Parts, defined_bits, finish, real_tokens
from .results import EnergyResult


def energy_from_hidden(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = None,
                       norm: Optional[Callable[[Tensor], Tensor]] = None, kinetic_state: str = "post",
                       attention_mask: Optional[Tensor] = None, ignore_index: int = -100,
                       impl: str = "auto") -> EnergyResult:
    """Every output of :func:`mppm_ext.energy`, from the hidden states and the unembedding instead of the
    logits: ``logits = norm(hidden) @ weight.T + bias`` is formed one tile at a time and folded into an
    online logsumexp, so nothing of size ``[B, T, V]`` is ever allocated (extra memory O(B*T*d) plus a
    tile; see mppm_ext.streaming).

    Which state is ``hidden``:
        * ``norm=None`` (default): ``hidden`` is the state that feeds the unembedding, i.e. AFTER the
          model's final norm. For most Hugging Face models this is ``output.hidden_states[-1]`` (the
          final norm is applied before it is recorded). The kinetic energy uses this state.
        * ``norm=module``: ``hidden`` is the state BEFORE the final norm (e.g. the residual stream of the
          last block) and ``norm(hidden)`` is called once, as given (its dtype, its device, no grad), to
          get the logits. ``kinetic_state`` picks the state of the kinetic energy: ``"post"`` (default,
          ``norm(hidden)``, the same as ``energy(norm(hidden), logits, tokens)``) or ``"pre"``
          (``hidden``).

    Args:
        hidden: ``[B, T, d]`` or ``[T, d]``; float32, bfloat16 or float16 (float64 with
            ``impl="reference"``).
        weight: ``[V, d]`` unembedding (``lm_head.weight``), same dtype rules; may differ from hidden's.
        tokens: ``[B, T]`` or ``[T]`` int64/int32; ``logits[:, t]`` scores ``tokens[:, t+1]``.
        bias: ``[V]`` or None.
        norm: a callable ``[B, T, d] -> [B, T, d]`` (the model's final RMSNorm/LayerNorm) or None.
        kinetic_state: ``"post"`` or ``"pre"`` (``"pre"`` needs ``norm``).
        attention_mask, ignore_index: as in :func:`mppm_ext.energy`.
        impl: ``"auto"`` (cuda → triton → cpp → reference) or one backend by name; selects the backend of
            the streaming pass (the kinetic part is a few torch ops on every backend).

    Returns:
        :class:`mppm_ext.EnergyResult`, float32, as :func:`mppm_ext.energy` (log-probs accumulated in
        float64 from float32 logit tiles, kinetic energy in float64).

    Raises:
        TypeError: a non-tensor argument, an unsupported dtype, or a norm that is not callable.
        ValueError: mismatched shapes, sequences shorter than 3 tokens, a token id outside ``[0, V)``,
            tensors on different devices, NaN or inf in a used hidden state (naming batch and position),
            in weight or bias, or in a logit (overflow).
        BackendUnavailableError: ``impl`` names a backend that cannot run these inputs.
    """
    args = check.energy_from_hidden_inputs(hidden, weight, tokens, bias, norm, kinetic_state, attention_mask)
    hidden, tokens, device = args.hidden, args.tokens, args.device
    impl = choose("energy_from_hidden", impl, backend_reasons(device, impl))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    B, T, _ = hidden.shape
    if not check.has_data(hidden):  # meta tensors: shapes only
        result = finish(Parts(torch.empty(4, B, T, dtype=torch.float64, device=device),
                              torch.empty(B, T, dtype=torch.uint8, device=device)))
    else:
        with torch.no_grad():
            result = _energy_from_hidden(hidden, weight, tokens, bias, norm, kinetic_state, args.mask,
                                         ignore_index, impl)
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result


def _energy_from_hidden(hidden, weight, tokens, bias, norm, kinetic_state, mask, ignore_index, impl) -> EnergyResult:
    real = real_tokens(tokens, mask, ignore_index)
    parts_bits = defined_bits(real)
    post = hidden if norm is None else norm(hidden)
    if norm is not None and (not isinstance(post, Tensor) or post.shape != hidden.shape):
        raise ValueError(f"norm(hidden) must return a tensor of hidden's shape {tuple(hidden.shape)}, got "
                         f"{tuple(post.shape) if isinstance(post, Tensor) else type(post).__name__}")
    B, T, d = hidden.shape
    V = weight.shape[0]
    scored = (parts_bits[:, :-1] & DEFINED_LOG_PROB) != 0  # [B, T-1]
    # Every position goes through the pass, the ones that are not scored as zero rows with target 0:
    # selecting the scored rows would read the mask back to the host (a synchronisation) for what is,
    # in scans and batches, a few padded positions' worth of GEMM.
    rows = torch.where(scored.unsqueeze(-1), post[:, :-1], 0).reshape(-1, d)
    targets = torch.where(scored, tokens[:, 1:], 0).long().clamp(0, V - 1).reshape(-1)
    picked, bad_rows = streaming.log_prob_pass(impl, rows, weight, bias, targets.contiguous())
    log_prob = torch.zeros(B, T, dtype=torch.float64, device=hidden.device)
    log_prob[:, :-1] = picked.view(B, T - 1)
    kin = kinetic(hidden if kinetic_state == "pre" else post, real)

    # Every data check of the call in one read-back: ids, the states some output reads, bias, the logits.
    used = parts_bits != 0  # the states some output reads: a scored position or either end of a step
    faults = torch.stack([
        (real & ((tokens < 0) | (tokens >= V))).any(),
        (used & ~torch.isfinite(hidden).all(-1)).any(),
        (used & ~torch.isfinite(post).all(-1)).any() if norm is not None else torch.zeros((), dtype=torch.bool,
                                                                                           device=hidden.device),
        ~torch.isfinite(bias).all() if bias is not None else torch.zeros((), dtype=torch.bool, device=hidden.device),
        (scored & bad_rows.view(B, T - 1)).any(),
    ])
    if bool(faults.any()):
        _raise_first(faults.tolist(), tokens, real, used, hidden, post, bias, weight, scored, bad_rows.view(B, T - 1))
    return finish(Parts.of(log_prob, kin, real))


def _raise_first(faults, tokens, real, used, hidden, post, bias, weight, scored, bad_rows) -> None:
    """The error path: name the first fault, in the order ids, hidden, norm(hidden), bias, logits."""
    token_bad, hidden_bad, post_bad, bias_bad, _ = faults
    if token_bad:
        check.token_range(tokens, real, weight.shape[0])
    if hidden_bad:
        check.finite_rows(hidden, used, "hidden")
    if bias_bad:
        check.finite(bias, "bias")
    if post_bad:
        check.finite_rows(post, used, "norm(hidden)")
    # The states were finite, so a non-finite logit comes from weight or is a float32 overflow.
    check.finite(weight, "weight")
    b, t = (scored & bad_rows).nonzero()[0].tolist()
    raise ValueError(f"the logits at batch {b}, position {t} overflow float32 (hidden or weight too large)")
