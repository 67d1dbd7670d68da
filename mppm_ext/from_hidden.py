"""``energy_from_hidden``: the outputs of :func:`mppm_ext.energy` from the hidden states and the
unembedding, streaming over the vocabulary (mppm_ext.streaming) so that the ``[B, T, V]`` logits never
exist in memory."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validate as check
from . import reference, streaming
from ._dispatch import backend_reasons, choose
from .results import EnergyResult, to_float32

#: Elements of one float64 block of state differences in the kinetic pass (16 MiB): the states are
#: differenced a few positions at a time instead of converting all of ``[B, T, d]`` to float64.
KINETIC_BLOCK = 1 << 21


def _kinetic(states: Tensor, real: Tensor) -> Tensor:
    """:func:`mppm_ext.reference.kinetic` in float64, a block of positions at a time."""
    B, T, d = states.shape
    out = torch.full((B, T), float("nan"), dtype=torch.float64, device=states.device)
    step = max(1, KINETIC_BLOCK // (B * d))
    for t0 in range(1, T, step):
        t1 = min(T, t0 + step)
        diff = states[:, t0:t1].double() - states[:, t0 - 1:t1 - 1].double()
        out[:, t0:t1] = 0.5 * (diff * diff).sum(-1)
    out[:, 1:] = torch.where(real[:, 1:] & real[:, :-1], out[:, 1:], float("nan"))
    return out


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
        part = torch.empty(B, T, dtype=torch.float64, device=device)
        result = to_float32(reference.energy_from_parts(part, part))
    else:
        with torch.no_grad():
            result = _energy_from_hidden(hidden, weight, tokens, bias, norm, kinetic_state, args.mask,
                                         ignore_index, impl)
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result


def _energy_from_hidden(hidden, weight, tokens, bias, norm, kinetic_state, mask, ignore_index, impl) -> EnergyResult:
    real = reference.real_tokens(tokens, mask, ignore_index)
    check.token_range(tokens, real, weight.shape[0])
    scored, used = check.used_positions(real)
    check.finite_positions(hidden, used, "hidden")
    if bias is not None:
        check.finite(bias, "bias")
    post = hidden if norm is None else norm(hidden)
    if norm is not None:
        if not isinstance(post, Tensor) or post.shape != hidden.shape:
            raise ValueError(f"norm(hidden) must return a tensor of hidden's shape {tuple(hidden.shape)}, got "
                             f"{tuple(post.shape) if isinstance(post, Tensor) else type(post).__name__}")
        check.finite_positions(post, used, "norm(hidden)")

    log_prob = torch.full(tuple(tokens.shape), float("nan"), dtype=torch.float64, device=hidden.device)
    if bool(scored.any()):
        rows = post[:, :-1][scored]  # [N, d]: only the positions that are scored are multiplied
        targets = tokens[:, 1:][scored].long()
        # The states were checked above, so a non-finite logit comes from weight or is a float32 overflow.
        # weight is scanned only then: up front, its V*d elements cost about a third of a CPU call
        # (N = 512, V = 50257, d = 768), and the pass finds every non-finite logit anyway.
        try:
            picked = streaming.token_log_prob_from_hidden(rows, weight, bias, targets, impl=impl)
            bad_row = None if bool(torch.isfinite(picked).all()) else int((~torch.isfinite(picked)).nonzero()[0, 0])
        except streaming.NonFiniteLogitsError as exc:
            bad_row = exc.row
        if bad_row is not None:
            check.finite(weight, "weight")
            b, t = scored.nonzero()[bad_row].tolist()
            raise ValueError(f"the logits at batch {b}, position {t} overflow float32 (hidden or weight too large)")
        log_prob[:, :-1][scored] = picked
    kin = _kinetic(hidden if kinetic_state == "pre" else post, real)
    return to_float32(reference.energy_from_parts(log_prob, kin))
