"""Gradients of energy and energy_from_hidden: every backend against float64 autograd of the reference
(the specification's own torch ops), with the tolerance rule of helpers.py; gradcheck on the reference
backend; the backward of the finish against autograd of the reference finish."""

from __future__ import annotations

import copy

import pytest
import torch

import mppm_ext
from helpers import assert_close
from mppm_ext import ops, reference
from mppm_ext._grad import _finish_values, finish_vjp
from mppm_ext.parts import Parts
from mppm_ext.results import STAT_QUANTITIES, TOKEN_QUANTITIES
from triton_support import REASON as TRITON_REASON

BACKENDS = ["cpp", "reference", pytest.param("triton", marks=pytest.mark.skipif(
    TRITON_REASON is not None, reason=f"Triton kernels cannot run here: {TRITON_REASON}"))]

# A loss that reaches every differentiable output: per-token planes and statistics, weighted so that no
# two gradients cancel.
TOKEN_WEIGHTS = {"log_prob": 0.7, "surprisal": -0.2, "kinetic": 0.01, "log_kinetic": 0.3, "log_energy": 0.5,
                 "entropy": 0.9, "logsumexp": -0.4, "additive_energy": 0.05, "log_lagrangian": 0.2}
STAT_WEIGHTS = {("mean", "log_energy"): 1.3, ("std", "surprisal"): 0.6, ("cv", "log_kinetic"): 0.8,
                ("mean", "entropy"): 0.4}


def loss_of(result) -> torch.Tensor:
    total = 0.0
    for name, w in TOKEN_WEIGHTS.items():
        x = getattr(result, name)
        total = total + w * torch.where(x.isfinite(), x, 0.0).sum()
    for (kind, name), w in STAT_WEIGHTS.items():
        x = getattr(result.stats, kind)[name]
        total = total + w * torch.where(x.isfinite(), x, 0.0).sum()
    corr = result.stats.corr_log_kinetic_surprisal
    return total + 0.5 * torch.where(corr.isfinite(), corr, 0.0).sum()


