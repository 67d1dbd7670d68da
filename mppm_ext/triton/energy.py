"""Triton ``energy`` parts: log p_t, K_t, the entropy H_t and logsumexp lse_t from logits and hidden
states, one program per row (b, t).

Each program streams its logits row once, for an online softmax with the entropy (in base 2, one state
a thread: running max in fp32, sums of fp32 tile sums in fp64; the contract's quantities of
:mod:`._online`, computed as the comment above ``_fold`` says) plus one load of the target logit, then takes the
step from state t-1 into state t. The O(B*T) rest of ``energy`` (per-token quantities, per-sequence
statistics) is the package's one compiled finish (:func:`mppm_ext.parts.finish`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _online as online
from . import _interpreted, on_device

# Elements per 16-byte load: the body of each row is read with 128-bit vector loads.
_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}
# 16 KiB of logits per tile for every dtype: with 8 warps (256 threads) that is four 16-byte loads in
# flight per thread per tile, enough to cover HBM latency on an H100 with one resident program per
# row (N = 32768 rows keep every SM busy).
_BLOCK_V = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
_NUM_WARPS = 8
# A tile is _ROWS loads of [lanes, VEC]: lanes = BLOCK_V / (_ROWS * VEC) slots of VEC contiguous
# elements, each slot read _ROWS times a tile, 16-byte loads interleaved across the slots (coalesced).
# With lanes = 32 * _NUM_WARPS every slot is one thread, so the tile's max and sums stay in the thread,
# and the online state is kept per slot (one rescale a thread and tile, no cross-warp reduction inside
# the loop; the slots are combined once a row). The _ROWS loads are separate 2-D tensors, not one
# [_ROWS, lanes, VEC] tensor: Triton 3.6 (the GPU machines') lays such a tensor out with the _ROWS axis
# across 4 threads, which put 24 SHFL in the bf16 body loop (11.1 SASS instructions per element, 128
# registers; 3.9 kept it in the thread). As 2-D tensors both versions keep every slot in one thread:
# 8.3 instructions per bf16 element with 3.6, 8.7 with 3.9, 64 registers (bench/triton_aot.py). The tail
# after the last whole tile is read in tiles of one vector a slot, a quarter of the width: a masked
# full-width tail tile would spend up to BLOCK_V - 1 exps on absent lanes (a 15% excess at V = 50257 in
# bf16), quarter tiles at most a quarter of that.
_ROWS = 4
# The step K_t reads 2*d elements per row (d is 1-4% of V): a modest tile is enough.
_BLOCK_D = 1024

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)

# The online softmax in base 2, per slot (the exp2 form of csrc/cuda/energy_cuda.cu's hot loop): with
# c2 = fl(inv_t * log2(e)) in fp32, a slot's state is
#     m  the largest y = fl(z * c2) seen (-inf while nothing but -inf was seen),
#     s  = sum 2^(z * c2 - m)                      (fp64, of fp32 sums of the slot's tile elements),
#     u  = sum 2^(z * c2 - m) * (z * c2 - m)       (fp64, likewise),
# so an element costs one FFMA (d = z * c2 - m), one ex2 and the FADD / FFMA of the two sums, where
# tl.exp(d * inv_t) cost a multiply, ex2 with its per-element range fix-up and an FSETP / FSEL for the
# entropy's 0 * -inf: 18.0 -> 8.8 SASS instructions per bf16 element on sm_90 (bench/triton_aot.py;
# bench/results/README.md, "Compiler reports").
# -inf logits: d = -inf, 2^d = 0, and d is clamped to -FLT_MAX in u (0 * -FLT_MAX = 0): a max, not a
# select. NaN or +inf make s NaN (a NaN d; a +inf max gives +inf - +inf), as before, so no per-element
# test is needed. Error against the float64 definition (the bound of energy_cuda.cu, same arithmetic):
# - ex2.approx.ftz.f32 has a relative error below 2^-22, and the terms are positive, so s carries at
#   most that plus the fp32 sums' (VEC * ROWS = 32 terms a slot and tile), <= ~5e-7 in lse and entropy;
#   results below 2^-126 flush to 0 (terms under e^-87 of the row's largest).
# - m cancels exactly: s, u and the max are taken against the same fp32 m (rescales and the slots'
#   combine in fp64 from the fp32 values).
# - fl(c2) = inv_t * log2(e) * k, |k - 1| <= 2^-24: the kernel computes the softmax of k * x (x = z *
#   inv_t); _finish corrects the logsumexp to first order, lse(x) = (lse(kx) + (k - 1) * H(kx)) / k, exact
#   for any constant offset of the logits; the entropy keeps an error of (k - 1) * Var_p[x] (<= 1.2e-7 at
#   inv_t = 1 and Var = 9). Logits beyond float32 after the scale (|z * inv_t| > 2.4e38) overflow z * c2,
#   as in the CUDA kernel: a row with such a positive logit reads as non-finite.


@triton.jit
def _sums(z, to, c2, FTZ: tl.constexpr):
    """Per slot, in fp32, of a tile ``[L, VEC]``: sum 2^d and sum 2^d * d for d = z * c2 - to."""
    d = z * c2 - to[:, None]
    p = online.ex2(d, FTZ)
    return tl.sum(p, 1), tl.sum(p * tl.maximum(d, -_FLT_MAX), 1)


@triton.jit
def _rescaled(m, s, u, m_new, to, ps, pu, FTZ: tl.constexpr):
    """The slots' states (m, s, u) moved to the new max m_new (``to``: its shift, 0 for -inf), plus a
    tile's fp32 sums (ps, pu) taken against ``to``."""
    # <= 0; -inf where the slot had seen nothing finite (s = u = 0), clamped so that 0 * gap is 0.
    gap = tl.maximum(m - to, -_FLT_MAX)
    a = online.ex2(gap, FTZ).to(tl.float64)
    return m_new, a * s + ps.to(tl.float64), a * (u + s * gap.to(tl.float64)) + pu.to(tl.float64)


