"""mppm_ext.triton.cg.cg_solve against torch.linalg.solve in float64: odd sizes, dtypes, damping,
rank deficiency, non-convergence reported (not raised), determinism, bad arguments."""

import pytest
import torch

from triton_support import DEVICE, needs_triton

pytestmark = needs_triton


def system(B, m, d, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 100 * m + d)
    G = (torch.randn(B, m, d, generator=g) / d**0.5).to(dtype)
    rhs = torch.randn(B, m, generator=g)
    return G.to(DEVICE), rhs.to(DEVICE)


def solve(G, rhs, lam):
    G64 = G.double().cpu()
    A = G64 @ G64.transpose(1, 2) + lam * torch.eye(G.shape[1], dtype=torch.float64)
    return A, torch.linalg.solve(A, rhs.double().cpu())


def cg(*args, **kwargs):
    from mppm_ext.triton.cg import cg_solve

    return [t.cpu() for t in cg_solve(*args, **kwargs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,m,d", [(1, 1, 1), (3, 7, 33), (2, 17, 100), (1, 77, 130)])
def test_matches_direct_solve(dtype, B, m, d):
    G, rhs = system(B, m, d, dtype=dtype)
    lam = 0.1
    u, iters, residual = cg(G, rhs, lam, 1e-7, 4 * m)
    A, truth = solve(G, rhs, lam)
    assert u.dtype == torch.float32 and iters.dtype == torch.int32 and residual.dtype == torch.float32
    # A = G G^T + 0.1 I is well conditioned here (cond < 1e3): u carries tol * cond plus fp32 rounding.
    assert torch.allclose(u.double(), truth, rtol=1e-4, atol=1e-5), (u.double() - truth).abs().max()
    assert (residual <= 1e-6).all() and (iters <= 4 * m).all() and (iters >= 1).all()
    # The residual reported is the one of the u returned (up to u's rounding to fp32).
    recomputed = (rhs.double().cpu() - (A @ u.double().unsqueeze(-1)).squeeze(-1)).norm(dim=-1) / rhs.double().cpu().norm(dim=-1)
    assert torch.allclose(residual.double(), recomputed, atol=1e-6)


def test_near_duplicate_rows_need_damping():
    G, rhs = system(2, 9, 40)
    G[:, 1] = G[:, 0] * (1 + 1e-7)  # two targets with (numerically) the same direction
    damped_u, damped_iters, damped_res = cg(G, rhs, 1e-2, 1e-6, 50)
    _, truth = solve(G, rhs, 1e-2)
    assert (damped_res <= 1e-5).all() and torch.allclose(damped_u.double(), truth, rtol=1e-3, atol=1e-4)
    # Undamped, rhs has a component off the range of G G^T: CG cannot meet tol and says so.
    u, iters, residual = cg(G, rhs, 0.0, 1e-6, 50)
    assert (residual > 1e-3).all() and u.isfinite().all() and (iters <= 50).all()


def test_iteration_cap_is_reported():
    G, rhs = system(1, 60, 64)
    u, iters, residual = cg(G, rhs, 1e-4, 1e-10, 3)
    assert iters.tolist() == [3] and residual.item() > 1e-3
    u, iters, residual = cg(G, rhs, 1e-4, 1e-10, 0)
    assert iters.tolist() == [0] and torch.equal(u, torch.zeros_like(u)) and residual.item() == pytest.approx(1.0)


def test_zero_rhs():
    G, rhs = system(2, 5, 8)
    u, iters, residual = cg(G, torch.zeros_like(rhs), 0.5, 1e-6, 10)
    assert torch.equal(u, torch.zeros_like(u)) and iters.tolist() == [0, 0] and residual.tolist() == [0.0, 0.0]


def test_deterministic():
    G, rhs = system(4, 31, 65, dtype=torch.bfloat16)
    a, b = cg(G, rhs, 0.01, 1e-6, 100), cg(G, rhs, 0.01, 1e-6, 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_strided_G():
    G, rhs = system(2, 8, 30)
    wide = torch.randn(2, 8, 50, device=DEVICE)
    wide[..., 10:40] = G
    u, _, _ = cg(wide[..., 10:40], rhs, 0.1, 1e-8, 40)
    assert torch.allclose(u.double(), solve(G, rhs, 0.1)[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("G,rhs,kwargs,exc,match", [
    ((2, 3), (2,), {}, ValueError, r"G must be \[B, m, d\]"),
    ((2, 3, 4), (2, 4), {}, ValueError, r"rhs \[B, m\]"),
    ((1, 129, 4), (1, 129), {}, ValueError, "1 <= m <= 128"),
    ((1, 3, 4), (1, 3), {"lam": -1.0}, ValueError, "lam >= 0"),
    ((1, 3, 4), (1, 3), {"tol": 0.0}, ValueError, "tol > 0"),
    ((1, 3, 4), (1, 3), {"max_iter": -1}, ValueError, "max_iter >= 0"),
])
def test_bad_arguments(G, rhs, kwargs, exc, match):
    from mppm_ext.triton.cg import cg_solve

    args = {"lam": 0.1, "tol": 1e-6, "max_iter": 10, **kwargs}
    with pytest.raises(exc, match=match):
        cg_solve(torch.randn(*G, device=DEVICE), torch.randn(*rhs, device=DEVICE), **args)
    with pytest.raises(TypeError, match="G must be float32"):
        cg_solve(torch.ones(1, 2, 3, dtype=torch.int64, device=DEVICE), torch.ones(1, 2, device=DEVICE), 0.1, 1e-6, 5)
