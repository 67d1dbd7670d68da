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

import functools
import math

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _validate as check
from ._autocast import no_autocast
from ._dispatch import backend_reasons, choose


@dataclass(frozen=True)
class Budget:
    """Tile bounds for one device type, in elements."""

    tile: int  # one float32 logits tile [rows, cols]
    chunk: int  # one converted vocabulary chunk [cols, d]
    max_cols: int  # vocabulary entries per chunk


#: CPU: a 2^22-element tile (16 MiB) keeps each torch.mm near BLAS peak (a 1024 x 4096 x d product) and
#: 4096 columns keep a tile row in L2 for the epilogue; the chunk is capped at 64 MiB for wide states.
#: CUDA: the epilogue (csrc/cuda/softmax_tile_cuda.cu) must find the tile that cuBLAS just wrote in L2
#: (50 MB on an H100, 60 MB on an H200), so a tile is 2^23 float32 (32 MiB, 2048 x 4096), beside the
#: product's operands (at d = 2048 in bf16: a 16 MiB chunk of W and 8 MiB of hidden rows). Design
#: figures at the target shape N = 8192, d = 2048, V = 50257, bf16 (H200: ~790 TFLOP/s bf16 and 4.3 TB/s
#: of copy measured, 1.98 GHz, 132 SMs): a tile's GEMM is 2 * 2048 * 4096 * 2048 = 34 GFLOP = 44 us; its
#: epilogue reads 32 MiB (7.8 us even from HBM, 18%; ~3 us from L2) and spends ~20 instructions on each of
#: 2^23 elements (5 us of the chip's 3.3e13 lane-instructions/s): ~1.15-1.2x the bare GEMM (2.1 ms for
#: the whole product; 4 x 13 = 52 tiles). The earlier 2^27-element tiles (512 MiB) round-tripped through
#: HBM: 0.25 ms of traffic on 0.7 ms of GEMM. The cost of a smaller tile is issue time: each takes ~30-50
#: us of Python and two launches, about its 44 us of GPU time at d = 2048 (less than it for d < 2048),
#: so launches queue only just ahead of the GPU; the GPU session's profile says whether they keep up.
BUDGETS = {
    "cpu": Budget(tile=1 << 22, chunk=1 << 24, max_cols=4096),
    "cuda": Budget(tile=1 << 23, chunk=1 << 26, max_cols=4096),
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


@functools.lru_cache(maxsize=None)
def _mm_float32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has ``torch.mm(..., out_dtype=torch.float32)`` for 16-bit operands on ``device``
    (CUDA builds since torch 2.7; never on CPU). Probed once per (device, dtype) with a 1 x 1 product: an
    unsupported dispatch raises on the host, before anything is launched."""
    x = torch.zeros(1, 1, dtype=dtype, device=device)
    try:
        torch.mm(x, x, out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError, TypeError):
        return False
    return True


def _view(buf: Optional[Tensor], *shape: int) -> Optional[Tensor]:
    """The leading elements of a kept flat buffer as a contiguous ``[shape]`` tensor (None: no buffer)."""
    return None if buf is None else buf[:math.prod(shape)].view(shape)


class _Buffers:
    """The converted vocabulary chunk and the tiles of one pass (forward or backward), each in a buffer kept
    for the whole pass: a fresh tensor of 16-32 MiB costs its page faults each time (CPU, 2 threads: a
    [4096, 2048] bf16 -> float32 conversion took 10 ms into a new tensor, 1.0 ms into a kept one; steer_step
    with bf16 W spent 40% of its time there). ``convert``: the chunk is needed in ``dt``; ``tiles``: the
    tiles are formed into a buffer (not on CUDA's float32-output tensor cores); ``logits_dtype``: also a
    buffer for the rounded 16-bit product."""

    def __init__(self, tile: Tiling, d: int, dt: torch.dtype, weight: Tensor, convert: bool, tiles: bool,
                 logits_dtype: Optional[torch.dtype]):
        device, size = weight.device, tile.rows * tile.cols
        self.w = torch.empty(tile.cols * d, dtype=dt, device=device) if convert and weight.dtype != dt else None
        self.z = torch.empty(size, dtype=dt, device=device) if tiles else None
        self.z16 = torch.empty(size, dtype=logits_dtype, device=device) if logits_dtype is not None else None

    def chunk(self, w: Tensor) -> Tensor:
        """``w`` ``[cols, d]`` in the compute dtype: itself when already in it, else copied into the buffer."""
        return w if self.w is None else _view(self.w, *w.shape).copy_(w)

    def tile(self, rows: int, cols: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(out, out16)`` of :func:`_tile_logits` for a ``[rows, cols]`` tile."""
        return _view(self.z, rows, cols), _view(self.z16, rows, cols)


def _tile_logits(h: Tensor, w: Tensor, w_dt: Optional[Tensor], b: Optional[Tensor], tensor_cores: bool,
                 rounded: bool = False, out: Optional[Tensor] = None, out16: Optional[Tensor] = None) -> Tensor:
    """One tile of logits, float32 (float64 for float64 inputs). On CUDA, same-dtype 16-bit operands go
    to the tensor cores with float32 output (``mm.dtype``: 16-bit products, float32 accumulation, as the
    float32 reference of the same values); elsewhere the products are formed from ``w_dt``, the chunk
    already converted. (TF32, when the caller enables it for float32 matmuls, applies here too.)
    ``rounded`` (``logits_dtype``): the product of the 16-bit ``h``, ``w`` and ``b`` in their own dtype, i.e.
    every logit rounded to 16 bits as an eager 16-bit ``lm_head`` gives it, then widened to float32.
    ``out`` / ``out16``: kept buffers for the tile and for the rounded 16-bit product (None: new tensors)."""
    if rounded:
        z16 = torch.mm(h, w.T, out=out16) if b is None else torch.addmm(b, h, w.T, out=out16)
        return z16.float() if out is None else out.copy_(z16)
    if tensor_cores:
        z = torch.mm(h, w.T, out_dtype=torch.float32)
        return z if b is None else z.add_(b)
    if b is None:
        return torch.mm(h, w_dt.T, out=out)
    return torch.addmm(b, h, w_dt.T, out=out)


def _fold_torch(z: Tensor, v0: int, inv_temperature: float, run_max: Tensor, run_sum: Tensor,
                run_ent: Optional[Tensor], bad_col: Tensor, targets: Optional[Tensor], picked: Optional[Tensor],
                alpha: Optional[Tensor]) -> None:
    """The ``softmax_tile`` contract (csrc/include/mppm/softmax_tile.h) in torch, in float64: the reference
    fold. ``run_max`` is the running reference point m of the row, ``run_sum`` sum exp(x - m) and
    ``run_ent`` sum exp(x - m) (x - m) over the scaled logits x = z * inv_temperature seen so far; -inf
    entries add nothing, NaN and +inf mark the row bad."""
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    cols = z.shape[1]
    if targets is not None:
        inside = (targets >= v0) & (targets < v0 + cols)
        got = z.gather(1, (targets - v0).clamp(0, cols - 1).unsqueeze(1)).squeeze(1).double()
        picked.copy_(torch.where(inside, got, picked))
    bad = z.isnan() | (z == float("inf"))
    ok = ~bad.any(dim=1)
    first_bad = v0 + bad.int().argmax(dim=1)
    bad_col.copy_(torch.where(~ok & (bad_col < 0), first_bad, bad_col))
    x = z.double()
    ref = torch.maximum(run_max, x.max(dim=1).values)
    live = torch.isfinite(ref)  # False while the row has met no finite logit
    base = torch.where(live, ref, 0.0)
    a = torch.where(live, torch.exp(run_max - base), 1.0)
    e = torch.exp(x - base.unsqueeze(1))  # exactly 0 at -inf entries
    if run_ent is not None:
        shift = torch.where(run_sum > 0, run_sum * (run_max - base), 0.0)  # 0 * -inf would be NaN
        centred = torch.where(e > 0, x - base.unsqueeze(1), 0.0)
        run_ent.copy_(torch.where(ok, a * (run_ent + shift) + (e * centred).sum(dim=1), run_ent))
    if alpha is not None:
        z.copy_(torch.where(ok.unsqueeze(1), e, 0.0))
        alpha.copy_(torch.where(ok, a, 1.0))
    run_sum.copy_(torch.where(ok, a * run_sum + e.sum(dim=1), run_sum))
    run_max.copy_(torch.where(ok & live, ref, run_max))


def _fold_compiled(z: Tensor, v0: int, inv_temperature: float, run_max: Tensor, run_sum: Tensor,
                   run_ent: Optional[Tensor], bad_col: Tensor, targets: Optional[Tensor], picked: Optional[Tensor],
                   alpha: Optional[Tensor]) -> None:
    from .ops import softmax_tile_op

    softmax_tile_op(z, v0, inv_temperature, run_max, run_sum, run_ent, bad_col, targets, picked, alpha)


@dataclass
class _Stream:
    """Per-row state of one streaming pass."""

    lse: Tensor  # [N] float64 (-inf for a row without a finite logit)
    entropy: Optional[Tensor]  # [N] float64
    picked: Optional[Tensor]  # [N] float64: the target logits
    wbar: Optional[Tensor]  # [N, d] (float32, float64 for float64 inputs), normalised
    bad: Tensor  # [N] bool: the row's logits hold NaN or +inf


def _stream(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Optional[Tensor], moments: bool,
            fold: Callable[..., None], inv_temperature: float = 1.0, entropy: bool = False,
            logits_dtype: Optional[torch.dtype] = None) -> _Stream:
    # Under autocast torch.mm would hand the fold 16-bit tiles; the pass picks its own precision. No graph:
    # the pass's differentiable callers (the log-prob pass) have their own backward.
    with no_autocast(hidden.device), torch.no_grad():
        return _stream_tiles(hidden, weight, bias, targets, moments, fold, inv_temperature, entropy, logits_dtype)


def _stream_tiles(hidden, weight, bias, targets, moments, fold, inv_temperature, entropy, logits_dtype) -> _Stream:
    """One pass over ``weight`` in vocabulary chunks (outer) and row blocks (inner), folding every tile
    with ``fold`` (the torch or compiled ``softmax_tile``). Extra memory: ``hidden`` converted to the
    compute dtype and ``wbar`` (O(N*d)), plus one converted vocabulary chunk and one tile (bounded by
    BUDGETS); every state vector is O(N). Nothing in the loop reads device data back to the host."""
    dt = _compute_dtype(hidden, weight)
    n, d = hidden.shape
    v = weight.shape[0]
    tile = tiling(n, v, d, hidden.device.type)
    device = hidden.device
    rounded = logits_dtype is not None  # the inputs are then of that 16-bit dtype (checked by the caller)
    tensor_cores = (not rounded and hidden.is_cuda and hidden.dtype == weight.dtype
                    and hidden.dtype in (torch.bfloat16, torch.float16) and _mm_float32_out(hidden.device, hidden.dtype))
    h = hidden if tensor_cores or rounded else hidden.to(dt)
    run_max = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    run_sum = torch.zeros(n, dtype=torch.float64, device=device)
    bad_col = torch.full((n,), -1, dtype=torch.int64, device=device)
    picked = None if targets is None else torch.zeros(n, dtype=torch.float64, device=device)
    run_ent = torch.zeros(n, dtype=torch.float64, device=device) if entropy else None
    wbar = torch.zeros(n, d, dtype=dt, device=device) if moments else None
    alpha = torch.empty(n, dtype=dt, device=device) if moments else None
    # P @ W needs the converted chunk even when the logits come from the 16-bit operands.
    convert = moments or not (tensor_cores or rounded)
    buffers = _Buffers(tile, d, dt, weight, convert, not tensor_cores, logits_dtype)
    for v0 in range(0, v, tile.cols):
        v1 = min(v, v0 + tile.cols)
        w = weight[v0:v1]
        w_dt = buffers.chunk(w) if convert else None
        b = None if bias is None else bias[v0:v1].to(logits_dtype or dt)
        for r0 in range(0, n, tile.rows):
            rows = slice(r0, min(n, r0 + tile.rows))
            z = _tile_logits(h[rows], w, w_dt, b, tensor_cores, rounded, *buffers.tile(rows.stop - r0, v1 - v0))
            fold(z, v0, inv_temperature, run_max[rows], run_sum[rows], None if run_ent is None else run_ent[rows],
                 bad_col[rows], None if targets is None else targets[rows], None if picked is None else picked[rows],
                 None if alpha is None else alpha[rows])
            if moments:
                wbar[rows].mul_(alpha[rows].unsqueeze(1)).addmm_(z, w_dt)
    if moments:
        wbar.div_(run_sum.to(dt).unsqueeze(1))
    log_sum = torch.log(run_sum)
    # H = log s - u / s for the row's reference point m (lse = m + log s; H does not depend on m).
    ent = None if run_ent is None else log_sum - run_ent / run_sum
    return _Stream(run_max + log_sum, ent, picked, wbar, bad_col >= 0)


class NonFiniteLogitsError(ValueError):
    """A logit formed from hidden, weight and bias is NaN or +inf (``row`` and ``column`` locate the first),
    or no logit of ``row`` is finite (``column`` None: every entry is -inf)."""

    def __init__(self, row: int, column: Optional[int]):
        if column is None:
            message = (f"the logits computed from hidden, weight and bias have no finite entry at row {row} "
                       "(every vocabulary entry is -inf)")
        else:
            message = (f"the logits computed from hidden, weight and bias hold NaN or inf at row {row}, "
                       f"vocabulary entry {column} (NaN or inf in those inputs, or an overflow)")
        super().__init__(message)
        self.row, self.column = row, column


def non_finite_logits(bad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> NonFiniteLogitsError:
    """The error for the first row flagged in ``bad`` ([N] bool, known to hold a True): that row's logits
    are recomputed (one row, on this error path only) to name the vocabulary entry."""
    row = int(bad.nonzero()[0, 0])
    dt = _compute_dtype(hidden, weight)
    z = weight.to(dt) @ hidden[row].to(dt) + (0 if bias is None else bias.to(dt))
    found = (z.isnan() | (z == float("inf"))).nonzero()
    # A tile's product may round differently from this one (another summation order, TF32): where the
    # recomputed row is finite, its largest logit is the one that overflowed.
    column = int(found[0, 0]) if found.numel() else int(z.abs().argmax())
    return NonFiniteLogitsError(row, column)


def _fold(impl: str) -> Callable[..., None]:
    return _fold_torch if impl == "reference" else _fold_compiled


@dataclass(frozen=True)
class RowSoftmax:
    """What one log-prob pass gives per row (all ``[N]``): ``log_prob`` of the target, ``logsumexp`` and
    ``entropy`` of softmax(logits * inv_temperature), float64; ``bad`` (bool) flags rows whose logits
    hold NaN or +inf (their values are meaningless). A row whose logits are all -inf has logsumexp -inf."""

    log_prob: Tensor
    logsumexp: Tensor
    entropy: Tensor
    bad: Tensor


def log_prob_pass(impl: str, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                  inv_temperature: float = 1.0, logits_dtype: Optional[torch.dtype] = None) -> RowSoftmax:
    """The streaming pass behind :func:`token_log_prob_from_hidden` and :func:`mppm_ext.energy_from_hidden`,
    on checked inputs with the backend already chosen (no validation, no dispatch, no host synchronisation).
    Differentiable in hidden, weight and bias (:class:`_LogProbPass`: the backward streams over the
    vocabulary again, never holding ``[N, V]``).

    Args:
        impl: a backend name that :func:`mppm_ext._dispatch.choose` returned.
        hidden ``[N, d]``, weight ``[V, d]``, bias ``[V]`` or None, targets ``[N]`` int64 in ``[0, V)``;
        inv_temperature: the logits are multiplied by it inside the pass.
        logits_dtype: None (float32 tiles), or the 16-bit dtype of hidden, weight and bias: every logit is
            rounded to it, as an eager 16-bit ``lm_head`` rounds it (not with ``impl="triton"``).
    """
    log_prob, lse, entropy, bad = _LogProbPass.apply(hidden, weight, bias, targets, impl, inv_temperature,
                                                     logits_dtype)
    return RowSoftmax(log_prob, lse, entropy, bad)


def _log_prob_forward(impl, hidden, weight, bias, targets, inv_temperature, logits_dtype):
    if impl == "triton":
        from .triton import linear

        log_prob, lse, entropy = linear.token_log_prob_from_hidden(hidden, weight, bias, targets, inv_temperature)
        return log_prob, lse, entropy, torch.isnan(lse) | (lse == float("inf"))
    s = _stream(hidden, weight, bias, targets, moments=False, fold=_fold(impl), inv_temperature=inv_temperature,
                entropy=True, logits_dtype=logits_dtype)
    return s.picked - s.lse, s.lse, s.entropy, s.bad


class _LogProbPass(torch.autograd.Function):
    """The log-prob pass with its backward: for each tile the softmax p = exp(x - lse) is formed again
    from the saved lse (one more pass over W, no [N, V] storage) and
        dL/dx = g_lp (onehot(target) - p) + g_lse p - g_H p (x - lse + H),
    since d lse/dx = p and dH/dx = -p (log p + H); then dL/dz = inv_temperature dL/dx, and the tile's
    product gives dL/dhidden += dz W, dL/dW += dz^T hidden, dL/db += sum dz."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, impl, inv_temperature, logits_dtype):
        with torch.no_grad():
            log_prob, lse, entropy, bad = _log_prob_forward(impl, hidden, weight, bias, targets, inv_temperature,
                                                            logits_dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.inv_temperature, ctx.logits_dtype = inv_temperature, logits_dtype
        ctx.mark_non_differentiable(bad)
        return log_prob, lse, entropy, bad

    @staticmethod
    def backward(ctx, g_lp, g_lse, g_ent, _g_bad):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        grads = _log_prob_backward(hidden, weight, bias, targets, lse, entropy, g_lp, g_lse, g_ent,
                                   ctx.inv_temperature, ctx.needs_input_grad[:3], ctx.logits_dtype)
        return (*grads, None, None, None, None)


def softmax_grad(x: Tensor, lse: Tensor, entropy: Tensor, g_lp: Optional[Tensor], g_lse: Optional[Tensor],
                 g_ent: Optional[Tensor], target_col: Optional[Tensor], scale: float = 1.0) -> Tensor:
    """``scale`` * dL/dx for rows of scaled logits ``x [R, C]`` given the row's ``lse``, ``entropy`` and the
    upstream gradients ``[R]`` of log p (of column ``target_col`` [R], -1 where outside), lse and H (None
    counts as 0), in ``x``'s dtype (the row vectors are cast to it). Shared by the backward of every log-prob
    path (tiles of W h + b, rows of logits). With p = exp(x - lse) and d = x - lse:
    dL/dx = p * (g_lse - g_lp - g_ent * (d + H)) + g_lp at the target, each row's coefficients formed once
    (O(R)), so a tile costs two [R, C] temporaries and a few in-place passes."""
    col = (lambda v: v.to(x.dtype).unsqueeze(1))
    d = x - col(lse)
    p = torch.exp(d)
    coef = torch.zeros_like(lse, dtype=torch.float64)
    for g, sign in ((g_lse, 1.0), (g_lp, -1.0)):
        if g is not None:
            coef = coef + sign * g.double()
    if g_ent is not None:
        # -g_ent * (d + H) + coef; d = -inf where p = 0 (a -inf logit, or a row not read), zeroed first.
        grad = d.add_(col(entropy)).masked_fill_(p == 0, 0.0).mul_(col(-g_ent * scale)).add_(col(coef * scale))
        grad.mul_(p)
    else:
        grad = p.mul_(col(coef * scale))
    if g_lp is not None:
        inside = target_col >= 0
        grad.scatter_add_(1, target_col.clamp_min(0).unsqueeze(1),
                          torch.where(inside, g_lp * scale, 0.0).to(x.dtype).unsqueeze(1))
    return grad


def _log_prob_backward(hidden, weight, bias, targets, lse, entropy, g_lp, g_lse, g_ent, inv_temperature,
                       needs, logits_dtype=None) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    # The softmax is formed again from the logits the forward folded (rounded ones with logits_dtype, so
    # that p = exp(x - lse) sums to 1), in the compute dtype as the float32 reference's autograd forms it,
    # in kept buffers (:class:`_Buffers`; float64 tiles and a new tensor per tile took 0.85 s of a 1.0 s
    # forward + backward at N = 512, V = 50257, d = 768 on 2 threads, against 0.72 s for eager log_softmax).
    rounded = logits_dtype is not None
    dt = _compute_dtype(hidden, weight)
    n, d = hidden.shape
    v = weight.shape[0]
    tile = tiling(n, v, d, hidden.device.type)
    h = hidden.to(dt)
    buffers = _Buffers(tile, d, dt, weight, True, True, logits_dtype)
    g_lp, g_lse, g_ent = (None if g is None else g.double() for g in (g_lp, g_lse, g_ent))
    g_hidden = torch.zeros(n, d, dtype=dt, device=hidden.device) if needs[0] else None
    g_weight = torch.zeros(v, d, dtype=dt, device=hidden.device) if needs[1] else None
    g_bias = torch.zeros(v, dtype=torch.float64, device=hidden.device) if needs[2] and bias is not None else None
    with torch.no_grad(), no_autocast(hidden.device):
        for v0 in range(0, v, tile.cols):
            v1 = min(v, v0 + tile.cols)
            w = buffers.chunk(weight[v0:v1])
            b = None if bias is None else bias[v0:v1].to(logits_dtype or dt)
            for r0 in range(0, n, tile.rows):
                rows = slice(r0, min(n, r0 + tile.rows))
                out = buffers.tile(rows.stop - r0, v1 - v0)
                z = (_tile_logits(hidden[rows], weight[v0:v1], None, b, False, True, *out) if rounded else
                     _tile_logits(h[rows], w, w, b, False, False, *out))
                x = z.mul_(inv_temperature) if inv_temperature != 1.0 else z
                col = torch.where((targets[rows] >= v0) & (targets[rows] < v1), targets[rows] - v0, -1)
                pick = (lambda g: None if g is None else g[rows])
                gz = softmax_grad(x, lse[rows], entropy[rows], pick(g_lp), pick(g_lse), pick(g_ent), col,
                                  inv_temperature)
                if g_bias is not None:
                    g_bias[v0:v1] += gz.sum(0)
                if g_hidden is not None:
                    g_hidden[rows].addmm_(gz, w)
                if g_weight is not None:
                    g_weight[v0:v1].addmm_(gz.T, h[rows])
    return (None if g_hidden is None else g_hidden.to(hidden.dtype),
            None if g_weight is None else g_weight.to(weight.dtype),
            None if g_bias is None else g_bias.to(bias.dtype))


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

        lse, wbar = linear.softmax_moments(hidden, weight, bias, 1.0)
        return lse, wbar, ~(torch.isfinite(lse) & torch.isfinite(wbar).all(-1))
    s = _stream(hidden, weight, bias, None, moments=True, fold=_fold(impl))
    return s.lse, s.wbar.float(), s.bad


# ---------------------------------------------------------------------------------------------- public


def token_log_prob_from_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, *,
                               ignore_index: int = -100, temperature: float = 1.0, impl: str = "auto",
                               logits_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[n, targets[n]]`` for every row, streaming over
    the vocabulary. Differentiable in hidden, weight and bias (the backward streams over W again).

    Args:
        hidden: ``[N, d]`` float32, bfloat16 or float16 (float64 with ``impl="reference"``).
        weight: ``[V, d]``, the unembedding (same dtype rules as hidden; may differ from hidden's dtype).
        bias: ``[V]`` or None; -inf entries are legal (tokens that can never be predicted).
        targets: ``[N]`` int64 or int32, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: a target that is not scored: its row gives NaN (and is not read).
        temperature: > 0; the logits are divided by it inside the pass.
        impl: ``"auto"`` or a backend name (module docstring).
        logits_dtype: as in :func:`mppm_ext.energy_from_hidden`.

    Returns:
        ``[N]`` float64 log-probabilities (accumulated in float64 from float32 logits); -inf where the
        target's logit is -inf, NaN where the target is ``ignore_index``.

    Raises:
        TypeError / ValueError: wrong types, shapes, dtypes, devices, target ids or temperature (naming the
            argument); NonFiniteLogitsError (a ValueError) naming the row and vocabulary entry when a logit
            is NaN or +inf, or the row when none of its logits is finite.
        BackendUnavailableError: ``impl`` cannot run on these tensors.
    """
    device = check.unembedding_inputs(hidden, weight, bias, "N")
    targets = check.tensor(targets, "targets")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got shape {tuple(targets.shape)}")
    check.same_device({"hidden": hidden, "targets": targets})
    check.index_dtype(targets, "targets")
    inv_temperature = check.temperature(temperature)
    logits_dtype = check.logits_dtype(logits_dtype, hidden=hidden, weight=weight, bias=bias)
    impl = choose("token_log_prob_from_hidden", impl, backend_reasons(device, impl, logits_dtype))
    check.float_dtypes(impl == "reference", hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[0] == 0 or not check.has_data(hidden):  # nothing to compute, or shapes only (meta)
        return torch.zeros(hidden.shape[0], dtype=torch.float64, device=device)
    V = weight.shape[0]
    scored = targets != ignore_index
    # Ignored rows go through the pass as zero rows; out-of-range ids are clamped for it and reported after
    # it, so that the call reads device data back once (all checks share one synchronisation).
    rows = torch.where(scored.unsqueeze(1), hidden, 0)
    r = log_prob_pass(impl, rows, weight, bias, torch.where(scored, targets, 0).long().clamp(0, V - 1).contiguous(),
                      inv_temperature, logits_dtype)
    outside = scored & ((targets < 0) | (targets >= V))
    bad = scored & r.bad
    empty = scored & ~r.bad & (r.logsumexp == float("-inf"))
    if bool(torch.stack([outside.any(), bad.any(), empty.any()]).any()):
        check.token_range(targets, scored, V, "targets")
        if bool(bad.any()):
            raise non_finite_logits(bad, hidden, weight, bias)
        raise NonFiniteLogitsError(int(empty.nonzero()[0, 0]), None)
    return torch.where(scored, r.log_prob, float("nan"))


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
        as :func:`token_log_prob_from_hidden`; ValueError when an input requires grad (the pass builds no
        graph).
    """
    device = check.unembedding_inputs(hidden, weight, bias, "B")
    if torch.is_grad_enabled():
        for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if x is not None and x.requires_grad:
                raise ValueError(f"softmax_moments is not differentiable, and {name} requires grad: pass "
                                 f"{name}.detach() (the gradient of lse with respect to hidden is wbar itself)")
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
