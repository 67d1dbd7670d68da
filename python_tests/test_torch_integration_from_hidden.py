"""The softmax_tile custom op under torch's own checks (opcheck, torch.compile), and energy_from_hidden
inside a compiled function."""

import pytest
import torch

import mppm_ext
from conftest import kernel_backends

pytestmark = pytest.mark.parametrize("backend", kernel_backends())


def tile_args(device, targets: bool, probs: bool, R=5, C=37):
    g = torch.Generator().manual_seed(2)
    z = (3 * torch.randn(R, C, generator=g)).to(device)
    run_max = torch.randn(R, generator=g, dtype=torch.float64).to(device)
    run_sum = torch.rand(R, generator=g, dtype=torch.float64).to(device) + 0.5
    bad_col = torch.full((R,), -1, device=device)
    t = torch.randint(90, 150, (R,), generator=g).to(device) if targets else None
    picked = torch.zeros(R, dtype=torch.float64, device=device) if targets else None
    alpha = torch.empty(R, device=device) if probs else None
    run_ent = torch.zeros(R, dtype=torch.float64, device=device)
    return z, 100, 0.8, run_max, run_sum, run_ent, bad_col, t, picked, alpha


@pytest.mark.parametrize("targets", [False, True])
@pytest.mark.parametrize("probs", [False, True])
def test_opcheck(backend, targets, probs):
    _, device = backend
    torch.library.opcheck(torch.ops.mppm_ext.softmax_tile.default, tile_args(device, targets, probs))


def test_compile_fullgraph(backend):
    """The epilogue between the tile's GEMM and the P @ W update, compiled as one graph."""
    _, device = backend
    g = torch.Generator().manual_seed(4)
    h = torch.randn(6, 16, generator=g).to(device)
    w = torch.randn(40, 16, generator=g).to(device)

    def step(h, w):
        z = h @ w.T
        run_max = torch.full((6,), float("-inf"), dtype=torch.float64, device=h.device)
        run_sum = torch.zeros(6, dtype=torch.float64, device=h.device)
        bad_col = torch.full((6,), -1, device=h.device)
        alpha = torch.empty(6, device=h.device)
        torch.ops.mppm_ext.softmax_tile(z, 0, 1.0, run_max, run_sum, None, bad_col, None, None, alpha)
        return run_max + run_sum.log(), (z @ w) / run_sum.unsqueeze(1).float(), alpha

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    for got, want in zip(compiled(h, w), step(h, w)):
        assert torch.equal(got, want)


def test_compile_public_function(backend):
    impl, device = backend
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 9, 16, generator=g).to(device)
    weight = torch.randn(301, 16, generator=g).to(device)
    tokens = torch.randint(0, 301, (2, 9), generator=g).to(device)

    def analysis(h, w, x):
        return mppm_ext.energy_from_hidden(h, w, x, impl=impl).stats.cv["log_energy"]

    eager = analysis(hidden, weight, tokens)
    compiled = torch.compile(analysis)(hidden, weight, tokens)
    assert torch.equal(compiled, eager)
