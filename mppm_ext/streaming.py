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
and one float32 vocabulary chunk, bounded by :data:`TILE_ELEMENTS` and :data:`CHUNK_ELEMENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _validate as check
from ._dispatch import choose, cpp_reason, cuda_reason

#: Elements of one logits tile ``[rows, cols]``: 2^22 float32 = 16 MiB, large enough that each
#: ``torch.mm`` runs near BLAS peak (a 1024 x 4096 x d product) and small enough to stay in the memory
#: bound ``O(N*d + tile)``.
TILE_ELEMENTS = 1 << 22
#: Elements of one float32 vocabulary chunk ``[cols, d]`` (64 MiB): caps ``cols`` for wide states.
CHUNK_ELEMENTS = 1 << 24
#: Upper bound on the vocabulary chunk: 4096 columns keep a tile row within L2 for the epilogue.
MAX_COLS = 4096


@dataclass(frozen=True)
class Tiling:
    rows: int  # hidden rows per tile
    cols: int  # vocabulary entries per tile


def tiling(n: int, v: int, d: int) -> Tiling:
    """Tile sizes for ``n`` rows, vocabulary ``v`` and hidden size ``d`` within the memory bounds above."""
    cols = max(1, min(v, MAX_COLS, CHUNK_ELEMENTS // max(d, 1)))
    rows = max(1, min(n, TILE_ELEMENTS // cols))
    return Tiling(rows, cols)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    """Products are formed in float32 (float64 when an input is float64): bf16/fp16 tiles would round
    every logit to 8 or 11 bits, far outside the float32 reference's error."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _tile_logits(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    z = h @ w.T
    return z if b is None else z.add_(b)


def _raise_non_finite(z: Tensor, r0: int, v0: int) -> None:
    r, c = (~torch.isfinite(z)).nonzero()[0].tolist()
    raise ValueError(f"the logits computed from hidden and weight hold {z[r, c].item()} at row {r0 + r}, "
                     f"vocabulary entry {v0 + c} (NaN or inf in hidden, weight or bias, or an overflow)")


def _check_common(hidden, weight, bias, name_rows: str) -> torch.device:
    hidden, weight = check.tensor(hidden, "hidden"), check.tensor(weight, "weight")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [{name_rows}, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, d] with d = {hidden.shape[1]} (hidden's last dimension), "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"the vocabulary V and hidden size d must be >= 1, got weight {tuple(weight.shape)}")
    if bias is not None:
        check.tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    return check.same_device({"hidden": hidden, "weight": weight, "bias": bias})


def _check_dtypes(impl: str, **named: Optional[Tensor]) -> None:
    for name, t in named.items():
        if t is not None:
            check.float_dtype(t, name, allow_float64=impl == "reference")


# ---------------------------------------------------------------------------------------------- reference


def _token_log_prob_reference(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
    dt = _compute_dtype(hidden, weight)
    n, d = hidden.shape
    v = weight.shape[0]
    tile = tiling(n, v, d)
    h = hidden.to(dt)
    lse = torch.full((n,), float("-inf"), dtype=torch.float64, device=hidden.device)
    picked = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    for v0 in range(0, v, tile.cols):
        v1 = min(v, v0 + tile.cols)
        w = weight[v0:v1].to(dt)
        b = None if bias is None else bias[v0:v1].to(dt)
        for r0 in range(0, n, tile.rows):
            r1 = min(n, r0 + tile.rows)
            z = _tile_logits(h[r0:r1], w, b)
            if not bool(torch.isfinite(z).all()):
                _raise_non_finite(z, r0, v0)
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(z.double(), dim=1))
            t = targets[r0:r1]
            inside = (t >= v0) & (t < v1)
            got = z.gather(1, (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1).double()
            picked[r0:r1] = torch.where(inside, got, picked[r0:r1])
    return picked - lse


def _softmax_moments_reference(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dt = _compute_dtype(hidden, weight)
    n, d = hidden.shape
    v = weight.shape[0]
    tile = tiling(n, v, d)
    h = hidden.to(dt)
    run_max = torch.full((n,), float("-inf"), dtype=torch.float64, device=hidden.device)
    run_sum = torch.zeros(n, dtype=torch.float64, device=hidden.device)
    wbar = torch.zeros(n, d, dtype=dt, device=hidden.device)
    for v0 in range(0, v, tile.cols):
        v1 = min(v, v0 + tile.cols)
        w = weight[v0:v1].to(dt)
        b = None if bias is None else bias[v0:v1].to(dt)
        for r0 in range(0, n, tile.rows):
            r1 = min(n, r0 + tile.rows)
            z = _tile_logits(h[r0:r1], w, b)
            if not bool(torch.isfinite(z).all()):
                _raise_non_finite(z, r0, v0)
            new_max = torch.maximum(run_max[r0:r1], z.max(dim=1).values.double())
            alpha = torch.exp(run_max[r0:r1] - new_max)
            p = torch.exp(z - new_max.to(dt).unsqueeze(1))
            run_sum[r0:r1] = alpha * run_sum[r0:r1] + p.sum(dim=1, dtype=torch.float64)
            run_max[r0:r1] = new_max
            wbar[r0:r1] = alpha.to(dt).unsqueeze(1) * wbar[r0:r1] + p @ w
    lse = run_max + torch.log(run_sum)
    return lse, (wbar / run_sum.to(dt).unsqueeze(1)).float()


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
            ValueError naming the row and vocabulary entry when a logit is NaN or inf.
        BackendUnavailableError: ``impl`` cannot run on these tensors.
    """
    device = _check_common(hidden, weight, bias, "N")
    targets = check.tensor(targets, "targets")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    check.same_device({"hidden": hidden, "targets": targets})
    check.index_dtype(targets, "targets")
    impl = choose("token_log_prob_from_hidden", impl, _backend_reasons(device))
    _check_dtypes(impl, hidden=hidden, weight=weight, bias=bias)
    check.token_range(targets, torch.ones_like(targets, dtype=torch.bool), weight.shape[0], "targets")
    targets = targets.long()
    if hidden.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return _TOKEN_LOG_PROB[impl](hidden, weight, bias, targets)


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
    device = _check_common(hidden, weight, bias, "B")
    impl = choose("softmax_moments", impl, _backend_reasons(device))
    _check_dtypes(impl, hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.float64, device=device),
                torch.zeros(0, hidden.shape[1], dtype=torch.float32, device=device))
    return _SOFTMAX_MOMENTS[impl](hidden, weight, bias)


def _backend_reasons(device: torch.device) -> dict:
    return {
        "cuda": lambda: cuda_reason(device),
        "cpp": lambda: cpp_reason(device),
        "reference": lambda: None,
    }


_TOKEN_LOG_PROB = {"reference": _token_log_prob_reference}
_SOFTMAX_MOMENTS = {"reference": _softmax_moments_reference}

__all__ = ["token_log_prob_from_hidden", "softmax_moments", "tiling", "Tiling"]
