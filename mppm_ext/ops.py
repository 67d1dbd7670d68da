"""torch.library registration of every compiled op: ``mppm_ext::energy`` (the fused logits path),
``mppm_ext::energy_finish`` (parts -> every derived quantity and statistic), ``mppm_ext::softmax_tile``
(the epilogue of the streaming passes) and ``mppm_ext::cg_solve`` (the steering CG).

The compiled module never sees a torch.Tensor: each op's kernels turn their arguments into DLPack
views and call ``mppm_ext._C``; fake implementations give shapes to torch.compile and meta tensors.
Nothing here validates or dispatches: the public functions have done both before calling an op."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.dlpack import to_dlpack

from ._dispatch import compiled
from .results import STAT_QUANTITIES, TOKEN_QUANTITIES

_NUM_STAT_COLUMNS = 3 * len(STAT_QUANTITIES) + 1
_NUM_COUNT_COLUMNS = 2
#: Planes of the energy op's float64 scratch: the parts log_prob, kinetic, entropy, logsumexp
#: (kNumParts in csrc/include/mppm/finish.h).
_NUM_PARTS = 4


def _view(t: Tensor):
    return to_dlpack(t.detach())


def _stream(device: torch.device) -> int:
    """The caller's current CUDA stream on ``device`` (0, the default stream, for CPU tensors)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _cuda_index(device: torch.device) -> Optional[int]:
    """The CUDA device index the compiled size queries take (None for CPU tensors; a tensor's CUDA device
    always has its index)."""
    return device.index if device.type == "cuda" else None


def _workspace(nbytes: int, device: torch.device) -> Tensor:
    """The kernels' scratch, from torch's allocator (so that a CUDA graph capture takes it from the graph's
    pool, and nothing is allocated behind torch's back); the allocator aligns to 512 bytes."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _finish_outputs(B: int, T: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty(len(TOKEN_QUANTITIES), B, T, dtype=torch.float32, device=device),
        torch.empty(B, _NUM_STAT_COLUMNS, dtype=torch.float32, device=device),
        torch.empty(B, _NUM_COUNT_COLUMNS, dtype=torch.int64, device=device),
    )


EnergyOutputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _energy_outputs(tokens: Tensor, device: torch.device) -> EnergyOutputs:
    B, T = tokens.shape
    per_token, stats, counts = _finish_outputs(B, T, device)
    return (per_token, torch.empty(B, T, dtype=torch.uint8, device=device), stats, counts,
            torch.empty(_NUM_PARTS, B, T, dtype=torch.float64, device=device),
            torch.empty(1, dtype=torch.int64, device=device))


def _launch_energy(hidden: Tensor, logits: Tensor, tokens: Tensor, labels: Tensor, mask: Optional[Tensor],
                   ignore_index: int, inv_temperature: float) -> EnergyOutputs:
    out = _energy_outputs(tokens, hidden.device)
    if mask is not None and mask.dtype != torch.uint8:
        # A bool mask is reinterpreted in place; only other dtypes need a comparison pass.
        mask = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    B, T = tokens.shape
    workspace = _workspace(compiled().energy_workspace_bytes(B, T, logits.shape[-1], _cuda_index(hidden.device)),
                           hidden.device)
    compiled().energy(
        _view(hidden), _view(logits), _view(tokens), _view(labels), None if mask is None else _view(mask),
        int(ignore_index), float(inv_temperature), *(_view(t) for t in out), _view(workspace),
        torch.get_num_threads(), _stream(hidden.device),
    )
    return out


@torch.library.custom_op("mppm_ext::energy", mutates_args=(), device_types=("cpu", "cuda"))
def energy_op(hidden: Tensor, logits: Tensor, tokens: Tensor, labels: Tensor, mask: Optional[Tensor],
              ignore_index: int, inv_temperature: float) -> EnergyOutputs:
    """Packed fused energy: ``(per_token [10, B, T] f32, defined [B, T] u8, stats [B, 34] f32,
    counts [B, 2] i64, parts [4, B, T] f64, fault [1] i64)``; see :func:`mppm_ext.results.unpack_energy` for
    the layout and :mod:`mppm_ext.parts` for the parts (returned so that the backward needs no second
    forward). ``fault`` holds -1, or the first fault found in the data, packed as
    ``(b * T + t) << _C.ENERGY_FAULT_BITS | kind`` (:func:`mppm_ext._validate.fused_fault` reads and raises
    it; the op itself never raises on data and never synchronises with the host). ``labels [B, T]`` are the
    targets (pass ``tokens`` for none), ``inv_temperature`` is 1 / temperature."""
    return _launch_energy(hidden, logits, tokens, labels, mask, ignore_index, inv_temperature)


@energy_op.register_fake
def _energy_fake(hidden, logits, tokens, labels, mask, ignore_index, inv_temperature):
    return _energy_outputs(tokens, hidden.device)


@torch.library.custom_op("mppm_ext::energy_finish", mutates_args=(), device_types=("cpu", "cuda"))
def energy_finish_op(parts: Tensor, defined: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The one finish (csrc/include/mppm/finish.h): ``(per_token [10, B, T] f32, stats [B, 34] f32,
    counts [B, 2] i64)`` from ``parts [4, B, T]`` float64 (log p_t, K_t, entropy, logsumexp) and
    ``defined [B, T]`` uint8 bits; the layout of :func:`mppm_ext.results.unpack_energy`."""
    _, B, T = parts.shape
    out = _finish_outputs(B, T, parts.device)
    workspace = _workspace(compiled().finish_workspace_bytes(B, T, _cuda_index(parts.device)), parts.device)
    compiled().energy_finish(_view(parts), _view(defined), *(_view(t) for t in out), _view(workspace),
                             torch.get_num_threads(), _stream(parts.device))
    return out


