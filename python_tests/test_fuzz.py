"""Property-based comparison of every backend of energy with the float64 reference (hypothesis)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mppm_ext
from conftest import kernel_backends
from helpers import assert_energy_matches

FUZZ_EXAMPLES = 400
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def energy_inputs(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(3, 40))
    d = draw(st.integers(1, 70))
    V = draw(st.sampled_from([1, 2, 15, 16, 17, 100, 1023, 4099]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["normal", "extreme", "nearly_equal", "peaked"]))
    logits = torch.randn(B, T, V, generator=g)
    if kind == "extreme":  # fp16 cannot hold 1e4 exactly but can hold it
        logits = torch.sign(logits) * 1e4 * torch.rand(B, T, V, generator=g)
    elif kind == "nearly_equal":
        logits = 2.5 + 1e-6 * logits
    elif kind == "peaked":
        logits[..., 0] += 30.0
    hidden = torch.randn(B, T, d, generator=g) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(B, T, generator=g) > draw(st.sampled_from([0.1, 0.5, 0.9]))
    if V > 1 and draw(st.booleans()):  # forbidden tokens: -inf logits are legal
        logits = torch.where(torch.rand(B, T, V, generator=g) < 0.2, float("-inf"), logits)
        logits[..., 0] = logits[..., 0].nan_to_num(neginf=0.0)  # every row keeps a finite entry
    labels = None
    if draw(st.booleans()):  # an HF-style completion mask: the prompt's labels are -100
        labels = tokens.clone()
        labels[:, :draw(st.integers(0, T - 1))] = -100
    temperature = draw(st.sampled_from([1.0, 0.7, 1.9]))
    hidden_dtype = draw(st.sampled_from(DTYPES))
    logits_dtype = draw(st.sampled_from(DTYPES))
    return hidden.to(hidden_dtype), logits.to(logits_dtype), tokens, mask, labels, temperature


@pytest.mark.parametrize("backend", kernel_backends())
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=energy_inputs())
def test_energy_matches_reference(backend, data):
    impl, device = backend
    *tensors, temperature = data
    hidden, logits, tokens, mask, labels = (None if t is None else t.to(device) for t in tensors)
    kwargs = dict(attention_mask=mask, labels=labels, temperature=temperature)
    result = mppm_ext.energy(hidden, logits, tokens, impl=impl, **kwargs)
    assert_energy_matches(result, hidden, logits, tokens, **kwargs)
