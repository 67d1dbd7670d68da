"""Inputs and float64 checks shared by the steering tests."""

import torch

import mppm_ext


def steer_inputs(B, m, d, V, *, dtype=torch.float32, delta=0.3, bias=False, seed=0):
    """hidden [B, d], weight [V, d] with logits of std ~2, distinct targets per row [B, m], delta [B, m]."""
    g = torch.Generator().manual_seed(seed + 31 * B + 7 * m + d + V)
    hidden = torch.randn(B, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * (2.0 / d ** 0.5)).to(dtype)
    targets = torch.stack([torch.randperm(V, generator=g)[:m] for _ in range(B)])
    b = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    return hidden, weight, targets, torch.full((B, m), float(delta)), b


def log_prob64(hidden, weight, targets, bias=None, norm=None):
    """[B, m] float64 log p of the targets from state ``hidden`` (pre-norm when ``norm`` is given)."""
    x = hidden.double()
    if norm is not None:
        x = norm(x)
    z = x @ weight.double().T + (0.0 if bias is None else bias.double())
    return torch.log_softmax(z, -1).gather(-1, targets)


def streaming_backends():
    """steer_step backends whose streaming pass can run here (CPU)."""
    out = []
    for impl in ("reference", "cpp", "triton"):
        try:
            mppm_ext.streaming.softmax_moments(torch.zeros(1, 2), torch.zeros(3, 2), None, impl=impl)
        except Exception:  # backend not available in this build
            continue
        out.append(impl)
    return out
