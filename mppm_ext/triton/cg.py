"""Triton batched conjugate gradient for the steering solve (G G^T + lam I) u = rhs, one program per
batch row.

The m x m Gram matrix is formed once with tl.dot over d (one read of G, fp32 accumulation) and kept
in registers; the iterations then cost O(m^2) each and run in float64, so ill-conditioned systems
(near-duplicate target rows) lose nothing to fp32 rounding in the recurrences. Matrix-free CG would
read G twice per iteration instead: 2 * iters * m * d bytes against m * d once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import on_device
from ._dot import compute_dtype, dot_precision, tl_dtype

#: Largest m: the padded Gram tile (MAX_TARGETS^2 fp32) is held by one program's registers.
MAX_TARGETS = 128
#: d per step of the Gram dot: M_PAD x 64 operands.
BLOCK_D = 64


def launch_config(m: int) -> tuple[int, dict]:
    """``(M_PAD, launch options)`` for m targets: the Gram tile padded to a power of two >= 16 (tl.dot's
    least). Its fp64 copy takes 2 * M_PAD^2 / threads registers a thread (sm_90, bench/results/
    triton-sm_90.txt and triton-3.6-sm_90.txt): at M_PAD = 64, 4 warps spilled 632 bytes a thread, 8 warps
    none (176 registers). At M_PAD = 128 every shape spills; 8 warps with the register cap lifted to 255
    is the one good with both compilers, in spill bytes a program: Triton 3.6 (the GPU machines') 256 threads x
    3588 B of spill loads, where without the cap its ptxas took 128 registers and loaded 12744 B a
    thread; Triton 3.9 3240 B (3332 uncapped). 16 warps at 128 registers were better with 3.6 (512 x
    1028 B) and worse with 3.9 (512 x 4348 B)."""
    m_pad = max(16, triton.next_power_of_2(m))
    if m_pad <= 32:
        return m_pad, dict(num_warps=4)
    return m_pad, dict(num_warps=8) if m_pad <= 64 else dict(num_warps=8, maxnreg=255)


@triton.jit
def _cg_kernel(g_ptr, rhs_ptr, u_ptr, iters_ptr, residual_ptr,
               m, D, g_sb, g_sm, rhs_sb, lam: tl.float64, tol2: tl.float64, max_iter,
               COMPUTE: tl.constexpr, PRECISION: tl.constexpr, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    # fp64 scalars in both modes (the interpreter passes Python floats, which would otherwise enter
    # the arithmetic as fp32 constants): in fp32, tol2 = tol**2 is 0 for tol below ~1e-19.
    lam = tl.full([], lam, tl.float64)
    tol2 = tl.full([], tol2, tl.float64)
    rows = tl.arange(0, M_PAD)
    row_ok = rows < m
    gram = tl.zeros([M_PAD, M_PAD], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        g = tl.load(g_ptr + b * g_sb + rows[:, None] * g_sm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(COMPUTE)
        gram = tl.dot(g, tl.trans(g), gram, input_precision=PRECISION)
    # Padded rows and columns stay zero (so do rhs, u, r, p there): they never enter the sums.
    diagonal = (rows[:, None] == rows[None, :]) & row_ok[:, None]
    a = gram.to(tl.float64) + tl.where(diagonal, lam, 0.0)
    rhs = tl.load(rhs_ptr + b * rhs_sb + rows, mask=row_ok, other=0.0).to(tl.float64)
    u = tl.zeros([M_PAD], dtype=tl.float64)
    r = rhs
    p = rhs
    rr = tl.sum(r * r, 0)
    stop = rr * tol2
    it = tl.full([], 0, tl.int32)
    curvature = rr + 1.0  # > 0 until p^T A p vanishes (singular A, rhs off its range): then stop
    while (it < max_iter) & (rr > stop) & (curvature > 0):
        ap = tl.sum(a * p[None, :], 1)
        curvature = tl.sum(p * ap, 0)
        step = tl.where(curvature > 0, rr / curvature, 0.0)
        u += step * p
        r -= step * ap
        rr_new = tl.sum(r * r, 0)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    # The residual reported is recomputed from u, not the recurrence's (which drifts).
    residual = rhs - tl.sum(a * u[None, :], 1)
    norm2 = tl.sum(rhs * rhs, 0)
    rel = tl.where(norm2 > 0, tl.sqrt(tl.sum(residual * residual, 0) / tl.where(norm2 > 0, norm2, 1.0)), 0.0)
    tl.store(u_ptr + b * m + rows, u.to(tl.float32), mask=row_ok)
    tl.store(iters_ptr + b, it)
    tl.store(residual_ptr + b, rel.to(tl.float32))


def cg_solve(G: Tensor, rhs: Tensor, lam: float, tol: float, max_iter: int) -> tuple[Tensor, Tensor, Tensor]:
    """Solve (G[b] G[b]^T + lam I) u[b] = rhs[b] for every b by conjugate gradient.

    Args:
        G: ``[B, m, d]`` float32, bfloat16 or float16 (steering: rows W[y_i] - wbar), unit stride along
            d; m <= ``MAX_TARGETS``.
        rhs: ``[B, m]`` floating.
        lam: Tikhonov damping >= 0 (> 0 makes rank-deficient G solvable).
        tol: stop when ||rhs - A u|| <= tol * ||rhs|| in the CG recurrence.
        max_iter: iteration cap >= 0 (CG on m unknowns converges in at most m steps in exact arithmetic).

    Returns:
        ``(u [B, m] float32, iters [B] int32, rel_residual [B] float32)``; rel_residual is
        ||rhs - A u|| / ||rhs|| recomputed from u (0 where rhs = 0). A row that did not converge
        says so through iters == max_iter and its residual; nothing is raised for it.
    """
    if G.dim() != 3 or rhs.shape != G.shape[:2]:
        raise ValueError(f"G must be [B, m, d] and rhs [B, m]; got G {tuple(G.shape)} and rhs {tuple(rhs.shape)}")
    if G.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not rhs.is_floating_point():
        raise TypeError(f"G must be float32, bfloat16 or float16 and rhs floating; got {G.dtype} and {rhs.dtype}")
    B, m, d = G.shape
    if not 1 <= m <= MAX_TARGETS or d < 1:
        raise ValueError(f"need 1 <= m <= {MAX_TARGETS} targets and d >= 1, got m={m}, d={d}")
    if not (lam >= 0 and tol > 0 and max_iter >= 0):
        raise ValueError(f"need lam >= 0, tol > 0, max_iter >= 0; got lam={lam}, tol={tol}, max_iter={max_iter}")
    G = G if G.stride(-1) == 1 else G.contiguous()
    rhs = rhs.contiguous()
    compute = compute_dtype(G)
    u = torch.empty(B, m, dtype=torch.float32, device=G.device)
    iters = torch.empty(B, dtype=torch.int32, device=G.device)
    residual = torch.empty(B, dtype=torch.float32, device=G.device)
    m_pad, options = launch_config(m)
    with on_device(G):
        _cg_kernel[(B,)](G, rhs, u, iters, residual, m, d, G.stride(0), G.stride(1), rhs.stride(0),
                         float(lam), float(tol) ** 2, int(max_iter),
                         COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute), M_PAD=m_pad, BLOCK_D=BLOCK_D,
                         **options)
    return u, iters, residual
