"""torch.library registration of the compiled ops and the public functions that dispatch to them.

The compiled module never sees a torch.Tensor: each op's kernels turn their arguments into DLPack
views and call ``mppm_ext._C``; fake implementations give shapes to torch.compile and meta tensors."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from . import _validate as check
from . import reference
from ._dispatch import backend_reasons, choose, compiled
from .results import STAT_QUANTITIES, TOKEN_QUANTITIES, EnergyResult, to_float32, unpack_energy

_NUM_STAT_COLUMNS = 3 * len(STAT_QUANTITIES) + 1
_NUM_COUNT_COLUMNS = 2


def _view(t: Tensor):
    return to_dlpack(t.detach())


def _energy_outputs(tokens: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, T = tokens.shape
    return (
        torch.empty(len(TOKEN_QUANTITIES), B, T, dtype=torch.float32, device=device),
        torch.empty(B, T, dtype=torch.uint8, device=device),
        torch.empty(B, _NUM_STAT_COLUMNS, dtype=torch.float32, device=device),
        torch.empty(B, _NUM_COUNT_COLUMNS, dtype=torch.int64, device=device),
    )


def _launch_energy(hidden: Tensor, logits: Tensor, tokens: Tensor, mask: Optional[Tensor], ignore_index: int,
                   stream: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = _energy_outputs(tokens, hidden.device)
    if mask is not None and mask.dtype != torch.uint8:
        # A bool mask is reinterpreted in place; only other dtypes need a comparison pass.
        mask = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    per_token, defined, stats, counts = out
    compiled().energy(
        _view(hidden), _view(logits), _view(tokens), None if mask is None else _view(mask), int(ignore_index),
        _view(per_token), _view(defined), _view(stats), _view(counts),
        _view(torch.empty(2, *tokens.shape, dtype=torch.float64, device=hidden.device)),
        torch.get_num_threads(), stream,
    )
    return out


@torch.library.custom_op("mppm_ext::energy", mutates_args=(), device_types="cpu")
def energy_op(hidden: Tensor, logits: Tensor, tokens: Tensor, mask: Optional[Tensor],
              ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed fused energy: ``(per_token [8, B, T] f32, defined [B, T] u8, stats [B, 28] f32,
    counts [B, 2] i64)``; see :func:`mppm_ext.results.unpack_energy` for the layout."""
    return _launch_energy(hidden, logits, tokens, mask, ignore_index, stream=0)


@energy_op.register_kernel("cuda")
def _energy_cuda(hidden, logits, tokens, mask, ignore_index):
    stream = torch.cuda.current_stream(hidden.device).cuda_stream
    return _launch_energy(hidden, logits, tokens, mask, ignore_index, stream=stream)


@energy_op.register_fake
def _energy_fake(hidden, logits, tokens, mask, ignore_index):
    return _energy_outputs(tokens, hidden.device)


def _launch_softmax_tile(z, v0, run_max, run_sum, bad_col, targets, picked, alpha, stream: int) -> None:
    opt = [None if t is None else _view(t) for t in (targets, picked, alpha)]
    compiled().softmax_tile(_view(z), int(v0), _view(run_max), _view(run_sum), _view(bad_col), *opt,
                            torch.get_num_threads(), stream)


# The epilogue, not energy_from_hidden, is the custom op: the public function takes a Python callable
# (the model's final norm) and loops over tiles whose count depends on the shapes, neither of which a
# custom op's schema can carry; each tile's torch.mm is already an aten op that torch.compile sees.
@torch.library.custom_op("mppm_ext::softmax_tile", mutates_args=("z", "run_max", "run_sum", "bad_col", "picked",
                                                                  "alpha"), device_types="cpu")
def softmax_tile_op(z: Tensor, v0: int, run_max: Tensor, run_sum: Tensor, bad_col: Tensor, targets: Optional[Tensor],
                    picked: Optional[Tensor], alpha: Optional[Tensor]) -> None:
    """Fold one float32 logits tile ``z [R, C]`` (vocabulary entries ``v0 .. v0+C-1``) into the per-row
    online softmax state; see csrc/include/mppm/softmax_tile.h and mppm_ext.streaming."""
    _launch_softmax_tile(z, v0, run_max, run_sum, bad_col, targets, picked, alpha, stream=0)


@softmax_tile_op.register_kernel("cuda")
def _softmax_tile_cuda(z, v0, run_max, run_sum, bad_col, targets, picked, alpha):
    stream = torch.cuda.current_stream(z.device).cuda_stream
    _launch_softmax_tile(z, v0, run_max, run_sum, bad_col, targets, picked, alpha, stream=stream)


@softmax_tile_op.register_fake
def _softmax_tile_fake(z, v0, run_max, run_sum, bad_col, targets, picked, alpha):
    return None


def energy(hidden: Tensor, logits: Tensor, tokens: Tensor, *, attention_mask: Optional[Tensor] = None,
           ignore_index: int = -100, impl: str = "auto") -> EnergyResult:
    """Kinetic energy, point perplexity and the energies built from them, per token and per sequence.

    Each logits row is read once (online logsumexp + target gather, fp32 accumulation); nothing of
    size ``[B, T, V]`` is allocated by the kernels.

    Args:
        hidden: ``[B, T, d]`` or ``[T, d]``; float32, bfloat16 or float16. The state that feeds the
            unembedding (Hugging Face: ``hidden_states[-1]``).
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
    hidden, logits, tokens, attention_mask, device = args.hidden, args.logits, args.tokens, args.mask, args.device
    impl = choose("energy", impl, backend_reasons(device, impl))
    check.float_dtype(hidden, "hidden", allow_float64=impl == "reference")
    check.float_dtype(logits, "logits", allow_float64=impl == "reference")
    real = reference.real_tokens(tokens, attention_mask, ignore_index)
    check.token_range(tokens, real, logits.shape[-1])
    if impl == "reference":  # the kernels find non-finite values themselves, while reading
        scored, used = check.used_positions(real)
        check.finite_positions(logits[:, :-1], scored, "logits")
        check.finite_positions(hidden, used, "hidden")
        result = to_float32(reference.energy(hidden, logits, tokens, attention_mask=attention_mask,
                                             ignore_index=ignore_index))
    elif impl == "triton":
        from .triton.energy import energy_parts

        log_prob, kin = energy_parts(check.unit_last_stride(hidden), check.unit_last_stride(logits), tokens, real)
        check.finite_parts(log_prob, kin, real)
        result = to_float32(reference.energy_from_parts(log_prob, kin))
    else:
        packed = energy_op(check.unit_last_stride(hidden), check.unit_last_stride(logits), tokens, attention_mask,
                           ignore_index)
        result = unpack_energy(*packed)
    return result.map(lambda t: t.squeeze(0)) if args.unbatched else result
