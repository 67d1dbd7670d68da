"""steer_step against the float64 solution (reference.steer_direction), its invariants, and the solver's
reliability: non-convergence reported, rank-deficient J with lam, infeasible requests."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mppm_ext
from helpers import assert_close
from mppm_ext import reference
from mppm_ext import ops
from mppm_ext.steering import cg
from steer_helpers import log_prob64, steer_inputs, streaming_backends

BACKENDS = streaming_backends()
#: Backend of the tests that are not parametrized over backends: the best one that runs here.
IMPL = BACKENDS[-1]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("V", [17, 997])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("B", [1, 7])
def test_linear_step_matches_float64(B, m, V, dtype, impl):
    d = 33
    hidden, weight, targets, delta, bias = steer_inputs(B, m, d, V, dtype=dtype, bias=V == 997)
    # 16 of 17 tokens: the rows are nearly dependent (sum_j p_j g_j = 0 over the vocabulary, so they are
    # dependent up to the left-out token's probability; cond(J J^T) reaches 5e6, where float32 rounding of J is
    # amplified by a different factor in each solve), which lam bounds.
    lam = 0.1 if 2 * m > V else 0.0
    out = mppm_ext.steer_step(hidden, weight, targets, delta, bias=bias, lam=lam, newton_steps=1, tol=1e-12,
                              max_iter=200, max_step=1e6, impl=impl)
    truth = reference.steer_direction(hidden.double(), weight.double(), targets, delta,
                                      None if bias is None else bias.double(), lam=lam)
    ref = reference.steer_direction(hidden.float(), weight.float(), targets, delta,
                                    None if bias is None else bias.float(), lam=lam)
    assert out.delta_h.dtype == torch.float32 and out.delta_h.shape == (B, d)
    assert_close(out.delta_h, ref, truth, "delta_h")
    assert out.cg_converged.all() and (out.cg_residual <= 1e-12).all()


@pytest.mark.parametrize("norm_kind", ["layernorm", "rmsnorm"])
def test_linear_step_through_norm_matches_float64(norm_kind):
    B, m, d, V = 3, 4, 31, 97
    hidden, weight, targets, delta, _ = steer_inputs(B, m, d, V)
    norm = torch.nn.LayerNorm(d) if norm_kind == "layernorm" else torch.nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    out = mppm_ext.steer_step(hidden, weight, targets, delta, norm=norm, newton_steps=1, tol=1e-12, max_step=1e6,
                              impl=IMPL)
    truth = reference.steer_direction(hidden.double(), weight.double(), targets, delta,
                                      norm=copy.deepcopy(norm).double())
    ref = reference.steer_direction(hidden, weight, targets, delta, norm=norm)
    assert_close(out.delta_h, ref.detach(), truth.detach(), "delta_h")


def test_step_lies_in_row_space_of_j():
    hidden, weight, targets, delta, _ = steer_inputs(5, 6, 41, 211)
    out = mppm_ext.steer_step(hidden, weight, targets, delta, newton_steps=1, tol=1e-12, max_step=1e6, impl=IMPL)
    J = reference.steer_jacobian(hidden.double(), weight.double(), targets)  # [B, m, d]
    coef = torch.linalg.lstsq(J.transpose(1, 2), out.delta_h.double().unsqueeze(-1)).solution
    outside = out.delta_h.double() - (J.transpose(1, 2) @ coef).squeeze(-1)
    assert (outside.norm(dim=-1) <= 1e-5 * out.delta_h.double().norm(dim=-1)).all()
    # and the linear model is met: J delta_h = delta
    assert torch.allclose((J @ out.delta_h.double().unsqueeze(-1)).squeeze(-1), delta.double(), atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("norm", [None, "layernorm"])
@pytest.mark.parametrize("m", [1, 3])
def test_gauss_newton_achieves_requested_gain(m, norm, impl):
    B, d, V = 4, 37, 503
    hidden, weight, targets, _, bias = steer_inputs(B, m, d, V, bias=True)
    delta = torch.linspace(0.2, 1.0, B * m).reshape(B, m) * (1.0 if m == 1 else 0.5)
    ln = torch.nn.LayerNorm(d) if norm else None
    out = mppm_ext.steer_step(hidden, weight, targets, delta, bias=bias, norm=ln, newton_steps=8, gain_tol=1e-3,
                              impl=impl)
    assert out.feasible.all() and out.converged.all(), (out.achieved, out.steps)
    norm64 = None if ln is None else copy.deepcopy(ln).double()
    before = log_prob64(hidden, weight, targets, bias, norm64)
    after = log_prob64(hidden.double() + out.delta_h.double(), weight, targets, bias, norm64)
    # The reported gains are the measured ones (float32 streaming pass vs float64 here).
    assert torch.allclose(after - before, delta.double(), atol=1.5e-3)
    assert torch.allclose(out.achieved, after - before, atol=2e-4)
    assert torch.allclose(out.log_prob_before, before, atol=2e-4)
    assert (out.steps >= 1).all() and (out.steps <= 8).all()
    first = out.predicted_gain[:, 0]
    assert torch.isfinite(first).all() and torch.isfinite(out.achieved_gain[:, 0]).all()
    assert (out.relative_norm < 0.25 * 8).all()


def test_too_few_cg_iterations_reports_non_convergence():
    hidden, weight, targets, delta, _ = steer_inputs(3, 16, 41, 997)
    out = mppm_ext.steer_step(hidden, weight, targets, delta, newton_steps=1, max_iter=2, tol=1e-8, impl=IMPL)
    assert not out.cg_converged.any()
    assert (out.cg_iters[:, 0] == 2).all()
    assert (out.cg_residual[:, 0] > 1e-8).all() and torch.isfinite(out.cg_residual).all()
    assert not out.converged.any()


def test_duplicate_targets_need_lam():
    hidden, weight, targets, _, _ = steer_inputs(2, 3, 29, 101)
    targets[:, 2] = targets[:, 0]
    delta = torch.tensor([[0.2, 0.3, 0.6], [0.2, 0.3, 0.6]])  # the duplicate asks for two different gains
    out = mppm_ext.steer_step(hidden, weight, targets, delta, lam=1e-3, newton_steps=6, impl=IMPL)
    assert torch.isfinite(out.delta_h).all() and out.feasible.all()
    assert not out.converged.any()  # no state gives one token two gains
    assert (out.achieved[:, 0] > 0.2).all() and (out.achieved[:, 0] < 0.6).all()  # a compromise between them
    assert torch.allclose(out.achieved[:, 0], out.achieved[:, 2])
    assert (out.relative_norm < 1).all()
    # consistent duplicates are met exactly with lam = 0
    same = mppm_ext.steer_step(hidden, weight, targets, torch.full((2, 3), 0.3), newton_steps=6, impl=IMPL)
    assert same.converged.all()


def test_infeasible_request_is_reported_and_bounded():
    hidden, weight, targets, _, _ = steer_inputs(3, 2, 29, 101)
    lp = log_prob64(hidden, weight, targets)
    delta = (-lp + 0.5).float()  # asks for log p = +0.5
    delta[0] = 0.1  # row 0 is possible
    out = mppm_ext.steer_step(hidden, weight, targets, delta, newton_steps=5, max_step=0.25, impl=IMPL)
    assert out.feasible.tolist() == [True, False, False]
    assert out.converged[0] and not out.converged[1:].any()
    assert torch.isfinite(out.delta_h).all()
    assert (out.relative_norm <= 5 * 0.25 + 1e-5).all()
    # two targets whose wanted probabilities sum past 1
    p_half = torch.full((1, 2), -0.5).double() - log_prob64(hidden[:1], weight, targets[:1])
    too_much = mppm_ext.steer_step(hidden[:1], weight, targets[:1], p_half.float(), newton_steps=2, impl=IMPL)
    assert not too_much.feasible.any()


@pytest.mark.parametrize("center", [True, False])
def test_closed_form_equals_cg(center):
    g = torch.Generator().manual_seed(3)
    rows, c, rhs = torch.randn(7, 1, 13, generator=g), torch.randn(7, 13, generator=g), torch.randn(7, 1, generator=g)
    c = c if center else None
    a = cg.closed_form(rows, c, rhs.double(), 0.1, 1e-12)
    b = cg.cg_torch(rows, c, rhs.double(), 0.1, 1e-12, 10)
    assert torch.allclose(a.u, b.u, rtol=1e-12, atol=0) and a.converged.all() and b.converged.all()


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("max_iter", [1, 3, 60])
@pytest.mark.parametrize("m", [2, 16])
def test_compiled_cg_matches_torch_cg(m, max_iter, center):
    g = torch.Generator().manual_seed(m + max_iter)
    rows, c, rhs = torch.randn(7, m, 23, generator=g), torch.randn(7, 23, generator=g), torch.randn(7, m, generator=g)
    c = c if center else None
    ours = cg.cg_compiled(rows, c, rhs.double(), 0.05, 1e-10, max_iter)
    torch_cg = cg.cg_torch(rows, c, rhs.double(), 0.05, 1e-10, max_iter)
    assert torch.allclose(ours.u, torch_cg.u, rtol=1e-9, atol=1e-12)
    assert torch.equal(ours.converged, torch_cg.converged)
    assert (ours.iters - torch_cg.iters).abs().max() <= (0 if max_iter < 10 else 1)
    assert torch.allclose(ours.residual, torch_cg.residual, rtol=1e-3, atol=1e-9)  # both ~1e-11 when converged


def test_compiled_cg_singular_system_stops_unconverged():
    rows = torch.ones(2, 3, 5)  # G = rows - 1 c^T has rank 1 with identical rows
    rhs = torch.tensor([[1.0, -1.0, 0.0], [1.0, 2.0, 3.0]]).double()
    for out in (cg.cg_compiled(rows, None, rhs, 0.0, 1e-10, 20), cg.cg_torch(rows, None, rhs, 0.0, 1e-10, 20)):
        assert torch.isfinite(out.u).all() and not out.converged.any() and torch.isfinite(out.residual).all()


def test_cpu_cg_is_deterministic_across_threads():
    g = torch.Generator().manual_seed(9)
    rows, c, rhs = torch.randn(9, 8, 31, generator=g), torch.randn(9, 31, generator=g), torch.randn(9, 8, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = cg.cg_compiled(rows, c, rhs.double(), 0.0, 1e-10, 40)
        torch.set_num_threads(2)
        b = cg.cg_compiled(rows, c, rhs.double(), 0.0, 1e-10, 40)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a.u, b.u) and torch.equal(a.iters, b.iters)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(B=st.integers(1, 4), m=st.integers(1, 6), d=st.integers(7, 40), V=st.integers(8, 300),
       delta=st.floats(-1.0, 0.5), scale=st.sampled_from([0.3, 1.0, 4.0]), seed=st.integers(0, 1000))
def test_property_linear_step(B, m, d, V, delta, scale, seed):
    m = min(m, V)
    hidden, weight, targets, _, _ = steer_inputs(B, m, d, V, seed=seed)
    weight = weight * scale
    deltas = torch.full((B, m), delta)
    out = mppm_ext.steer_step(hidden, weight, targets, deltas, newton_steps=1, tol=1e-12, max_iter=100, lam=1e-9,
                              max_step=1e6, impl=IMPL)
    truth = reference.steer_direction(hidden.double(), weight.double(), targets, deltas, lam=1e-9)
    ref = reference.steer_direction(hidden, weight, targets, deltas, lam=1e-9)
    assert_close(out.delta_h, ref, truth, "delta_h")


def test_cg_solve_op_opcheck_and_compile():
    g = torch.Generator().manual_seed(4)
    rows, c, rhs = torch.randn(3, 4, 9, generator=g), torch.randn(3, 9, generator=g), torch.randn(3, 4, generator=g)
    args = (rows, c, rhs.double(), 0.1, 1e-10, 20)
    torch.library.opcheck(ops.cg_solve_op, args)
    torch.library.opcheck(ops.cg_solve_op, (rows, None, rhs.double(), 0.0, 1e-10, 20))
    # backend="eager": fullgraph checks that dynamo captures the opaque op; inductor would add only compile time
    compiled = torch.compile(lambda *a: ops.cg_solve_op(*a), fullgraph=True, backend="eager")
    for a, b in zip(compiled(*args), ops.cg_solve_op(*args)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not (torch.cuda.is_available() and mppm_ext.build_info()["cuda"]),
                    reason="needs a CUDA device and a build with nvcc")
@pytest.mark.parametrize("m", [2, 16, 300])
def test_cuda_cg_matches_cpu_cg(m):
    g = torch.Generator().manual_seed(m)
    rows, c, rhs = torch.randn(7, m, 77, generator=g), torch.randn(7, 77, generator=g), torch.randn(7, m, generator=g)
    cpu = cg.cg_compiled(rows, c, rhs.double(), 0.05, 1e-10, 2 * m + 10)
    gpu = cg.cg_compiled(rows.cuda(), c.cuda(), rhs.double().cuda(), 0.05, 1e-10, 2 * m + 10)
    assert torch.allclose(gpu.u.cpu(), cpu.u, rtol=1e-8, atol=1e-12)
    assert torch.equal(gpu.converged.cpu(), cpu.converged)


def test_previous_state_gives_energy_before_and_after():
    g = torch.Generator().manual_seed(5)
    hidden, previous = torch.randn(3, 33, generator=g), torch.randn(3, 33, generator=g)
    weight = torch.randn(97, 33, generator=g)
    targets = torch.randint(0, 97, (3, 2), generator=g)
    out = mppm_ext.steer_step(hidden, weight, targets, torch.full((3, 2), 0.5), lam=1e-3, previous=previous)
    k_before = 0.5 * (hidden.double() - previous.double()).pow(2).sum(-1)
    k_after = 0.5 * (hidden.double() + out.delta_h.double() - previous.double()).pow(2).sum(-1)
    torch.testing.assert_close(out.kinetic_before, k_before, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.kinetic_after, k_after, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.log_energy_before, k_before.log()[:, None] + out.surprisal_before, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.log_energy_after, k_after.log()[:, None] + out.surprisal_after, rtol=1e-12, atol=0)
    assert mppm_ext.steer_step(hidden, weight, targets, torch.full((3, 2), 0.5)).kinetic_before is None
    with pytest.raises(ValueError, match="previous must have the shape of hidden"):
        mppm_ext.steer_step(hidden, weight, targets, torch.full((3, 2), 0.5), previous=previous[:2])
    with pytest.raises(ValueError, match="previous holds NaN"):
        mppm_ext.steer_step(hidden, weight, targets, torch.full((3, 2), 0.5), previous=previous * float("nan"))
