"""The online softmax with the entropy, shared by the fused-linear kernels (issue 12 contract), and the
flushing exp2 (:func:`ex2`) of the energy kernel, which keeps the same quantities per thread in base 2.

A partial state over some logits z of a row (raw, before the temperature; x = z * inv_t) is
    m  the largest z seen (fp32; -inf while nothing but -inf was seen),
    s  = sum exp((z - m) * inv_t)                (fp64),
    u  = sum exp((z - m) * inv_t) * (z - m)      (fp64),
so u is the contract's accumulator sum exp(x - m_x) * (x - m_x) divided by inv_t. Keeping m and u in
units of z saves a multiply per element and keeps lse = m * inv_t + log s free of the rounding of
z * inv_t in its largest term. Every term of u has the sign of z - m <= 0, so neither u's sums nor
H = log s - inv_t * u / s (two terms >= 0) cancel.

Non-finite logits: -inf adds exactly 0 to s and to u (0 * -inf is taken as 0). NaN or +inf makes s
NaN (exp(NaN) = NaN; a +inf max gives +inf - +inf = NaN), and with it every quantity of the row, which
is how the callers detect them. A row with no finite logit keeps s = 0: lse = -inf, H NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def shift(m):
    """The max to subtract: 0 while nothing finite was seen (m = -inf), where exp(-inf - -inf) is NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def rescale(m, to, s, u, inv_t):
    """``(a, s', u')``: the state (m, s, u) re-expressed against the larger max ``to`` (a shift() value),
    in fp64: a = exp((m - to) * inv_t), s' = a * s, u' = a * (u + s * (m - to)). While m = -inf, s and u
    are 0 and so stay (the gap is taken as 0 rather than the NaN of 0 * -inf)."""
    gap = tl.where(m == float("-inf"), 0.0, m.to(tl.float64) - to.to(tl.float64))
    a = tl.exp(gap * inv_t)
    return a, a * s, a * (u + s * gap)


@triton.jit
def terms(z, to, inv_t32):
    """Per element, in fp32: p = exp((z - to) * inv_t) and p * (z - to), the latter 0 where z = -inf."""
    d = z - to
    p = tl.exp(d * inv_t32)
    # The select is on d, not on the product: 0 * -inf is never formed.
    return p, p * tl.where(z == float("-inf"), 0.0, d)


@triton.jit
def finish(m, s, u, inv_t):
    """``(lse, entropy)`` in fp64 of softmax(z * inv_t) from a row's full state."""
    log_s = tl.log(s)
    return m.to(tl.float64) * inv_t + log_s, log_s - inv_t * u / s


@triton.jit
def ex2(x, FTZ: tl.constexpr):
    """2^x in fp32. FTZ: the one-instruction ``ex2.approx.ftz.f32`` (relative error < 2^-22, results
    below 2^-126 flushed to 0), where tl.exp2 adds a per-element range fix-up (an FSETP and two
    predicated FMULs on sm_90) to keep denormal results; the interpreter, which cannot run inline PTX,
    takes tl.exp2."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp2(x)
