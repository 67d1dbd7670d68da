"""Triton ``energy`` parts: log p_t, K_t, the entropy H_t and logsumexp lse_t from logits and hidden
states, one program per row (b, t).

Each program streams its logits row once, for an online softmax with the entropy (:mod:`._online`:
running max in fp32, sums of fp32 tile sums in fp64) plus one load of the target logit, then takes the
step from state t-1 into state t. The O(B*T) rest of ``energy`` (per-token quantities, per-sequence
statistics) is the package's one compiled finish (:func:`mppm_ext.parts.finish`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _online as online
from . import on_device

# Elements per 16-byte load: the body of each row is read with 128-bit vector loads.
_VEC = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}
# 16 KiB of logits per tile for every dtype: with 8 warps (256 threads) that is four 16-byte loads in
# flight per thread per tile, enough to cover HBM latency on an H100 with one resident program per
# row (N = 32768 rows keep every SM busy).
_BLOCK_V = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
_NUM_WARPS = 8
# The tail after the last whole tile is read in tiles of a quarter of the width, one 16-byte load per
# thread: a masked full-width tail tile would spend up to BLOCK_V - 1 exps on absent lanes (a 15%
# excess at V = 50257 in bf16), quarter tiles at most a quarter of that.
_TAIL_SPLIT = 4
# The step K_t reads 2*d elements per row (d is 1-4% of V): a modest tile is enough.
_BLOCK_D = 1024


@triton.jit
def _fold(z, m, s, u, inv_t, inv_t32):
    """Fold a tile of fp32 logits (-inf where absent) into a row's state (m, s, u) of :mod:`._online`."""
    m_new = tl.maximum(m, tl.max(z, 0))
    to = online.shift(m_new)
    _, s, u = online.rescale(m, to, s, u, inv_t)
    p, pd = online.terms(z, to, inv_t32)
    return m_new, s + tl.sum(p, 0).to(tl.float64), u + tl.sum(pd, 0).to(tl.float64)


@triton.jit
def _energy_kernel(hidden_ptr, logits_ptr, labels_ptr, real_ptr, scored_ptr, out_ptr,
                   T, V, D, plane, inv_temperature: tl.float64,
                   h_sb, h_st, l_sb, l_st, lab_sb, lab_st, real_sb, real_st, sc_sb, sc_st,
                   VEC: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_TAIL: tl.constexpr, BLOCK_D: tl.constexpr):
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
        inv_t32 = inv_t.to(tl.float32)
        row_off = b * l_sb + t * l_st
        # Rows of an odd V start anywhere: a masked head of less than one vector up to the next 16-byte
        # boundary, an unmasked aligned body of whole tiles, a masked tail in quarter tiles. Masks with a
        # runtime bound would stop the compiler from vectorising, so the body has none.
        head = tl.minimum((VEC - row_off % VEC) % VEC, V)
        lane = tl.arange(0, VEC)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float64)
        u = tl.full([], 0.0, tl.float64)
        z = tl.load(logits_ptr + row_off + lane, mask=lane < head, other=float("-inf")).to(tl.float32)
        m, s, u = _fold(z, m, s, u, inv_t, inv_t32)
        body = row_off + head
        n_full = (V - head) // BLOCK_V
        lane = tl.arange(0, BLOCK_V)
        for i in range(n_full):
            start = tl.multiple_of(body + i * BLOCK_V, VEC)
            m, s, u = _fold(tl.load(logits_ptr + start + lane).to(tl.float32), m, s, u, inv_t, inv_t32)
        lane = tl.arange(0, BLOCK_TAIL)
        for start in range(head + n_full * BLOCK_V, V, BLOCK_TAIL):
            tail = tl.load(logits_ptr + row_off + start + lane, mask=start + lane < V, other=float("-inf"))
            m, s, u = _fold(tail.to(tl.float32), m, s, u, inv_t, inv_t32)
        # lse finished in fp64: the per-sequence statistics of log p are then as exact as the C++
        # kernel's (csrc/cpu/row_kernels.inc), which also sums in double.
        lse, entropy = online.finish(m, s, u, inv_t)
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
    block_v = _BLOCK_V[logits.dtype]
    with on_device(logits):
        _energy_kernel[(B * T,)](
            hidden, logits, labels, real, scored, out,
            T, V, D, B * T, float(inv_temperature),
            hidden.stride(0), hidden.stride(1), logits.stride(0), logits.stride(1),
            labels.stride(0), labels.stride(1), real.stride(0), real.stride(1), scored.stride(0), scored.stride(1),
            VEC=_VEC[logits.dtype], BLOCK_V=block_v, BLOCK_TAIL=max(1, block_v // _TAIL_SPLIT), BLOCK_D=_BLOCK_D,
            num_warps=_NUM_WARPS,
        )
    return out
