"""Triton fused-linear ops: log-probabilities, entropies and softmax moments of
``(h W^T + b) / temperature`` without ever holding the ``[N, V]`` logits.

Both kernels walk vocabulary tiles of W, form a logits tile with ``tl.dot`` (fp32 accumulation) and
fold it into an online softmax per row (:mod:`._online`, with the entropy where asked for), as flash
attention does with its score tiles. The vocabulary is split across programs so that they fill whole waves of
the GPU (see ``_SMS``); each split writes its partial (running max, running sums, ...) and a
second small kernel combines the splits of a row in a fixed order, so results are bitwise
reproducible (no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _online as online
from . import on_device
from ._dot import compute_dtype, dot_precision, tl_dtype

# The vocabulary split. Programs of equal work run in waves of one program a SM (two with the paired
# tiles), so the split is sized in whole waves of an H100 SXM's / H200's 132 SMs: a constant rather than
# the device's count, so that a shape splits the same way (and gives the same bits) on every device.
# token_log_prob is compute-bound and aims for 16 waves: its last wave idles at most 1/16 of the SMs'
# time, where the former aim of 264 programs made N = 8192 (64 row blocks) 5 splits = 320 programs,
# 3 waves for 2.42 waves of work (24% of the time with SMs idle). More splits cost little there: each
# adds a program's start and four [N] partials, and a tile's operands are loaded the same either way.
# At N = 8192 it is 33 splits of 12 tiles, 2112 programs = 16 waves exactly. softmax_moments (a few
# rows, bound by reading W once) aims for 2 waves: each split adds a [B, d] fp32 accumulator to write
# and combine (B = 8, d = 2048: 64 KiB a split), so its aim is 264 programs whatever their occupancy.
_SMS = 132

# Tile shapes of the 16-bit token_log_prob pass (bench/results/triton-sm_90.txt and triton-3.6-sm_90.txt
# have their ptxas figures):
#   "wide":   128 x 128 logits, 8 warps (two warp groups of 64 rows), 3 stages: 190 registers (255 with
#             Triton 3.6, the GPU machines', no spill), 96 KiB of shared memory, one program a SM. Its
#             softmax (between one tile's HGMMAs and the next's) leaves the tensor cores idle.
#   "paired": 64 x 128 logits, 4 warps (one warp group), 3 stages: 253 registers (255 with 3.6), 72 KiB,
#             so two programs share a SM and the warp schedulers run one program's softmax under the
#             other's HGMMAs. It loads 1.5x the operand bytes a FLOP from L2: (64 + 128) / (64 x 128)
#             against (128 + 128) / (128 x 128).
# "wide" is the default, by an estimate the GPU session checks (bench/ops_linear.py times both): at
# 128 x 128 x 64 a SM needs 64 B a clock from L2 to keep its HGMMAs busy (32 KiB of operands a k-step
# against 2.1 MFLOP at ~4096 FLOP a clock), already more than the ~46 B a clock a SM of the ~12 TB/s
# quoted for an H100 SXM's L2 (132 SMs, 1.98 GHz), so the 1.5x bytes of "paired" should cost more than
# its hidden softmax saves: 64 exps and 128 fp64 conversions a thread and tile, at 16 a clock a SM, are
# ~2-3 k clocks against the tile's ~16 k clocks of HGMMA at d = 2048 (12-19%).
TILES = ("wide", "paired")


def _target_programs(moments: bool, per_sm: int) -> int:
    """Programs the vocabulary split aims for (the comment above _SMS says why)."""
    return 2 * _SMS if moments else 16 * _SMS * per_sm


def _row_block(n: int) -> int:
    """Rows per program: tl.dot needs at least 16; 128 x 128 x 64 bf16 is the usual Hopper GEMM tile
    of Triton's matmul configurations; a small n (steering) pads less."""
    return max(16, min(128, triton.next_power_of_2(n)))