@triton.jit
def _fold(z, m, s, u, c2, FTZ: tl.constexpr):
    """Fold a tile ``[L, VEC]`` of fp32 logits (-inf where absent) into the L slots' states ``[L]``."""
    m_new = tl.maximum(m, tl.max(z, 1) * c2)
    to = tl.where(m_new == float("-inf"), 0.0, m_new)
    ps, pu = _sums(z, to, c2, FTZ)
    return _rescaled(m, s, u, m_new, to, ps, pu, FTZ)


@triton.jit
def _fold4(z0, z1, z2, z3, m, s, u, c2, FTZ: tl.constexpr):
    """Fold the _ROWS = 4 loads ``[L, VEC]`` of a whole tile at once: one rescale of the slots' states."""
    m_new = tl.maximum(m, tl.max(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), 1) * c2)
    to = tl.where(m_new == float("-inf"), 0.0, m_new)
    s0, u0 = _sums(z0, to, c2, FTZ)
    s1, u1 = _sums(z1, to, c2, FTZ)
    s2, u2 = _sums(z2, to, c2, FTZ)
    s3, u3 = _sums(z3, to, c2, FTZ)
    return _rescaled(m, s, u, m_new, to, (s0 + s1) + (s2 + s3), (u0 + u1) + (u2 + u3), FTZ)


