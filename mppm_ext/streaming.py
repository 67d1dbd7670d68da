"""One streaming pass over the unembedding: log-probabilities and softmax moments of ``W h + b`` without
ever holding the ``[N, V]`` logits.

The logits are produced one tile ``[rows, cols]`` at a time by a matrix product of a block of hidden rows
with a chunk of vocabulary rows of ``weight``, and each tile is folded into a per-row online softmax
(running max and running sum of exponentials, rescaled when the max grows), exactly as flash attention
accumulates ``softmax(QK^T) V``. The loop order is fixed (vocabulary chunks outer, row blocks inner, both
ascending) and nothing is combined with atomics, so results are bitwise reproducible.

Backends (``impl``, picked with :func:`mppm_ext._dispatch.choose`):
    ``"reference"``: plain torch, chunked the same way; also the only backend for float64 inputs.
    ``"cpp"`` / ``"cuda"``: the same chunked ``torch.mm`` (BLAS / cuBLAS) with the fold fused into one
        compiled epilogue per tile (``mppm_ext._C.softmax_tile``).
    ``"triton"``: :mod:`mppm_ext.triton.linear` (tiles computed with ``tl.dot`` and never stored).

Memory: besides the inputs, ``O(N*d)`` (a float32 copy of ``hidden`` when it is not float32) plus one tile
and one float32 vocabulary chunk, bounded per device type by :data:`BUDGETS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validate as check
from ._dispatch import backend_reasons, choose


@dataclass(frozen=True)
class Budget:
    """Tile bounds for one device type, in elements."""

    tile: int  # one float32 logits tile [rows, cols]
    chunk: int  # one converted vocabulary chunk [cols, d]
    max_cols: int  # vocabulary entries per chunk


#: CPU: a 2^22-element tile (16 MiB) keeps each torch.mm near BLAS peak (a 1024 x 4096 x d product) and
#: 4096 columns keep a tile row in L2 for the epilogue; the chunk is capped at 64 MiB for wide states.
#: CUDA: every tile costs ~30-50 us of Python and launches (a GEMM, the epilogue op), so tiles must be
#: large next to that: 2^27 elements (512 MiB, e.g. 8192 x 16384) are 0.7 ms of GEMM at d = 2048 on an
#: H100 (790 TFLOP/s), keeping the per-tile overhead under ~7%.
BUDGETS = {
    "cpu": Budget(tile=1 << 22, chunk=1 << 24, max_cols=4096),
    "cuda": Budget(tile=1 << 27, chunk=1 << 26, max_cols=16384),
}


@dataclass(frozen=True)
class Tiling:
    rows: int  # hidden rows per tile
    cols: int  # vocabulary entries per tile


def tiling(n: int, v: int, d: int, device_type: str = "cpu") -> Tiling:
    """Tile sizes for ``n`` rows, vocabulary ``v`` and hidden size ``d`` within the device's
    :data:`BUDGETS` (extra memory O(tile + chunk) whatever ``n`` and ``v`` are)."""
    budget = BUDGETS.get(device_type, BUDGETS["cpu"])
    cols = max(1, min(v, budget.max_cols, budget.chunk // max(d, 1)))
    rows = max(1, min(n, budget.tile // cols))
    return Tiling(rows, cols)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """Products are formed in float32 (float64 when an input is float64): bf16/fp16 tiles would round
    every logit to 8 or 11 bits, far outside the float32 reference's error."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _tile_logits(h: Tensor, w: Tensor, w_dt: Optional[Tensor], b: Optional[Tensor], tensor_cores: bool) -> Tensor:
    """One tile of logits, float32 (float64 for float64 inputs). On CUDA, same-dtype 16-bit operands go
    to the tensor cores with float32 output (``mm.dtype``: 16-bit products, float32 accumulation, as the
    float32 reference of the same values); elsewhere the products are formed from ``w_dt``, the chunk
    already converted. (TF32, when the caller enables it for float32 matmuls, applies here too.)"""
    if tensor_cores:
        z = torch.mm(h, w.T, out_dtype=torch.float32)
        return z if b is None else z.add_(b)
    if b is None:
        return h @ w_dt.T
    return torch.addmm(b, h, w_dt.T)