@energy_finish_op.register_fake
def _energy_finish_fake(parts, defined):
    _, B, T = parts.shape
    return _finish_outputs(B, T, parts.device)




# The epilogue, not energy_from_hidden, is the custom op: the public function takes a Python callable
# (the model's final norm) and loops over tiles whose count depends on the shapes, neither of which a
# custom op's schema can carry; each tile's torch.mm is already an aten op that torch.compile sees.
@torch.library.custom_op("mppm_ext::softmax_tile", mutates_args=("z", "run_max", "run_sum", "run_ent", "bad_col",
                                                                  "picked", "alpha"), device_types=("cpu", "cuda"))
def softmax_tile_op(z: Tensor, v0: int, inv_temperature: float, run_max: Tensor, run_sum: Tensor,
                    run_ent: Optional[Tensor], bad_col: Tensor, targets: Optional[Tensor], picked: Optional[Tensor],
                    alpha: Optional[Tensor]) -> None:
    """Scale one float32 logits tile ``z [R, C]`` (vocabulary entries ``v0 .. v0+C-1``) in place by
    ``inv_temperature`` and fold it into the per-row online softmax state (``run_ent`` [R] float64, the
    entropy accumulator, optional); see csrc/include/mppm/softmax_tile.h and mppm_ext.streaming."""
    run_ent_view = None if run_ent is None else _view(run_ent)
    opt = [None if t is None else _view(t) for t in (targets, picked, alpha)]
    compiled().softmax_tile(_view(z), int(v0), float(inv_temperature), _view(run_max), _view(run_sum), run_ent_view,
                            _view(bad_col), *opt, torch.get_num_threads(), _stream(z.device))


@softmax_tile_op.register_fake
def _softmax_tile_fake(z, v0, inv_temperature, run_max, run_sum, run_ent, bad_col, targets, picked, alpha):
    return None


def _energy_setup(ctx, inputs, output):
    hidden, logits, _tokens, labels, _mask, _ignore_index, inv_temperature = inputs
    ctx.save_for_backward(hidden, logits, labels, output[1], output[4])
    ctx.inv_temperature = inv_temperature


def _energy_backward(ctx, g_tokens, _g_defined, g_stats, _g_counts, g_parts, _g_fault):
    from ._grad import finish_vjp, logits_parts_vjp

    hidden, logits, labels, defined, parts = ctx.saved_tensors
    g = finish_vjp(parts, defined, g_tokens, g_stats)
    if g_parts is not None:
        g = g + g_parts
    g_hidden, g_logits = logits_parts_vjp(hidden, logits, labels, defined, parts, ctx.inv_temperature, g,
                                          ctx.needs_input_grad[:2])
    return g_hidden, g_logits, None, None, None, None, None


energy_op.register_autograd(_energy_backward, setup_context=_energy_setup)


def _finish_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _finish_backward(ctx, g_tokens, g_stats, _g_counts):
    from ._grad import finish_vjp

    parts, defined = ctx.saved_tensors
    return finish_vjp(parts, defined, g_tokens, g_stats), None


energy_finish_op.register_autograd(_finish_backward, setup_context=_finish_setup)


def _cg_outputs(rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, m, _ = rows.shape
    dev = rows.device
    return (torch.empty(B, m, dtype=torch.float64, device=dev), torch.empty(B, dtype=torch.int64, device=dev),
            torch.empty(B, dtype=torch.float64, device=dev), torch.empty(B, dtype=torch.uint8, device=dev))


@torch.library.custom_op("mppm_ext::cg_solve", mutates_args=(), device_types=("cpu", "cuda"))
def cg_solve_op(rows: Tensor, center: Optional[Tensor], rhs: Tensor, lam: float, tol: float,
                max_iter: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Packed compiled CG (csrc/include/mppm/cg.h): ``(u [B, m] f64, iters [B] i64, residual [B] f64,
    converged [B] u8)`` from rows [B, m, d] f32, center [B, d] f32 or None, rhs [B, m] f64 (contiguous)."""
    B, m, d = rows.shape
    out = _cg_outputs(rows)
    scratch = torch.empty(B, d + 3 * m, dtype=torch.float64, device=rows.device)
    compiled().cg_solve(_view(rows), None if center is None else _view(center), _view(rhs), float(lam), float(tol),
                        int(max_iter), *(_view(t) for t in out), _view(scratch), torch.get_num_threads(),
                        _stream(rows.device))
    return out


@cg_solve_op.register_fake
def _cg_solve_fake(rows, center, rhs, lam, tol, max_iter):
    return _cg_outputs(rows)
