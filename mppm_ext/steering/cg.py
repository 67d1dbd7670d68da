"""Batched conjugate gradients on the m x m systems (G G^T + lam I) u = r of the steering solve.

Each batch row b has its own Jacobian in the structured form G = rows - 1 center^T (rows [m, d], center
[d]; center None means G = rows): for the final state rows are W[y_i] and center is W^T softmax(z). The
products G v and G^T u then cost O(m d) and never touch the unembedding W, so an iteration is
2 m d multiply-adds whatever V is.

Backends: "reference" (torch, float64, any device), "cpp" / "cuda" (mppm_ext._C, float32 rows with
float64 accumulation; see csrc/include/mppm/cg.h) and "triton" (``mppm_ext.triton.cg``, the Gram
matrix formed once, iterations in float64). All return the same :class:`CGResult`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class CGResult:
    """Per batch row: solution ``u`` [B, m] float64, ``iters`` [B] int64, relative residual
    ``||r - A u|| / ||r||`` [B] float64 (0 when r = 0) and ``converged`` [B] bool (residual <= tol)."""

    u: Tensor
    iters: Tensor
    residual: Tensor
    converged: Tensor


def apply_j(rows: Tensor, center: Optional[Tensor], v: Tensor) -> Tensor:
    """G v: [B, m] from rows [B, m, d], center [B, d] or None and v [B, d] (in v's dtype)."""
    out = torch.einsum("bmd,bd->bm", rows.to(v.dtype), v)
    if center is not None:
        out = out - (center.to(v.dtype) * v).sum(-1, keepdim=True)
    return out


def apply_jt(rows: Tensor, center: Optional[Tensor], u: Tensor) -> Tensor:
    """G^T u: [B, d] from rows [B, m, d], center [B, d] or None and u [B, m] (in u's dtype)."""
    out = torch.einsum("bmd,bm->bd", rows.to(u.dtype), u)
    if center is not None:
        out = out - center.to(u.dtype) * u.sum(-1, keepdim=True)
    return out


def _normal_matvec(rows, center, lam, p):
    return apply_j(rows, center, apply_jt(rows, center, p)) + lam * p


def cg_torch(rows: Tensor, center: Optional[Tensor], rhs: Tensor, lam: float, tol: float, max_iter: int) -> CGResult:
    """The reference CG, in float64 on rows' device. Rows stop updating once their relative residual
    is <= tol; a row whose search direction has p^T A p <= 0 (A singular along it, lam = 0) stops
    there, not converged. Always ``max_iter`` iterations, finished rows masked: stopping early would read
    the residuals back to the host every iteration (a synchronisation per iteration on a GPU)."""
    rows = rows.double()
    center = None if center is None else center.double()
    b = rhs.double()
    B, m = b.shape
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1)
    b_norm = rr.sqrt()
    iters = torch.zeros(B, dtype=torch.int64, device=b.device)
    active = rr.sqrt() > tol * b_norm
    for _ in range(max_iter):
        ap = _normal_matvec(rows, center, lam, p)
        pap = (p * ap).sum(-1)
        active = active & (pap > 0)
        alpha = torch.where(active, rr / torch.where(active, pap, 1.0), 0.0)
        u = u + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rr_new = (r * r).sum(-1)
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        p = torch.where(active[:, None], r + beta[:, None] * p, p)
        iters = iters + active.long()
        rr = torch.where(active, rr_new, rr)
        active = active & (rr.sqrt() > tol * b_norm)
    # The residual is recomputed from u rather than trusted from the recurrence, which drifts.
    true_r = b - _normal_matvec(rows, center, lam, u)
    residual = torch.where(b_norm > 0, true_r.norm(dim=-1) / torch.where(b_norm > 0, b_norm, 1.0), 0.0)
    return CGResult(u, iters, residual, residual <= tol)


def closed_form(rows: Tensor, center: Optional[Tensor], rhs: Tensor, lam: float, tol: float) -> CGResult:
    """m = 1: u = r / (||g||^2 + lam). A row with ||g||^2 + lam = 0 (J = 0) gets u = 0, not converged."""
    g = rows[:, 0].double() - (0.0 if center is None else center.double())
    a = (g * g).sum(-1) + lam
    ok = a > 0
    u = torch.where(ok, rhs[:, 0].double() / torch.where(ok, a, 1.0), 0.0)[:, None]
    b_norm = rhs[:, 0].double().abs()
    residual = torch.where(b_norm > 0, (rhs[:, 0].double() - a * u[:, 0]).abs() / torch.where(b_norm > 0, b_norm, 1.0),
                           0.0)
    zeros = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
    return CGResult(u, zeros, residual, residual <= tol)


def cg_compiled(rows: Tensor, center: Optional[Tensor], rhs: Tensor, lam: float, tol: float,
                max_iter: int) -> CGResult:
    """The C++ (CPU) or CUDA kernel of mppm_ext._C on the device of ``rows``."""
    from ..ops import cg_solve_op

    u, iters, residual, converged = cg_solve_op(rows.float().contiguous(),
                                                None if center is None else center.float().contiguous(),
                                                rhs.double().contiguous(), float(lam), float(tol), int(max_iter))
    return CGResult(u, iters, residual, converged.bool())


def triton_reason(m: int) -> Optional[str]:
    """Why the Triton CG cannot solve systems of ``m`` targets, or None when it can."""
    try:
        from ..triton import cg
    except ImportError as exc:
        return f"the Triton CG is not importable ({exc})"
    if m > cg.MAX_TARGETS:
        return f"the Triton CG holds at most {cg.MAX_TARGETS} targets in registers, got m = {m}"
    return None


def cg_triton(rows: Tensor, center: Optional[Tensor], rhs: Tensor, lam: float, tol: float,
              max_iter: int) -> CGResult:
    """The Triton kernel (m <= its MAX_TARGETS, checked when the backend was chosen): it forms the m x m
    Gram matrix once, so it takes G explicitly (one [B, m, d] tensor, the size of ``rows``)."""
    from ..triton import cg as kernels

    g = rows.float() if center is None else rows.float() - center.float().unsqueeze(1)
    u, iters, residual = kernels.cg_solve(g, rhs, lam, tol, max_iter)
    residual = residual.double()
    return CGResult(u.double(), iters.long(), residual, residual <= tol)


def solve(rows: Tensor, center: Optional[Tensor], rhs: Tensor, *, lam: float, tol: float, max_iter: int,
          backend: str) -> CGResult:
    """Solve (G G^T + lam I) u = rhs per batch row with the named backend; m = 1 always uses the closed form."""
    if rows.shape[1] == 1:
        return closed_form(rows, center, rhs, lam, tol)
    if backend in ("cpp", "cuda"):
        return cg_compiled(rows, center, rhs, lam, tol, max_iter)
    if backend == "triton":
        return cg_triton(rows, center, rhs, lam, tol, max_iter)
    return cg_torch(rows, center, rhs, lam, tol, max_iter)
