"""``logits_dtype``: energy_from_hidden / token_log_prob_from_hidden with 16-bit logits, i.e. the product of the
16-bit operands rounded to their dtype (as an eager 16-bit lm_head gives it), against the specification on
those very logits."""

import pytest
import torch

import mppm_ext
from backends_from_hidden import BACKENDS
from helpers import assert_energy_matches
from mppm_ext import streaming

DTYPES = [torch.bfloat16, torch.float16]


def _problem(T, V, d, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + 13 * T + V + d)
    hidden = torch.randn(1, T, d, generator=g).to(dtype)
    # Logits of about +-20: bf16 rounding then moves them by up to ~0.06, far above the fold's error.
    weight = (torch.randn(V, d, generator=g) * 5 / d**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    tokens = torch.randint(0, V, (1, T), generator=g)
    return hidden, weight, b, tokens


def _rounded_logits(hidden, weight, bias):
    """The logits of one 16-bit GEMM, the call the pass makes when one tile covers the problem."""
    h = hidden.reshape(-1, hidden.shape[-1])
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    return z.reshape(*hidden.shape[:-1], -1)


# Triton keeps its logits in float32 registers: test_triton_refuses_rounded_logits.
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.id != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_energy_from_hidden_is_energy_on_the_rounded_logits(backend, dtype, bias):
    impl, device = backend
    hidden, weight, b, tokens = _problem(23, 301, 40, dtype, bias)
    logits = _rounded_logits(hidden, weight, b)
    assert logits.dtype == dtype
    to = (lambda t: None if t is None else t.to(device))
    ours = mppm_ext.energy_from_hidden(to(hidden), to(weight), to(tokens), bias=to(b), impl=impl,
                                       logits_dtype=dtype).map(lambda t: t.cpu())
    assert_energy_matches(ours, hidden, logits, tokens)
    # The option has an effect: float32 logits of the same operands give other log-probs.
    plain = mppm_ext.energy_from_hidden(to(hidden), to(weight), to(tokens), bias=to(b), impl=impl).map(
        lambda t: t.cpu())
    assert float((plain.log_prob - ours.log_prob).nan_to_num().abs().max()) > 1e-3


@pytest.fixture
def small_tiles(monkeypatch):
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(streaming.BUDGETS, device_type, streaming.Budget(tile=15, chunk=1 << 24, max_cols=3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiles_agree_with_the_float64_fold_of_the_same_tiles(small_tiles, dtype):
    # Tiles of 5 x 3: each tile is its own 16-bit GEMM; the reference backend folds the same tiles in float64.
    hidden, weight, b, tokens = _problem(17, 29, 9, dtype, True)
    targets = tokens[0].roll(-1)
    cpp = streaming.token_log_prob_from_hidden(hidden[0], weight, b, targets, impl="cpp", logits_dtype=dtype)
    ref = streaming.token_log_prob_from_hidden(hidden[0], weight, b, targets, impl="reference", logits_dtype=dtype)
    torch.testing.assert_close(cpp, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_is_that_of_the_rounded_softmax(small_tiles, dtype):
    # d log p(target) / d h = W[target] - sum_v p_v W_v with p the softmax of the rounded logits (the
    # rounding passes the gradient straight through, as autograd of a 16-bit matmul does).
    hidden, weight, b, tokens = _problem(11, 37, 8, dtype, False)
    h = hidden[0].clone().requires_grad_(True)
    targets = tokens[0].roll(-1)
    lp = streaming.token_log_prob_from_hidden(h, weight, None, targets, impl="cpp", logits_dtype=dtype)
    lp.sum().backward()
    p = torch.softmax((hidden[0] @ weight.T).double(), -1)
    W = weight.double()
    want = W[targets] - p @ W
    torch.testing.assert_close(h.grad.double(), want, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 3e-3)
    # ... and not that of the float32 logits' softmax, where rounding matters.
    p32 = torch.softmax(hidden[0].double() @ W.T, -1)
    assert float((want - (W[targets] - p32 @ W)).abs().max()) > 0


def test_bad_logits_dtype_names_the_argument():
    hidden, weight, b, tokens = _problem(5, 11, 4, torch.bfloat16, True)
    with pytest.raises(TypeError, match="logits_dtype must be None, torch.bfloat16 or torch.float16"):
        mppm_ext.energy_from_hidden(hidden, weight, tokens, logits_dtype=torch.float32)
    with pytest.raises(TypeError, match=r"logits_dtype=torch.bfloat16 .* weight is torch.float32"):
        mppm_ext.energy_from_hidden(hidden, weight.float(), tokens, logits_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"hidden is torch.float16"):
        streaming.token_log_prob_from_hidden(hidden[0].half(), weight, None, tokens[0], logits_dtype=torch.bfloat16)
    norm = (lambda x: x.float())  # a norm whose output is float32
    with pytest.raises(TypeError, match=r"norm\(hidden\) is torch.float32"):
        mppm_ext.energy_from_hidden(hidden, weight, tokens, bias=b, norm=norm, logits_dtype=torch.bfloat16)


def test_triton_refuses_rounded_logits():
    hidden, weight, _, tokens = _problem(5, 11, 4, torch.bfloat16, False)
    with pytest.raises(mppm_ext.BackendUnavailableError, match="logits rounded to 16 bits"):
        mppm_ext.energy_from_hidden(hidden, weight, tokens, impl="triton", logits_dtype=torch.bfloat16)