def _config(n: int, vocab: int, compute: torch.dtype, moments: bool = False, tiles: str = "wide") -> dict:
    """Tile sizes, launch options and the vocabulary split for n rows (``moments``: for the
    softmax_moments kernel, which adds the fp32 product P @ W to each tile; ``tiles``: one of
    :data:`TILES`, which only the 16-bit token_log_prob pass reads)."""
    from . import _interpreted

    block_n = _row_block(n)
    per_sm = 1
    if compute == torch.float32:
        # fp32 operands multiply on CUDA cores (see _dot.dot_precision): smaller tiles keep them in
        # registers (254 a thread on sm_90, 4 warps: two programs a SM).
        block_n, block_v, block_d, warps, stages, per_sm = min(block_n, 64), 64, 32, 4, 2, 2
    elif moments:
        # P @ W is fp32 whatever the operands: tiles as small as the fp32 path's. BLOCK_V = 128 with
        # 4 warps spilled 400 B a thread on sm_90 (255 registers), 64 compiles to 227 without spill
        # (bench/results/triton-sm_90.txt).
        block_v, block_d, warps, stages = 64, 32, 4, 2
    elif tiles == "paired":
        block_n, block_v, block_d, warps, stages, per_sm = min(block_n, 64), 128, 64, 4, 3, 2
    else:
        # 3 stages of the k loop's operands: 3 x (128 x 64 + 128 x 64) bf16 = 96 KiB of shared memory,
        # so each HGMMA step's loads were issued two steps before it.
        block_v, block_d, warps, stages = 128, 64, 8, 3
    if _interpreted():
        # The interpreter's cost is per operation, not per element: wider vocabulary tiles (same code,
        # other constants) keep V = 50257 to a few seconds in the tests.
        block_v = 512
    row_blocks = triton.cdiv(n, block_n)
    tiles_v = triton.cdiv(vocab, block_v)
    target = _target_programs(moments, per_sm)
    per_split = triton.cdiv(tiles_v, max(1, min(tiles_v, triton.cdiv(target, max(row_blocks, 1)))))
    return dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
                row_blocks=row_blocks, tiles_per_split=per_split, splits=triton.cdiv(tiles_v, per_split))


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
def _softmax_fold(z, m, s, u, inv_t, inv_t32, ENTROPY: tl.constexpr):
    """Fold a logits tile ``z`` [R, C] (fp32, -inf where absent) into the rows' running state (m [R]
    fp32, s and u [R] fp64) of :mod:`._online`; u only when ENTROPY (else it is returned as given).
    Returns (m, s, u, alpha, p): alpha = exp((m_old - m_new) * inv_t) (fp32) rescales whatever else was
    accumulated against m_old, p = exp((z - m_new) * inv_t)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    to = online.shift(m_new)
    alpha, s_old, u_old = online.rescale(m, to, s, u, inv_t)
    p, pd = online.terms(z, to[:, None], inv_t32)
    # The sums are fp64, within a tile too: a row whose other logits are 27 below its max adds
    # exp(-27) ~ 2e-12 to 1, which fp32 drops (log p would read exactly 0); per tile that is R*C fp64
    # adds against R*C*d multiply-adds of the tile's GEMM. Across ~400 tiles of V = 50257 fp64 also
    # keeps ~400 roundings out.
    s = s_old + tl.sum(p.to(tl.float64), 1)
    if ENTROPY:
        u = u_old + tl.sum(pd.to(tl.float64), 1)
    return m_new, s, u, alpha.to(tl.float32), p


@triton.jit
def _token_log_prob_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, m_ptr, s_ptr, u_ptr, picked_ptr,
                           N, V, D, h_sn, w_sv, tiles_per_split, inv_temperature: tl.float64,
                           HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    # fp64 from the argument in both modes: the interpreter passes a Python float, which would
    # otherwise enter the arithmetic as an fp32 constant.
    inv_t = tl.full([], inv_temperature, tl.float64)
    inv_t32 = inv_t.to(tl.float32)
    targets = tl.load(targets_ptr + offs_n, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float64)
    u = tl.zeros([BLOCK_N], tl.float64)
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
        m, s, u, _, _ = _softmax_fold(z, m, s, u, inv_t, inv_t32, True)
    out = split.to(tl.int64) * N + offs_n
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(u_ptr + out, u, mask=row_ok)
    tl.store(picked_ptr + out, picked, mask=row_ok)


@triton.jit
def _top(m_ptr, offs, row_ok, N, SPLITS: tl.constexpr):
    """The shift (:func:`._online.shift`) of the largest of the SPLITS partial maxima of each row."""
    top = tl.load(m_ptr + offs, mask=row_ok, other=0.0)
    for k in range(1, SPLITS):
        top = tl.maximum(top, tl.load(m_ptr + k * N + offs, mask=row_ok, other=0.0))
    return online.shift(top)


@triton.jit
def _token_log_prob_combine_kernel(m_ptr, s_ptr, u_ptr, picked_ptr, out_ptr, N, inv_temperature: tl.float64,
                                   SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # The splits' states, rescaled to the row's max and added in split order (deterministic).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs < N
    inv_t = tl.full([], inv_temperature, tl.float64)
    top = _top(m_ptr, offs, row_ok, N, SPLITS)
    s = tl.zeros([BLOCK], tl.float64)
    u = tl.zeros([BLOCK], tl.float64)
    picked = tl.zeros([BLOCK], tl.float64)
    for k in range(SPLITS):
        _, sk, uk = online.rescale(tl.load(m_ptr + k * N + offs, mask=row_ok, other=0.0), top,
                                   tl.load(s_ptr + k * N + offs, mask=row_ok, other=1.0),
                                   tl.load(u_ptr + k * N + offs, mask=row_ok, other=0.0), inv_t)
        s += sk
        u += uk
        picked += tl.load(picked_ptr + k * N + offs, mask=row_ok, other=0.0).to(tl.float64)
    lse, entropy = online.finish(top, s, u, inv_t)
    tl.store(out_ptr + offs, picked * inv_t - lse, mask=row_ok)
    tl.store(out_ptr + N + offs, lse, mask=row_ok)
    tl.store(out_ptr + 2 * N + offs, entropy, mask=row_ok)


def _operands(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Operands with unit last strides (the tiles are loaded along d), and the compute dtype. The public
    functions of mppm_ext.streaming have checked types, shapes, dtypes and devices."""
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    compute = compute_dtype(hidden, weight)
    return hidden, weight, (bias if bias is None else bias.contiguous()), compute