@triton.jit
def _finish(m, s, u, inv_t, c2):
    """``(lse, entropy)`` in fp64 of softmax(z * inv_t) from the slots' states ``[L]``."""
    top = tl.max(m, 0)
    to = tl.where(top == float("-inf"), 0.0, top)
    # Slots that saw nothing finite have s = u = 0 and add nothing (their gap taken as 0, not -inf).
    gap = tl.where(m == float("-inf"), 0.0, m.to(tl.float64) - to.to(tl.float64))
    a = tl.exp(gap * _LN2)
    total = tl.sum(a * s, 0)
    log_s = tl.log(total)
    entropy = log_s - _LN2 * tl.sum(a * (u + s * gap), 0) / total
    lse_k = to.to(tl.float64) * _LN2 + log_s
    k = c2.to(tl.float64) * _LN2 / inv_t
    # total = 0 (no finite logit): lse -inf, entropy NaN; a NaN total keeps lse NaN.
    lse = tl.where(total > 0, (lse_k + (k - 1.0) * entropy) / k, lse_k)
    return lse, entropy


@triton.jit
def _energy_kernel(hidden_ptr, logits_ptr, labels_ptr, real_ptr, scored_ptr, out_ptr,
                   T, V, D, plane, inv_temperature: tl.float64,
                   h_sb, h_st, l_sb, l_st, lab_sb, lab_st, real_sb, real_st, sc_sb, sc_st,
                   VEC: tl.constexpr, LANES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                   FTZ: tl.constexpr):
    # Every offset is int64: B*T*V passes 2^31 at T = 32768, V = 65536.
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    nxt = tl.minimum(t + 1, T - 1)
    prv = tl.maximum(t - 1, 0)
    real_t = tl.load(real_ptr + b * real_sb + t * real_st) != 0
    scored_next = (t + 1 < T) & (tl.load(scored_ptr + b * sc_sb + nxt * sc_st) != 0)
    real_prev = (t > 0) & (tl.load(real_ptr + b * real_sb + prv * real_st) != 0)
    log_prob_out = out_ptr + row
    kinetic_out = log_prob_out + plane
    entropy_out = kinetic_out + plane
    lse_out = entropy_out + plane

    if real_t:
        # fp64 from the argument in both modes: the interpreter passes a Python float, which would
        # otherwise enter the arithmetic as an fp32 constant.
        inv_t = tl.full([], inv_temperature, tl.float64)
        c2 = (inv_t * _LOG2E).to(tl.float32)
        row_off = b * l_sb + t * l_st
        # Rows of an odd V start anywhere: a masked head of less than one vector up to the next 16-byte
        # boundary (folded into slot 0), an unmasked aligned body of whole tiles, a masked tail in
        # quarter tiles. Masks with a runtime bound would stop the compiler from vectorising, so the
        # body has none.
        head = tl.minimum((VEC - row_off % VEC) % VEC, V)
        vec = tl.arange(0, VEC)
        z = tl.load(logits_ptr + row_off + vec, mask=vec < head, other=float("-inf")).to(tl.float32)
        m1, s1, u1 = _fold(z[None, :], tl.full([1], float("-inf"), tl.float32),
                           tl.zeros([1], tl.float64), tl.zeros([1], tl.float64), c2, FTZ)
        slot = tl.arange(0, LANES)
        m = tl.where(slot == 0, m1, float("-inf"))
        s = tl.where(slot == 0, s1, 0.0)
        u = tl.where(slot == 0, u1, 0.0)
        lane = slot[:, None] * VEC + vec[None, :]
        body = row_off + head
        tl.static_assert(ROWS == 4, "the body folds a whole tile as four loads (_fold4)")
        n_full = (V - head) // (ROWS * LANES * VEC)
        for i in range(n_full):
            at = logits_ptr + tl.multiple_of(body + i * (ROWS * LANES * VEC), VEC) + lane
            m, s, u = _fold4(tl.load(at).to(tl.float32), tl.load(at + LANES * VEC).to(tl.float32),
                             tl.load(at + 2 * LANES * VEC).to(tl.float32), tl.load(at + 3 * LANES * VEC).to(tl.float32),
                             m, s, u, c2, FTZ)
        for start in range(head + n_full * (ROWS * LANES * VEC), V, LANES * VEC):
            tail = tl.load(logits_ptr + row_off + start + lane, mask=start + lane < V, other=float("-inf"))
            m, s, u = _fold(tail.to(tl.float32), m, s, u, c2, FTZ)
        # lse finished in fp64: the per-sequence statistics of log p are then as exact as the C++
        # kernel's (csrc/cpu/row_kernels.inc), which also sums in double.
        lse, entropy = _finish(m, s, u, inv_t, c2)
        tl.store(entropy_out, entropy)
        tl.store(lse_out, lse)
        if scored_next:
            target = tl.load(labels_ptr + b * lab_sb + nxt * lab_st).to(tl.int64)
            picked = tl.load(logits_ptr + row_off + target).to(tl.float32)
            tl.store(log_prob_out, picked.to(tl.float64) * inv_t - lse)
        else:
            tl.store(log_prob_out, float("nan"))
    else:
        tl.store(log_prob_out, float("nan"))
        tl.store(entropy_out, float("nan"))
        tl.store(lse_out, float("nan"))

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
        tl.store(kinetic_out, 0.5 * tl.sum(acc, 0))
    else:
        tl.store(kinetic_out, float("nan"))