def _fold_torch(z: Tensor, v0: int, run_max: Tensor, run_sum: Tensor, bad_col: Tensor, targets: Optional[Tensor],
                picked: Optional[Tensor], alpha: Optional[Tensor]) -> None:
    """The ``softmax_tile`` contract (csrc/include/mppm/softmax_tile.h) in torch: the reference fold."""
    cols = z.shape[1]
    if targets is not None:
        inside = (targets >= v0) & (targets < v0 + cols)
        got = z.gather(1, (targets - v0).clamp(0, cols - 1).unsqueeze(1)).squeeze(1).double()
        picked.copy_(torch.where(inside, got, picked))
    bad = ~torch.isfinite(z)
    ok = ~bad.any(dim=1)
    first_bad = v0 + bad.int().argmax(dim=1)
    bad_col.copy_(torch.where(~ok & (bad_col < 0), first_bad, bad_col))
    if alpha is None:
        tile_lse = torch.logsumexp(z.double(), dim=1)
        ref = torch.maximum(run_max, tile_lse)
        new_sum = run_sum * torch.exp(run_max - ref) + torch.exp(tile_lse - ref)
    else:
        ref = torch.maximum(run_max, z.max(dim=1).values.double())
        a = torch.exp(run_max - ref)
        z.sub_(ref.to(z.dtype).unsqueeze(1)).exp_()
        z.masked_fill_(~ok.unsqueeze(1), 0.0)
        new_sum = a * run_sum + z.sum(dim=1, dtype=torch.float64)
        alpha.copy_(torch.where(ok, a, 1.0))
    run_sum.copy_(torch.where(ok, new_sum, run_sum))
    run_max.copy_(torch.where(ok, ref, run_max))


def _fold_compiled(z: Tensor, v0: int, run_max: Tensor, run_sum: Tensor, bad_col: Tensor,
                   targets: Optional[Tensor], picked: Optional[Tensor], alpha: Optional[Tensor]) -> None:
    from .ops import softmax_tile_op

    softmax_tile_op(z, v0, 1.0, run_max, run_sum, None, bad_col, targets, picked, alpha)


@dataclass
class _Stream:
    """Per-row state of one streaming pass."""

    lse: Tensor  # [N] float64
    picked: Optional[Tensor]  # [N] float64: the target logits
    wbar: Optional[Tensor]  # [N, d] (float32, float64 for float64 inputs), normalised
    bad: Tensor  # [N] bool: the row's logits hold NaN or inf


def _stream(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Optional[Tensor], moments: bool,
            fold: Callable[..., None]) -> _Stream:
    """One pass over ``weight`` in vocabulary chunks (outer) and row blocks (inner), folding every tile
    with ``fold`` (the torch or compiled ``softmax_tile``). Extra memory: ``hidden`` converted to the
    compute dtype and ``wbar`` (O(N*d)), plus one converted vocabulary chunk and one tile (bounded by
    BUDGETS); every state vector is O(N). Nothing in the loop reads device data back to the host."""
    dt = _compute_dtype(hidden, weight)
    n, d = hidden.shape
    v = weight.shape[0]
    tile = tiling(n, v, d, hidden.device.type)
    device = hidden.device
    tensor_cores = hidden.is_cuda and hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16,
                                                                                        torch.float16)
    h = hidden if tensor_cores else hidden.to(dt)
    run_max = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    run_sum = torch.zeros(n, dtype=torch.float64, device=device)
    bad_col = torch.full((n,), -1, dtype=torch.int64, device=device)
    picked = None if targets is None else torch.zeros(n, dtype=torch.float64, device=device)
    wbar = torch.zeros(n, d, dtype=dt, device=device) if moments else None
    alpha = torch.empty(n, dtype=dt, device=device) if moments else None
    for v0 in range(0, v, tile.cols):
        v1 = min(v, v0 + tile.cols)
        w = weight[v0:v1]
        # P @ W needs the converted chunk even when the logits come from the 16-bit operands.
        w_dt = w.to(dt) if moments or not tensor_cores else None
        b = None if bias is None else bias[v0:v1].to(dt)
        for r0 in range(0, n, tile.rows):
            rows = slice(r0, min(n, r0 + tile.rows))
            z = _tile_logits(h[rows], w, w_dt, b, tensor_cores)
            fold(z, v0, run_max[rows], run_sum[rows], bad_col[rows], None if targets is None else targets[rows],
                 None if picked is None else picked[rows], None if alpha is None else alpha[rows])
            if moments:
                wbar[rows].mul_(alpha[rows].unsqueeze(1)).addmm_(z, w_dt)
    if moments:
        wbar.div_(run_sum.to(dt).unsqueeze(1))
    return _Stream(run_max + torch.log(run_sum), picked, wbar, bad_col >= 0)


