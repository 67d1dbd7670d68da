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
from ._dispatch import choose, compiled, cpp_reason, cuda_reason
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
        mask = (mask != 0).view(torch.uint8)
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
        impl: ``"auto"`` (cuda → triton → cpp → reference), or one backend by name. float64 inputs
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
    hidden = check.tensor(hidden, "hidden")
    logits = check.tensor(logits, "logits")
    tokens = check.tensor(tokens, "tokens")
    if attention_mask is not None:
        attention_mask = check.tensor(attention_mask, "attention_mask")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, d] or [T, d], got shape {tuple(hidden.shape)}")
    unbatched = hidden.dim() == 2
    layout = "[T, ...]" if unbatched else "[B, T, ...]"
    if logits.dim() != hidden.dim() or tokens.dim() != hidden.dim() - 1:
        raise ValueError(
            f"with hidden of shape {tuple(hidden.shape)} ({layout}), logits must have {hidden.dim()} dimensions "
            f"and tokens {hidden.dim() - 1}; got logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}")
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens {tuple(tokens.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask is not None and attention_mask.is_floating_point() or (
            attention_mask is not None and attention_mask.is_complex()):
        raise TypeError(f"attention_mask must be bool or integer, got dtype {attention_mask.dtype}")
    if unbatched:
        hidden, logits, tokens = hidden.unsqueeze(0), logits.unsqueeze(0), tokens.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    B, T, d = hidden.shape
    V = logits.shape[-1]
    if tuple(logits.shape[:2]) != (B, T) or tuple(tokens.shape) != (B, T):
        raise ValueError(f"hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)} and tokens "
                         f"{tuple(tokens.shape)} must agree on batch and length")
    if B == 0:
        raise ValueError("the batch is empty (B = 0)")
    if T < 3:
        raise ValueError(f"sequences need at least 3 tokens (an energy pairs the step into t with the "
                         f"surprisal of token t+1), got length {T}")
    if d == 0 or V == 0:
        raise ValueError(f"hidden size d and vocabulary V must be >= 1, got d={d}, V={V}")
    device = check.same_device({"hidden": hidden, "logits": logits, "tokens": tokens,
                                "attention_mask": attention_mask})
    check.index_dtype(tokens, "tokens")
    impl = choose("energy", impl, {
        "cuda": lambda: cuda_reason(device),
        "cpp": lambda: cpp_reason(device),
        "reference": lambda: None,
    })
    check.float_dtype(hidden, "hidden", allow_float64=impl == "reference")
    check.float_dtype(logits, "logits", allow_float64=impl == "reference")
    real = reference.real_tokens(tokens, attention_mask, ignore_index)
    check.token_range(tokens, real, V)
    if impl == "reference":
        check.finite_rows(logits[:, :-1], real[:, :-1] & real[:, 1:], "logits")
        steps = real[:, 1:] & real[:, :-1]
        check.finite_rows(hidden[:, 1:], steps, "hidden")
        check.finite_rows(hidden[:, :-1], steps, "hidden")
        result = to_float32(reference.energy(hidden, logits, tokens, attention_mask=attention_mask,
                                             ignore_index=ignore_index))
    else:
        mask = None if attention_mask is None else attention_mask != 0
        packed = energy_op(check.unit_last_stride(hidden), check.unit_last_stride(logits), tokens, mask,
                           ignore_index)
        result = unpack_energy(*packed)
    return result.map(lambda t: t.squeeze(0)) if unbatched else result
