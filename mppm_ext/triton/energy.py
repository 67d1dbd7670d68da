"""Triton ``energy`` parts: log p_t and K_t from logits and hidden states, one program per row (b, t).

Each program streams its logits row once: an online logsumexp (running max in fp32, running sum of
fp32 tile sums in fp64) plus one load of the target logit, then the step from state t-1 into state t.
The O(B*T) rest of ``energy`` (per-token quantities, per-sequence statistics) is the package's one
compiled finish (:func:`mppm_ext.parts.finish`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Elements per 16-byte load: the body of each row is read with 128-bit vector loads.
_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}
# 16 KiB of logits per tile for every dtype: with 8 warps (256 threads) that is four 16-byte loads in
# flight per thread per tile, enough to cover HBM latency on an H100 with one resident program per
# row (N = 32768 rows keep every SM busy).
_BLOCK_V = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
_NUM_WARPS = 8
# The step K_t reads 2*d elements per row (d is 1-4% of V): a modest tile is enough.
_BLOCK_D = 1024


@triton.jit
def _lse_fold(x, m, s):
    """Fold a tile of fp32 logits (-inf where absent) into the running max ``m`` (fp32 scalar) and
    running sum ``s`` = sum exp(x - m) (fp64 scalar)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    # While every element seen is absent (m_new = -inf), exp(-inf - -inf) would be NaN.
    pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - pivot).to(tl.float64) + tl.sum(tl.exp(x - pivot), 0).to(tl.float64)
    return m_new, s


@triton.jit
def _energy_kernel(hidden_ptr, logits_ptr, tokens_ptr, real_ptr, log_prob_ptr, kinetic_ptr,
                   T, V, D,
                   h_sb, h_st, l_sb, l_st, tok_sb, tok_st, real_sb, real_st,
                   VEC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # Every offset is int64: B*T*V passes 2^31 at T = 32768, V = 65536.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    nxt = tl.minimum(t + 1, T - 1)
    prv = tl.maximum(t - 1, 0)
    real_t = tl.load(real_ptr + b * real_sb + t * real_st) != 0
    real_next = (t + 1 < T) & (tl.load(real_ptr + b * real_sb + nxt * real_st) != 0)
    real_prev = (t > 0) & (tl.load(real_ptr + b * real_sb + prv * real_st) != 0)

    if real_t & real_next:
        lane = tl.arange(0, BLOCK_V)
        row_off = b * l_sb + t * l_st
        # Rows of an odd V start anywhere: a masked head up to the next 16-byte boundary, an unmasked
        # aligned body of whole tiles, a masked tail. Masks with a runtime bound would stop the
        # compiler from vectorising, so the body has none.
        head = tl.minimum((VEC - row_off % VEC) % VEC, V)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float64)
        x = tl.load(logits_ptr + row_off + lane, mask=lane < head, other=float("-inf")).to(tl.float32)
        # poison is 0 while every logit is finite and NaN otherwise (inf * 0 = NaN); -inf logits
        # would otherwise vanish from the logsumexp unnoticed.
        poison = tl.where(lane < head, x, 0.0) * 0.0
        m, s = _lse_fold(x, m, s)
        body = row_off + head
        n_full = (V - head) // BLOCK_V
        for i in range(n_full):
            start = tl.multiple_of(body + i * BLOCK_V, VEC)
            x = tl.load(logits_ptr + start + lane).to(tl.float32)
            poison += x * 0.0
            m, s = _lse_fold(x, m, s)
        tail = head + n_full * BLOCK_V
        in_tail = lane < V - tail
        x = tl.load(logits_ptr + row_off + tail + lane, mask=in_tail, other=float("-inf")).to(tl.float32)
        poison += tl.where(in_tail, x, 0.0) * 0.0
        m, s = _lse_fold(x, m, s)
        target = tl.load(tokens_ptr + b * tok_sb + nxt * tok_st).to(tl.int64)
        picked = tl.load(logits_ptr + row_off + target).to(tl.float32)
        # lse finished in fp64: the per-sequence statistics of log p are then as exact as the C++
        # kernel's (csrc/cpu/row_kernels.inc), which also sums in double.
        lp = picked.to(tl.float64) - m.to(tl.float64) - tl.log(s) + tl.sum(poison, 0).to(tl.float64)
        tl.store(log_prob_ptr + row, lp)
    else:
        tl.store(log_prob_ptr + row, float("nan"))

    if real_t & real_prev:
        lane_d = tl.arange(0, BLOCK_D)
        cur = hidden_ptr + b * h_sb + t * h_st
        before = hidden_ptr + b * h_sb + prv * h_st
        acc = tl.zeros([BLOCK_D], tl.float64)
        for start in range(0, D, BLOCK_D):
            offs = start + lane_d
            inside = offs < D
            diff = (tl.load(cur + offs, mask=inside, other=0.0).to(tl.float32)
                    - tl.load(before + offs, mask=inside, other=0.0).to(tl.float32))
            # Differences and squares in fp32, sums in fp64: d fp64 adds per row are ~4% of the fp32
            # exps of the row's logsumexp, and K_t then carries no summation error at d = 8192.
            acc += (diff * diff).to(tl.float64)
        tl.store(kinetic_ptr + row, 0.5 * tl.sum(acc, 0))
    else:
        tl.store(kinetic_ptr + row, float("nan"))


def energy_parts(hidden: Tensor, logits: Tensor, tokens: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    """log p_t and K_t, the two parts every output of :func:`mppm_ext.energy` is built from.

    Args:
        hidden: ``[B, T, d]`` float32, bfloat16 or float16, unit stride along d (any other strides).
        logits: ``[B, T, V]`` float32, bfloat16 or float16, unit stride along V; ``logits[:, t]``
            predicts token t+1.
        tokens: ``[B, T]`` int32 or int64; ids of real tokens lie in ``[0, V)`` (the caller checks).
        real: ``[B, T]`` bool, the tokens that take part (:func:`mppm_ext.parts.real_tokens`).

    Returns:
        ``(log_prob, kinetic)``, both ``[B, T]`` float64: log softmax(logits[b, t])[tokens[b, t+1]]
        where tokens t and t+1 are real, and 0.5 * ||hidden[b, t] - hidden[b, t-1]||^2 where tokens
        t-1 and t are real; NaN elsewhere.
        A used row holding NaN or inf gives a non-finite value there; the caller raises.
    """
    B, T, D = hidden.shape
    V = logits.shape[-1]
    if hidden.stride(-1) != 1 or logits.stride(-1) != 1:
        raise ValueError("hidden and logits need unit stride along their last dimension")
    log_prob = torch.empty(B, T, dtype=torch.float64, device=logits.device)
    kinetic = torch.empty_like(log_prob)
    real = real.view(torch.uint8) if real.dtype == torch.bool else (real != 0).view(torch.uint8)
    _energy_kernel[(B * T,)](
        hidden, logits, tokens, real, log_prob, kinetic,
        T, V, D,
        hidden.stride(0), hidden.stride(1), logits.stride(0), logits.stride(1),
        tokens.stride(0), tokens.stride(1), real.stride(0), real.stride(1),
        VEC=_VEC[logits.dtype], BLOCK_V=_BLOCK_V[logits.dtype], BLOCK_D=_BLOCK_D, num_warps=_NUM_WARPS,
    )
    return log_prob, kinetic