class NonFiniteLogitsError(ValueError):
    """A logit formed from hidden, weight and bias is NaN or inf; ``row`` and ``column`` locate the first."""

    def __init__(self, row: int, column: int):
        super().__init__(f"the logits computed from hidden, weight and bias hold NaN or inf at row {row}, "
                         f"vocabulary entry {column} (NaN or inf in those inputs, or an overflow)")
        self.row, self.column = row, column


def non_finite_logits(bad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> NonFiniteLogitsError:
    """The error for the first row flagged in ``bad`` ([N] bool, known to hold a True): that row's logits
    are recomputed (one row, on this error path only) to name the vocabulary entry."""
    row = int(bad.nonzero()[0, 0])
    dt = _compute_dtype(hidden, weight)
    z = weight.to(dt) @ hidden[row].to(dt) + (0 if bias is None else bias.to(dt))
    found = (~torch.isfinite(z)).nonzero()
    # A tile's product may round differently from this one (another summation order, TF32): where the
    # recomputed row is finite, its largest logit is the one that overflowed.
    column = int(found[0, 0]) if found.numel() else int(z.abs().argmax())
    return NonFiniteLogitsError(row, column)


def _fold(impl: str) -> Callable[..., None]:
    return _fold_torch if impl == "reference" else _fold_compiled


def log_prob_pass(impl: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                  targets: Tensor) -> tuple[Tensor, Tensor]:
    """The streaming pass behind :func:`token_log_prob_from_hidden`, on checked inputs with the backend
    already chosen (no validation, no dispatch, no host synchronisation).

    Args:
        impl: a backend name that :func:`mppm_ext._dispatch.choose` returned.
        hidden ``[N, d]``, weight ``[V, d]``, bias ``[V]`` or None, targets ``[N]`` int64 in ``[0, V)``.

    Returns:
        ``(log_prob [N] float64, bad [N] bool)``: ``bad`` flags rows whose logits hold NaN or inf
        (their log_prob is meaningless).
    """
    if impl == "triton":
        from .triton import linear

        log_prob = linear.token_log_prob_from_hidden(hidden, weight, bias, targets)
        return log_prob, ~torch.isfinite(log_prob)
    s = _stream(hidden, weight, bias, targets, moments=False, fold=_fold(impl))
    return s.picked - s.lse, s.bad


def moments_pass(impl: str, hidden: Tensor, weight: Tensor,
                 bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The streaming pass behind :func:`softmax_moments`, on checked inputs with the backend already
    chosen (no validation, no dispatch, no host synchronisation: the steering solver calls it once per
    Gauss-Newton evaluation).

    Returns:
        ``(lse [B] float64, wbar [B, d] float32, bad [B] bool)``, ``bad`` as in :func:`log_prob_pass`.
    """
    if impl == "triton":
        from .triton import linear

        lse, wbar = linear.softmax_moments(hidden, weight, bias)
        return lse, wbar, ~(torch.isfinite(lse) & torch.isfinite(wbar).all(-1))
    s = _stream(hidden, weight, bias, None, moments=True, fold=_fold(impl))
    return s.lse, s.wbar.float(), s.bad


# ---------------------------------------------------------------------------------------------- public


def token_log_prob_from_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                               impl: str = "auto") -> Tensor:
    """``log_softmax(hidden @ weight.T + bias)[n, targets[n]]`` for every row, streaming over the vocabulary.

    Args:
        hidden: ``[N, d]`` float32, bfloat16 or float16 (float64 with ``impl="reference"``).
        weight: ``[V, d]``, the unembedding (same dtype rules as hidden; may differ from hidden's dtype).
        bias: ``[V]`` or None.
        targets: ``[N]`` int64 or int32, each in ``[0, V)``.
        impl: ``"auto"`` or a backend name (module docstring).

    Returns:
        ``[N]`` float64 log-probabilities (accumulated in float64 from float32 logits).

    Raises:
        TypeError / ValueError: wrong types, shapes, dtypes, devices or target ids (naming the argument);
            NonFiniteLogitsError (a ValueError) naming the row and vocabulary entry when a logit is NaN or inf.
        BackendUnavailableError: ``impl`` cannot run on these tensors.
    """
    device = check.unembedding_inputs(hidden, weight, bias, "N")
    targets = check.tensor(targets, "targets")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    check.same_device({"hidden": hidden, "targets": targets})
    check.index_dtype(targets, "targets")
    impl = choose("token_log_prob_from_hidden", impl, backend_reasons(device, impl))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[0] == 0 or not check.has_data(hidden):  # nothing to compute, or shapes only (meta)
        return torch.zeros(hidden.shape[0], dtype=torch.float64, device=device)
    V = weight.shape[0]
    outside = (targets < 0) | (targets >= V)
    # Out-of-range ids are clamped for the pass and reported after it, so that the call reads device data
    # back once (the two checks share one synchronisation).
    log_prob, bad = log_prob_pass(impl, hidden, weight, bias, targets.long().clamp(0, V - 1).contiguous())
    if bool(torch.stack([outside.any(), bad.any()]).any()):
        check.token_range(targets, torch.ones_like(outside), V, "targets")
        raise non_finite_logits(bad, hidden, weight, bias)
    return log_prob


def softmax_moments(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], *,
                    impl: str = "auto") -> tuple[Tensor, Tensor]:
    """The log-partition and the mean unembedding row under the softmax, in one pass over ``weight``.

    ``lse[b] = logsumexp(weight @ hidden[b] + bias)`` and ``wbar[b] = weight.T @ softmax(weight @ hidden[b]
    + bias)`` (the gradient of ``lse`` with respect to ``hidden[b]``).

    Args:
        hidden: ``[B, d]`` float32, bfloat16 or float16 (float64 with ``impl="reference"``).
        weight: ``[V, d]``; bias: ``[V]`` or None.
        impl: ``"auto"`` or a backend name (module docstring).

    Returns:
        ``(lse [B] float64, wbar [B, d] float32)``. ``wbar`` is accumulated in float32 (float64 for
        float64 inputs) as ``alpha * wbar + P_tile @ W_chunk`` and divided by the running sum at the end.

    Raises:
        as :func:`token_log_prob_from_hidden`.
    """
    device = check.unembedding_inputs(hidden, weight, bias, "B")
    impl = choose("softmax_moments", impl, backend_reasons(device, impl))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[0] == 0 or not check.has_data(hidden):  # nothing to compute, or shapes only (meta)
        return (torch.zeros(hidden.shape[0], dtype=torch.float64, device=device),
                torch.zeros(hidden.shape, dtype=torch.float32, device=device))
    lse, wbar, bad = moments_pass(impl, hidden, weight, bias)
    if bool(bad.any()):
        raise non_finite_logits(bad, hidden, weight, bias)
    return lse, wbar


__all__ = ["token_log_prob_from_hidden", "softmax_moments", "log_prob_pass", "moments_pass", "NonFiniteLogitsError",
           "non_finite_logits", "tiling", "Tiling", "Budget", "BUDGETS"]