def token_log_prob_from_hidden(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                               inv_temperature: float = 1.0, tiles: str = "wide") -> tuple[Tensor, Tensor, Tensor]:
    """log softmax(x)[n, targets[n]], logsumexp(x) and the entropy of softmax(x) for
    x = (hidden @ weight.T + bias) * inv_temperature, never holding the ``[N, V]`` logits.

    Args:
        hidden: ``[N, d]`` float32, bfloat16 or float16.
        weight: ``[V, d]`` float32, bfloat16 or float16 (the unembedding; may differ from hidden's
            dtype, in which case the products are taken in float32).
        bias: ``[V]`` or None; -inf entries are legal (those tokens have probability 0).
        targets: ``[N]`` int64 (or int32) ids in ``[0, V)`` (the range is the caller's to check: it
            would cost a device sync here).
        inv_temperature: 1 / temperature, a positive finite float (used in float64).
        tiles: the 16-bit pass's tile shape, one of :data:`TILES` (the comment above it says which
            is which); mppm_ext.streaming takes the default, the GPU session's bench both.

    Returns:
        ``(log_prob [N], logsumexp [N], entropy [N])``, float64. Logits tiles accumulate in fp32
        (bf16/fp16 operands on tensor cores; fp32 operands in true fp32, not TF32); the softmax sums
        are taken and finished in fp64. log_prob is -inf where the target's logit is -inf. A row whose
        logits hold NaN or +inf gets NaN in all three; a row with no finite logit gets logsumexp -inf.
    """
    if tiles not in TILES:
        raise ValueError(f"tiles must be one of {TILES}, got {tiles!r}")
    hidden, weight, bias, compute = _operands(hidden, weight, bias)
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(N, V, compute, tiles=tiles)
    splits = cfg["splits"]
    m = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    s = torch.empty(splits, N, dtype=torch.float64, device=hidden.device)
    u = torch.empty_like(s)
    picked = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    out = torch.empty(3, N, dtype=torch.float64, device=hidden.device)
    block = 256
    with on_device(hidden):
        _token_log_prob_kernel[(cfg["row_blocks"], splits)](
            hidden, weight, hidden if bias is None else bias, targets.contiguous(), m, s, u, picked,
            N, V, D, hidden.stride(0), weight.stride(0), cfg["tiles_per_split"], float(inv_temperature),
            HAS_BIAS=bias is not None, COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _token_log_prob_combine_kernel[(triton.cdiv(N, block),)](m, s, u, picked, out, N, float(inv_temperature),
                                                                 SPLITS=splits, BLOCK=block, num_warps=4)
    return out[0], out[1], out[2]


@triton.jit
def _softmax_moments_kernel(hidden_ptr, weight_ptr, bias_ptr, m_ptr, s_ptr, acc_ptr,
                            B, V, D, h_sb, w_sv, tiles_per_split, inv_temperature: tl.float64,
                            HAS_BIAS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(1)
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_b < B
    inv_t = tl.full([], inv_temperature, tl.float64)
    inv_t32 = inv_t.to(tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float64)
    no_u = tl.zeros([BLOCK_N], tl.float64)  # the moments need no entropy
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
        m, s, _, alpha, p = _softmax_fold(z, m, s, no_u, inv_t, inv_t32, False)
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
def _softmax_moments_combine_kernel(m_ptr, s_ptr, acc_ptr, lse_ptr, wbar_ptr, B, D, inv_temperature: tl.float64,
                                    SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per row b: the splits' partial sums of p @ W, rescaled to the common max, in split order.
    b = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    row_ok = one < 1
    inv_t = tl.full([], inv_temperature, tl.float64)
    zero = tl.zeros([1], tl.float64)
    top = _top(m_ptr, b + one, row_ok, B, SPLITS)
    total = tl.zeros([1], tl.float64)
    for k in range(SPLITS):
        _, sk, _ = online.rescale(tl.load(m_ptr + k * B + b + one), top, tl.load(s_ptr + k * B + b + one), zero,
                                  inv_t)
        total += sk
    lse, _ = online.finish(top, total, zero, inv_t)
    tl.store(lse_ptr + b + one, lse)
    lane_d = tl.arange(0, BLOCK_D)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + lane_d
        d_ok = offs_d < D
        wbar = tl.zeros([BLOCK_D], tl.float64)
        for k in range(SPLITS):
            a, _, _ = online.rescale(tl.load(m_ptr + k * B + b + one), top, zero, zero, inv_t)
            part = tl.load(acc_ptr + (k * B + b) * D + offs_d, mask=d_ok, other=0.0)
            wbar += part.to(tl.float64) * (a / total)
        tl.store(wbar_ptr + b * D + offs_d, wbar.to(tl.float32), mask=d_ok)


def softmax_moments(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                    inv_temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """logsumexp and softmax-weighted mean row of W, in one streaming pass over W.

    Args:
        hidden: ``[B, d]`` float32, bfloat16 or float16.
        weight: ``[V, d]`` float32, bfloat16 or float16.
        bias: ``[V]`` or None; -inf entries are legal (probability 0).
        inv_temperature: 1 / temperature, a positive finite float (used in float64).

    Returns:
        ``(lse [B] float64, wbar [B, d] float32)`` with x = (hidden @ weight.T + bias) * inv_temperature,
        lse = logsumexp(x) and wbar = softmax(x) @ weight (the gradient of lse with respect to h is
        inv_temperature * wbar). A row whose logits hold NaN or +inf gets a NaN lse; a row with no
        finite logit gets lse = -inf (and a NaN wbar).
    """
    hidden, weight, bias, compute = _operands(hidden, weight, bias)
    B, D = hidden.shape
    V = weight.shape[0]
    cfg = _config(B, V, compute, moments=True)
    splits = cfg["splits"]
    m = torch.empty(splits, B, dtype=torch.float32, device=hidden.device)
    s = torch.empty(splits, B, dtype=torch.float64, device=hidden.device)
    acc = torch.zeros(splits, B, D, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(B, dtype=torch.float64, device=hidden.device)
    wbar = torch.empty(B, D, dtype=torch.float32, device=hidden.device)
    with on_device(hidden):
        _softmax_moments_kernel[(cfg["row_blocks"], splits)](
            hidden, weight, hidden if bias is None else bias, m, s, acc,
            B, V, D, hidden.stride(0), weight.stride(0), cfg["tiles_per_split"], float(inv_temperature),
            HAS_BIAS=bias is not None, COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute),
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        _softmax_moments_combine_kernel[(B,)](m, s, acc, lse, wbar, B, D, float(inv_temperature), SPLITS=splits,
                                              BLOCK_D=256, num_warps=4)
    return lse, wbar
