"""What users of fused cross-entropy kernels rely on: -inf logits, labels apart from tokens (Hugging Face's
-100 completion masks), temperature, entropy and logsumexp, autocast, a reference that upcasts 16-bit
inputs; on every backend that runs here, against the float64 reference (helpers.py's rule)."""

from __future__ import annotations

import pytest
import torch

import mppm_ext
from helpers import assert_energy_matches, assert_from_hidden_matches, make_inputs
from mppm_ext import reference
from triton_support import REASON as TRITON_REASON

TRITON = pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None,
                                                         reason=f"Triton kernels cannot run here: {TRITON_REASON}"))
BACKENDS = ["cpp", "reference", TRITON]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _completion_labels(tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    labels = tokens.clone()
    labels[:, :prompt] = -100
    return labels


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_neg_inf_logits_are_legal(impl, dtype):
    hidden, logits, tokens = make_inputs(2, 9, 6, 97, logits_dtype=dtype)
    logits = logits.clone()
    logits[:, :, 5:40:3] = float("-inf")  # forbidden tokens
    logits[0, 2, tokens[0, 3]] = float("-inf")  # a target with probability 0: log p = -inf
    logits[1, 4, :96] = float("-inf")  # a row with one finite entry
    result = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    assert result.log_prob[0, 2] == float("-inf")
    assert_energy_matches(result, hidden, logits, tokens)


@pytest.mark.parametrize("impl", BACKENDS)
def test_a_row_with_no_finite_logit_is_an_error(impl):
    hidden, logits, tokens = make_inputs(1, 6, 4, 13)
    logits = logits.clone()
    logits[0, 3] = float("-inf")
    with pytest.raises(ValueError, match="batch 0, position 3 has no finite entry"):
        mppm_ext.energy(hidden, logits, tokens, impl=impl)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_pos_inf_logits_are_still_errors(impl, value):
    hidden, logits, tokens = make_inputs(1, 6, 4, 13)
    logits = logits.clone()
    logits[0, 2, 7] = value
    with pytest.raises(ValueError, match="logits holds NaN or inf in the row at batch 0, position 2"):
        mppm_ext.energy(hidden, logits, tokens, impl=impl)


@pytest.mark.parametrize("impl", BACKENDS)
def test_completion_labels_score_the_first_completion_token(impl):
    """HF convention: labels = -100 on the prompt. The first completion token (position 4) is predicted from
    the last prompt state (3): log_prob[3] is defined, log_prob[0..2] are not, and every state is real."""
    hidden, logits, tokens = make_inputs(2, 10, 6, 53)
    labels = _completion_labels(tokens, 4)
    result = mppm_ext.energy(hidden, logits, tokens, labels=labels, impl=impl)
    assert result.log_prob[:, :3].isnan().all() and not result.log_prob[:, 3].isnan().any()
    assert not result.entropy[:, :4].isnan().any()  # the prompt's states are real
    assert not result.kinetic[:, 1:4].isnan().any()
    assert_energy_matches(result, hidden, logits, tokens, labels=labels)
    direct = torch.log_softmax(logits[:, 3].double(), -1).gather(-1, tokens[:, 4:5]).squeeze(-1)
    assert torch.allclose(result.log_prob[:, 3].double(), direct, atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits_inside(impl, temperature):
    hidden, logits, tokens = make_inputs(2, 7, 5, 61)
    result = mppm_ext.energy(hidden, logits, tokens, temperature=temperature, impl=impl)
    assert_energy_matches(result, hidden, logits, tokens, temperature=temperature)
    scaled = mppm_ext.energy(hidden, logits / temperature, tokens, impl="reference")
    assert torch.allclose(result.entropy, scaled.entropy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_entropy_and_logsumexp_at_every_real_state(impl):
    hidden, logits, tokens = make_inputs(2, 8, 4, 29)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    result = mppm_ext.energy(hidden, logits, tokens, attention_mask=mask, impl=impl)
    assert torch.equal(result.entropy.isnan(), mask == 0)  # T-1 included
    lse = torch.logsumexp(logits.double(), -1)
    assert torch.allclose(result.logsumexp[mask.bool()].double(), lse[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("impl", BACKENDS)
def test_energy_from_hidden_labels_temperature_and_forbidden_tokens(impl):
    g = torch.Generator().manual_seed(9)
    B, T, d, V = 2, 9, 8, 71
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) / d**0.5
    bias = torch.randn(V, generator=g)
    bias[:4] = float("-inf")
    tokens = torch.randint(4, V, (B, T), generator=g)
    labels = _completion_labels(tokens, 3)
    result = mppm_ext.energy_from_hidden(hidden, weight, tokens, labels=labels, bias=bias, temperature=1.7, impl=impl)
    assert_from_hidden_matches(result, hidden, weight, tokens, labels=labels, bias=bias, temperature=1.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_keeps_float32_accumulation(dtype):
    g = torch.Generator().manual_seed(3)
    B, T, d, V = 2, 9, 16, 257
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) / 4
    tokens = torch.randint(0, V, (B, T), generator=g)
    plain = mppm_ext.energy_from_hidden(hidden, weight, tokens)
    with torch.autocast("cpu", dtype=dtype):
        cast = mppm_ext.energy_from_hidden(hidden, weight, tokens)
        rows = mppm_ext.streaming.token_log_prob_from_hidden(hidden[0, :-1], weight, None, tokens[0, 1:])
        logits = hidden @ weight.T  # autocast makes these 16-bit, as a model under autocast would
        fused = mppm_ext.energy(hidden, logits, tokens)
    assert torch.equal(plain.log_energy.nan_to_num(), cast.log_energy.nan_to_num())
    assert rows.dtype == torch.float64 and torch.allclose(rows.float(), plain.log_prob[0, :-1], atol=1e-5)
    assert_energy_matches(fused, hidden, logits, tokens)


def test_reference_backend_upcasts_16_bit_inputs():
    """bf16 logits, V = 2053: a bf16 log_softmax errs by up to ~0.03 nats; the reference backend computes
    in float32, so it is within float32 rounding of the float64 truth on the same values."""
    hidden, logits, tokens = make_inputs(1, 64, 8, 2053, logits_dtype=torch.bfloat16)
    ours = mppm_ext.energy(hidden, logits, tokens, impl="reference")
    truth = reference.energy(hidden.double(), logits.double(), tokens)
    assert (ours.log_prob - truth.log_prob).nan_to_num().abs().max() < 1e-5
    equal = torch.zeros(1, 4, 131072, dtype=torch.bfloat16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    r = mppm_ext.energy(torch.randn(1, 4, 8), equal, ids, impl="reference")
    assert r.log_prob[0, 0].item() == pytest.approx(-11.7835, abs=1e-4)  # -log(131072), not bf16's -11.8125


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(labels=torch.zeros(2, 5, dtype=torch.long)), ValueError, r"labels must have the shape of tokens \(2, 6\)"),
    (dict(labels=torch.zeros(2, 6)), TypeError, "labels must hold token ids as int32 or int64"),
    (dict(labels="no"), TypeError, "labels must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=-1), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=True), TypeError, "temperature must be a real number"),
    (dict(temperature="1"), TypeError, "temperature must be a real number, got str"),
    (dict(labels=torch.full((2, 6), 99)), ValueError, r"labels\[0, 1\] = 99 is outside the vocabulary \[0, 13\)"),
])
@pytest.mark.parametrize("impl", BACKENDS)
def test_bad_labels_and_temperature(kwargs, exc, match, impl):
    hidden, logits, tokens = make_inputs(2, 6, 4, 13)
    with pytest.raises(exc, match=match):
        mppm_ext.energy(hidden, logits, tokens, impl=impl, **kwargs)
    weight = torch.randn(13, 4)
    with pytest.raises(exc, match=match):
        mppm_ext.energy_from_hidden(hidden, weight, tokens, impl=impl, **kwargs)


def test_streaming_ignore_index_and_temperature():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    targets = torch.tensor([1, -100, 3, 39, -100, 0])
    lp = mppm_ext.streaming.token_log_prob_from_hidden(hidden, weight, None, targets, temperature=0.7)
    truth = torch.log_softmax((hidden.double() @ weight.double().T) / 0.7, -1)
    keep = targets != -100
    assert lp[~keep].isnan().all()
    assert torch.allclose(lp[keep], truth[keep].gather(-1, targets[keep, None]).squeeze(-1), atol=1e-5)