def _as_bytes(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def energy_parts(hidden: Tensor, logits: Tensor, tokens: Tensor, labels: Tensor, real: Tensor, scored: Tensor,
                 inv_temperature: float) -> Tensor:
    """The parts every output of :func:`mppm_ext.energy` is built from, ``[4, B, T]`` float64.

    Args:
        hidden: ``[B, T, d]`` float32, bfloat16 or float16, unit stride along d (any other strides).
        logits: ``[B, T, V]`` float32, bfloat16 or float16, unit stride along V; ``logits[:, t]``
            predicts token t+1. -inf is a legal logit (probability 0).
        tokens: ``[B, T]`` int32 or int64, the input ids. The kernel does not read them: ``real``
            already says which states are real, and the targets are ``labels``.
        labels: ``[B, T]`` int32 or int64; the ids of scored targets lie in ``[0, V)`` (the caller
            clamps them; others are not read). Pass ``tokens`` when there are no labels.
        real: ``[B, T]`` bool, the states that take part (mask and tokens).
        scored: ``[B, T]`` bool, the targets that are scored (mask and labels).
        inv_temperature: 1 / temperature, a positive finite float (used in float64).

    Returns:
        ``[4, B, T]`` float64 planes, NaN where undefined, with x = logits[b, t] * inv_temperature:
        0 log_prob = log softmax(x)[labels[b, t+1]] where state t is real and target t+1 scored
        (-inf where that logit is -inf); 1 kinetic = 0.5 * ||hidden[b, t] - hidden[b, t-1]||^2 where
        states t-1 and t are real; 2 entropy = -sum p log p and 3 logsumexp = logsumexp(x) at every
        real state. A read row holding NaN or +inf gives NaN in the planes it feeds (0, 2, 3); a row of
        only -inf gives logsumexp -inf (entropy and log_prob NaN). The caller reports both.
    """
    del tokens  # folded into ``real`` by the caller
    B, T, D = hidden.shape
    V = logits.shape[-1]
    if hidden.stride(-1) != 1 or logits.stride(-1) != 1:
        raise ValueError("hidden and logits need unit stride along their last dimension")
    out = torch.empty(4, B, T, dtype=torch.float64, device=logits.device)
    real, scored = _as_bytes(real), _as_bytes(scored)
    vec = _VEC[logits.dtype]
    with on_device(logits):
        _energy_kernel[(B * T,)](
            hidden, logits, labels, real, scored, out,
            T, V, D, B * T, float(inv_temperature),
            hidden.stride(0), hidden.stride(1), logits.stride(0), logits.stride(1),
            labels.stride(0), labels.stride(1), real.stride(0), real.stride(1), scored.stride(0), scored.stride(1),
            VEC=vec, LANES=_BLOCK_V[logits.dtype] // (_ROWS * vec), ROWS=_ROWS, BLOCK_D=_BLOCK_D,
            FTZ=not _interpreted(), num_warps=_NUM_WARPS,
        )
    return out
