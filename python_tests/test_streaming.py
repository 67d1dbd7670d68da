"""mppm_ext.streaming against log_softmax / logsumexp of the full logits in float64."""

import pytest
import torch

from conftest import cuda_available
from mppm_ext import streaming

BACKENDS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpp", "cpu"), id="cpp"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA device and a build with nvcc")),
]


def _problem(n, v, d, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * n + 7 * v + d)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _truth_logits(hidden, weight, bias):
    z = hidden.double() @ weight.double().T
    return z if bias is None else z + bias.double()


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 5 x 3 so that every test crosses many tile boundaries in both directions."""
    monkeypatch.setattr(streaming, "TILE_ELEMENTS", 15)
    monkeypatch.setattr(streaming, "MAX_COLS", 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,v,d", [(1, 1, 1), (7, 17, 5), (13, 31, 9), (5, 70, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_token_log_prob_matches_log_softmax(small_tiles, cpu_isa, backend, n, v, d, bias):
    impl, device = backend
    hidden, weight, b, targets = _problem(n, v, d, bias=bias)
    ours = streaming.token_log_prob_from_hidden(*_to(device, hidden, weight, b, targets), impl=impl).cpu()
    truth = torch.log_softmax(_truth_logits(hidden, weight, b), -1).gather(1, targets[:, None]).squeeze(1)
    assert ours.dtype == torch.float64 and ours.shape == (n,)
    torch.testing.assert_close(ours, truth, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,v,d", [(1, 1, 1), (7, 17, 5), (13, 31, 9), (5, 70, 33)])
def test_softmax_moments_match_dense(small_tiles, cpu_isa, backend, n, v, d):
    impl, device = backend
    hidden, weight, b, _ = _problem(n, v, d)
    lse, wbar = (t.cpu() for t in streaming.softmax_moments(*_to(device, hidden, weight, b), impl=impl))
    z = _truth_logits(hidden, weight, b)
    assert lse.dtype == torch.float64 and wbar.dtype == torch.float32 and wbar.shape == (n, d)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(wbar.double(), torch.softmax(z, -1) @ weight.double(), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moments", [False, True])
def test_non_finite_logit_names_its_position(small_tiles, backend, moments):
    impl, device = backend
    hidden, weight, b, targets = _problem(4, 9, 3)
    weight[7, 1] = float("nan")
    hidden[2, 0] = float("inf")
    with pytest.raises(ValueError, match="row 0, vocabulary entry 7"):
        if moments:
            streaming.softmax_moments(*_to(device, hidden, weight, b), impl=impl)
        else:
            streaming.token_log_prob_from_hidden(*_to(device, hidden, weight, b, targets), impl=impl)