def _inputs(B, T, d, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * T + V)
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    logits = (2.5 * torch.randn(B, T, V, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden, logits, tokens


def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    loss = fn(*xs)
    return torch.autograd.grad(loss, xs)


def test_finish_backward_matches_autograd_of_the_reference_finish():
    g = torch.Generator().manual_seed(1)
    B, T = 3, 29
    planes = torch.stack([-torch.rand(B, T, generator=g, dtype=torch.float64) * 6,
                          torch.exp(torch.randn(B, T, generator=g, dtype=torch.float64)),
                          torch.rand(B, T, generator=g, dtype=torch.float64) * 4,
                          torch.randn(B, T, generator=g, dtype=torch.float64)])
    real = torch.rand(B, T, generator=g) > 0.2
    planes[1, 0, 5] = 0.0  # a zero step
    parts = Parts(planes, Parts.of(*planes, real).defined)
    g_tok = torch.randn(len(TOKEN_QUANTITIES), B, T, generator=g, dtype=torch.float64)
    g_stats = torch.randn(B, 3 * len(STAT_QUANTITIES) + 1, generator=g, dtype=torch.float64)

    ours = finish_vjp(parts.planes, parts.defined, g_tok, g_stats)

    def ref_loss(p):
        nan = float("nan")
        bits = parts.defined
        lp = torch.where((bits & 1) != 0, p[0], nan)
        k = torch.where((bits & 2) != 0, p[1], nan)
        ent = torch.where((bits & 4) != 0, p[2], nan)
        lse = torch.where((bits & 4) != 0, p[3], nan)
        r = reference.energy_from_parts(lp, k, ent, lse)
        total = sum((g_tok[i] * torch.where(getattr(r, n).isfinite(), getattr(r, n), 0.0)).sum()
                    for i, n in enumerate(TOKEN_QUANTITIES))
        cols = [r.stats.mean[n] for n in STAT_QUANTITIES] + [r.stats.std[n] for n in STAT_QUANTITIES] + \
               [r.stats.cv[n] for n in STAT_QUANTITIES] + [r.stats.corr_log_kinetic_surprisal]
        return total + sum((g_stats[:, i] * torch.where(c.isfinite(), c, 0.0)).sum() for i, c in enumerate(cols))

    (truth,) = _grads(ref_loss, parts.planes)
    # The reference's torch.where(defined, f(x), nan) makes some gradients NaN (0 * f'(nan) where another
    # quantity of the same position is undefined); everywhere else the two must agree.
    known = truth.isfinite()
    assert known.float().mean() > 0.5 and ours.isfinite().all()
    assert torch.allclose(ours[known], truth[known], rtol=1e-9, atol=1e-12), (ours - truth)[known].abs().max()


def test_finish_twin_forward_equals_the_compiled_finish():
    """The torch expression the backward differentiates computes what the compiled finish computes."""
    g = torch.Generator().manual_seed(2)
    B, T = 2, 17
    planes = torch.stack([-torch.rand(B, T, generator=g, dtype=torch.float64) * 6,
                          torch.exp(torch.randn(B, T, generator=g, dtype=torch.float64)),
                          torch.rand(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g,
                                                                                          dtype=torch.float64)])
    parts = Parts.of(*planes, torch.ones(B, T, dtype=torch.bool))
    per_token, stats = _finish_values(parts.planes, parts.defined)
    compiled_tok, compiled_stats, _ = ops.energy_finish_op(parts.planes, parts.defined)
    assert torch.allclose(per_token.float(), compiled_tok, rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats.float(), compiled_stats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,T,V", [(1, 3, 1), (2, 7, 17), (2, 13, 301)])
def test_energy_gradients_match_float64_autograd_of_the_reference(impl, dtype, B, T, V):
    hidden, logits, tokens = _inputs(B, T, 5, V, dtype)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, :1] = 0  # left padding in the last row
    labels = tokens.clone()
    labels[:, 1] = -100  # one target not scored
    kwargs = dict(labels=labels, attention_mask=mask, temperature=1.3)
    ours = _grads(lambda h, z: loss_of(mppm_ext.energy(h, z, tokens, impl=impl, **kwargs)), hidden, logits)
    truth = _grads(lambda h, z: loss_of(reference.energy(h, z, tokens, **kwargs)), hidden.double(), logits.double())
    ref = _grads(lambda h, z: loss_of(reference.energy(h, z, tokens, **kwargs)), hidden.float(), logits.float())
    for name, o, t, r in zip(("hidden", "logits"), ours, truth, ref):
        assert o.dtype == dtype
        # A gradient is returned in its input's dtype: the same-dtype reference is the float32 one rounded so.
        assert_close(o.float(), r.to(dtype).float(), t, f"d loss / d {name}")


def test_gradcheck_of_the_reference():
    """The float64 truth the backends' gradients are compared with is itself right (finite differences),
    -inf logits, labels and temperature included."""
    hidden, logits, tokens = _inputs(1, 6, 3, 7, torch.float64)
    logits[0, 2, 4] = float("-inf")
    labels = tokens.clone()
    labels[0, 1] = -100

    def fn(h, z):
        return loss_of(reference.energy(h, z, tokens, labels=labels, temperature=1.3))

    assert torch.autograd.gradcheck(fn, (hidden.requires_grad_(), logits.requires_grad_()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_energy_from_hidden_gradients(impl):
    g = torch.Generator().manual_seed(4)
    B, T, d, V = 2, 9, 6, 41
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) / d**0.5
    bias = torch.randn(V, generator=g)
    bias[3] = float("-inf")  # a token that can never be predicted
    tokens = torch.randint(4, V, (B, T), generator=g)
    norm = torch.nn.LayerNorm(d)
    kwargs = dict(attention_mask=torch.ones(B, T, dtype=torch.long), temperature=0.8)

    def ours(h, w, b):
        return loss_of(mppm_ext.energy_from_hidden(h, w, tokens, bias=b, norm=norm, impl=impl, **kwargs))

    def ref(h, w, b):
        return loss_of(reference.energy_from_hidden(h, w, tokens, bias=b, norm=copy.deepcopy(norm).to(h.dtype),
                                                    **kwargs))

    got = _grads(ours, hidden, weight, bias)
    truth = _grads(ref, hidden.double(), weight.double(), bias.double())
    base = _grads(ref, hidden, weight, bias)
    for name, o, t, r in zip(("hidden", "weight", "bias"), got, truth, base):
        assert_close(o, r, t, f"d loss / d {name}")


def test_a_backend_without_gradients_is_never_silent():
    """Every output of a call on tensors that require grad has a grad_fn (no silently missing gradient)."""
    hidden, logits, tokens = _inputs(1, 6, 4, 11)
    r = mppm_ext.energy(hidden.requires_grad_(), logits, tokens, impl="cpp")
    for name in TOKEN_QUANTITIES:
        assert getattr(r, name).grad_fn is not None, name
    assert r.stats.mean["log_energy"].grad_fn is not None
