"""Triton fused-linear ops: log-probabilities and softmax moments of ``h W^T + b`` without ever
holding the ``[N, V]`` logits.

Both kernels walk vocabulary tiles of W, form a logits tile with ``tl.dot`` (fp32 accumulation) and
fold it into an online softmax per row, as flash attention does with its score tiles. The vocabulary
is split across programs when there are too few row blocks to fill the GPU; each split writes its
partial (running max, running sum, ...) and a second small kernel combines the splits of a row in a
fixed order, so results are bitwise reproducible (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dot import compute_dtype, dot_precision, tl_dtype

# Programs to aim for when choosing the vocabulary split: two waves on an H100's 132 SMs. A constant
# rather than the device's SM count, so that a given shape combines its partials the same way (and
# gives the same bits) on every device.
_TARGET_PROGRAMS = 264


def _row_block(n: int) -> int:
    """Rows per program: tl.dot needs at least 16; 128 x 128 x 64 bf16 is the usual Hopper GEMM tile
    of Triton's matmul configurations; a small n (steering) pads less."""
    return max(16, min(128, triton.next_power_of_2(n)))


def _config(n: int, vocab: int, compute: torch.dtype) -> dict:
    """Tile sizes, launch options and the vocabulary split for n rows."""
    from . import _interpreted

    block_n = _row_block(n)
    if compute == torch.float32:
        # fp32 operands multiply on CUDA cores (see _dot.dot_precision): smaller tiles keep them in
        # registers.
        block_n, block_v, block_d, warps, stages = min(block_n, 64), 64, 32, 4, 2
    else:
        block_v, block_d, warps, stages = 128, 64, 8, 3
    if _interpreted():
        # The interpreter's cost is per operation, not per element: wider vocabulary tiles (same code,
        # other constants) keep V = 50257 to a few seconds in the tests.
        block_v = 512
    row_blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(vocab, block_v)
    per_split = triton.cdiv(tiles, max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, max(row_blocks, 1)))))
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
                row_blocks=row_blocks, tiles_per_split=per_split, splits=triton.cdiv(tiles, per_split))


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, row_ok, v0, V, D, h_sn, w_sv,
                 HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_N, BLOCK_V]`` fp32 tile of h W^T + b for vocabulary entries v0.., -inf past V."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    lane_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + lane_d
        d_ok = offs_d < D
        h = tl.load(hidden_ptr + offs_n[:, None] * h_sn + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + offs_v[:, None] * w_sv + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.dot(h.to(COMPUTE), tl.trans(w.to(COMPUTE)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _softmax_fold(z, m, s):
    """Fold a logits tile ``z`` [R, C] (fp32, -inf where absent) into the running row max ``m`` [R]
    (fp32) and sum ``s`` [R] (fp64). Returns (m, s, alpha, p): alpha = exp(m_old - m_new) rescales
    whatever else was accumulated against m_old, p = exp(z - m_new)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    # Rows with nothing seen yet (m_new = -inf) would give exp(-inf - -inf) = NaN.
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - pivot)
    p = tl.exp(z - pivot[:, None])
    # The sums are fp64, within a tile too: a row whose other logits are 27 below its max adds
    # exp(-27) ~ 2e-12 to 1, which fp32 drops (log p would read exactly 0); per tile that is R*C fp64
    # adds against R*C*d multiply-adds of the tile's GEMM. Across ~400 tiles of V = 50257 fp64 also
    # keeps ~400 roundings out.
    s = s * alpha.to(tl.float64) + tl.sum(p.to(tl.float64), 1)
    return m_new, s, alpha, p


@triton.jit
def _token_log_prob_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, m_ptr, s_ptr, picked_ptr,
                           N, V, D, h_sn, w_sv, tiles_per_split,
                           HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    targets = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float64)
    picked = tl.zeros([BLOCK_N], tl.float32)
    # int64 tile indices: v * d passes 2^31 for V = 262144, d = 8192.
    first = split.to(tl.int64) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        v0 = tile * BLOCK_V
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, row_ok, v0, V, D, h_sn, w_sv,
                         HAS_BIAS, COMPUTE, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        # The target's logit: one column of one tile matches, every other term adds an exact 0.
        hit = (v0 + tl.arange(0, BLOCK_V))[None, :] == targets[:, None]
        picked += tl.sum(tl.where(hit, z, 0.0), 1)
        m, s, _, _ = _softmax_fold(z, m, s)
    out = split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(picked_ptr + out, picked, mask=row_ok)


@triton.jit
def _combine_lse(m_ptr, s_ptr, offs, row_ok, N, SPLITS: tl.constexpr):
    """(max, log-sum-exp in fp64) of the SPLITS partials of each row, combined in split order."""
    top = tl.load(m_ptr + offs, mask=row_ok, other=0.0)
    for k in range(1, SPLITS):
        top = tl.maximum(top, tl.load(m_ptr + k * N + offs, mask=row_ok, other=0.0))
    total = tl.zeros_like(top).to(tl.float64)
    for k in range(SPLITS):
        mk = tl.load(m_ptr + k * N + offs, mask=row_ok, other=0.0)
        sk = tl.load(s_ptr + k * N + offs, mask=row_ok, other=1.0)
        total += sk * tl.exp((mk - top).to(tl.float64))
    return top, top.to(tl.float64) + tl.log(total)


@triton.jit
def _token_log_prob_combine_kernel(m_ptr, s_ptr, picked_ptr, out_ptr, N,
                                   SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs < N
    _, lse = _combine_lse(m_ptr, s_ptr, offs, row_ok, N, SPLITS)
    picked = tl.zeros([BLOCK], tl.float64)
    for k in range(SPLITS):
        picked += tl.load(picked_ptr + k * N + offs, mask=row_ok, other=0.0).to(tl.float64)
    tl.store(out_ptr + offs, picked - lse, mask=row_ok)


def _operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Operands with unit last strides (the tiles are loaded along d), and the compute dtype. The public
    functions of mppm_ext.streaming have checked types, shapes, dtypes and devices."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    compute = compute_dtype(hidden, weight)
    return hidden, weight, (bias if bias is None else bias.contiguous()), compute


def token_log_prob_from_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor) -> Tensor:
    """log softmax(hidden @ weight.T + bias)[n, targets[n]], never holding the ``[N, V]`` logits.

    Args:
        hidden: ``[N, d]`` float32, bfloat16 or float16.
        weight: ``[V, d]`` float32, bfloat16 or float16 (the unembedding; may differ from hidden's
            dtype, in which case the products are taken in float32).
        bias: ``[V]`` or None.
        targets: ``[N]`` int64 (or int32) ids in ``[0, V)`` (the range is the caller's to check: it
            would cost a device sync here).

    Returns:
        ``[N]`` float64. Logits tiles accumulate in fp32 (bf16/fp16 operands on tensor cores; fp32
        operands in true fp32, not TF32); the logsumexp is summed and finished in fp64.
    """
    hidden, weight, bias, compute = _operands(hidden, weight, bias)
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(N, V, compute)
    splits = cfg["splits"]
    m = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    s = torch.empty(splits, N, dtype=torch.float64, device=hidden.device)
    picked = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    _token_log_prob_kernel[(cfg["row_blocks"], splits)](
        hidden, weight, hidden if bias is None else bias, targets.contiguous(), m, s, picked,
        N, V, D, hidden.stride(0), weight.stride(0), cfg["tiles_per_split"],
        HAS_BIAS=bias is not None, COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    out = torch.empty(N, dtype=torch.float64, device=hidden.device)
    block = 256
    _token_log_prob_combine_kernel[(triton.cdiv(N, block),)](m, s, picked, out, N, SPLITS=splits, BLOCK=block,
                                                             num_warps=4)
    return out


@triton.jit
def _softmax_moments_kernel(hidden_ptr, weight_ptr, bias_ptr, m_ptr, s_ptr, acc_ptr,
                            B, V, D, h_sb, w_sv, tiles_per_split,
                            HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_b < B
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float64)
    # This split's running sum of p @ W, [BLOCK_N, d], lives in a zeroed fp32 buffer of its own: d is
    # too wide for registers (d = 2048: 128 KiB per 16 rows), and the buffer stays in L2 while W
    # streams from HBM once. (For d <= 1024 a register-resident accumulator would save that traffic.)
    acc_rows = acc_ptr + (split.to(tl.int64) * B + offs_b)[:, None] * D
    lane_d = tl.arange(0, BLOCK_D)
    # int64 tile indices: v * d passes 2^31 for V = 262144, d = 8192.
    first = split.to(tl.int64) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(first, last):
        v0 = tile * BLOCK_V
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_b, row_ok, v0, V, D, h_sb, w_sv,
                         HAS_BIAS, COMPUTE, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
        m, s, alpha, p = _softmax_fold(z, m, s)
        offs_v = v0 + tl.arange(0, BLOCK_V)
        for k0 in range(0, D, BLOCK_D):
            offs_d = k0 + lane_d
            d_ok = offs_d < D
            # W tile again, now [BLOCK_V, BLOCK_D]: just read for the logits, so an L2 hit.
            w = tl.load(weight_ptr + offs_v[:, None] * w_sv + offs_d[None, :],
                        mask=(offs_v < V)[:, None] & d_ok[None, :], other=0.0)
            tile_mask = row_ok[:, None] & d_ok[None, :]
            acc = tl.load(acc_rows + offs_d[None, :], mask=tile_mask, other=0.0)
            # p stays fp32 (rounding p to bf16 would cost ~3 significant digits of wbar): fp32 "ieee" dot.
            acc = acc * alpha[:, None] + tl.dot(p, w.to(tl.float32), input_precision="ieee")
            tl.store(acc_rows + offs_d[None, :], acc, mask=tile_mask)
    out = split.to(tl.int64) * B + offs_b
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)


@triton.jit
def _softmax_moments_combine_kernel(m_ptr, s_ptr, acc_ptr, lse_ptr, wbar_ptr, B, D,
                                    SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per row b: the splits' partial sums of p @ W, rescaled to the common max, in split order.
    b = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    row_ok = one < 1
    top, lse = _combine_lse(m_ptr, s_ptr, b + one, row_ok, B, SPLITS)
    tl.store(lse_ptr + b + one, lse)
    lane_d = tl.arange(0, BLOCK_D)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + lane_d
        d_ok = offs_d < D
        total = tl.zeros([BLOCK_D], tl.float64)
        for k in range(SPLITS):
            scale = tl.exp((tl.load(m_ptr + k * B + b + one) - top).to(tl.float64) - lse + top.to(tl.float64))
            part = tl.load(acc_ptr + (k * B + b) * D + offs_d, mask=d_ok, other=0.0)
            total += part.to(tl.float64) * scale
        tl.store(wbar_ptr + b * D + offs_d, total.to(tl.float32), mask=d_ok)


def softmax_moments(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """logsumexp and softmax-weighted mean row of W, in one streaming pass over W.

    Args:
        hidden: ``[B, d]`` float32, bfloat16 or float16.
        weight: ``[V, d]`` float32, bfloat16 or float16.
        bias: ``[V]`` or None.

    Returns:
        ``(lse [B] float64, wbar [B, d] float32)`` with z = hidden @ weight.T + bias,
        lse = logsumexp(z) and wbar = softmax(z) @ weight (the gradient of lse with respect to h).
    """
    hidden, weight, bias, compute = _operands(hidden, weight, bias)
    B, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(B, V, compute)
    if compute != torch.float32:
        # The p @ W product is fp32 whatever the operands: keep its tiles as small as the fp32 path's.
        cfg.update(BLOCK_D=32, num_warps=4, num_stages=2)
    splits = cfg["splits"]
    m = torch.empty(splits, B, dtype=torch.float32, device=hidden.device)
    s = torch.empty(splits, B, dtype=torch.float64, device=hidden.device)
    acc = torch.zeros(splits, B, D, dtype=torch.float32, device=hidden.device)
    _softmax_moments_kernel[(cfg["row_blocks"], splits)](
        hidden, weight, hidden if bias is None else bias, m, s, acc,
        B, V, D, hidden.stride(0), weight.stride(0), cfg["tiles_per_split"],
        HAS_BIAS=bias is not None, COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    lse = torch.empty(B, dtype=torch.float64, device=hidden.device)
    wbar = torch.empty(B, D, dtype=torch.float32, device=hidden.device)
    _softmax_moments_combine_kernel[(B,)](m, s, acc, lse, wbar, B, D, SPLITS=splits, BLOCK_D=256, num_warps=4)
    return lse, wbar
