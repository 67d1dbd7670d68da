"""The online softmax with the entropy, shared by the energy and fused-linear kernels (issue 12 contract).

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
