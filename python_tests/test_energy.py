"""mppm_ext.energy against the float64 reference: shapes, dtypes, masks, instruction sets, backends."""

import pytest
import torch

import mppm_ext
from conftest import kernel_backends
from helpers import PADDINGS, assert_energy_matches, make_inputs, padded_case

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("logits_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,d,V", [(1, 7, 64, 997), (3, 341, 768, 50257), (2, 77, 769, 32000)])
def test_every_isa_and_dtype(cpu_isa, logits_dtype, B, T, d, V):
    hidden, logits, tokens = make_inputs(B, T, d, V, hidden_dtype=logits_dtype, logits_dtype=logits_dtype)
    assert_energy_matches(mppm_ext.energy(hidden, logits, tokens, impl="cpp"), hidden, logits, tokens)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("B,T", [(1, 3), (1, 7), (1, 77), (1, 1023), (7, 11)])
@pytest.mark.parametrize("V", [1, 17, 997, 50257])
def test_shapes(backend, B, T, V):
    impl, device = backend
    hidden, logits, tokens = make_inputs(B, T, 33, V, device=device)
    assert_energy_matches(mppm_ext.energy(hidden, logits, tokens, impl=impl), hidden, logits, tokens)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("V", [151936])
def test_large_vocabulary(backend, V):
    impl, device = backend
    hidden, logits, tokens = make_inputs(2, 5, 2048, V, logits_dtype=torch.bfloat16, device=device)
    assert_energy_matches(mppm_ext.energy(hidden, logits, tokens, impl=impl), hidden, logits, tokens)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("hidden_dtype,logits_dtype", [(torch.float32, torch.bfloat16),
                                                       (torch.bfloat16, torch.float32),
                                                       (torch.float16, torch.bfloat16)], ids=str)
def test_mixed_dtypes(backend, hidden_dtype, logits_dtype):
    impl, device = backend
    hidden, logits, tokens = make_inputs(2, 19, 96, 1009, hidden_dtype=hidden_dtype, logits_dtype=logits_dtype,
                                         device=device)
    assert_energy_matches(mppm_ext.energy(hidden, logits, tokens, impl=impl), hidden, logits, tokens)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("padding", PADDINGS)
def test_masks(backend, padding):
    impl, device = backend
    hidden, logits, tokens, kwargs = padded_case(padding, *make_inputs(4, 23, 48, 1013, device=device))
    result = mppm_ext.energy(hidden, logits, tokens, impl=impl, **kwargs)
    assert_energy_matches(result, hidden, logits, tokens, **kwargs)
    if padding == "all_masked_row":
        assert result.stats.count[1] == 0 and result.stats.mean["energy"][1].isnan()


@pytest.mark.parametrize("backend", kernel_backends())
def test_custom_ignore_index_and_int32_tokens(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(2, 30, 16, 500, device=device)
    tokens[0, 4:9] = 7
    r64 = mppm_ext.energy(hidden, logits, tokens, ignore_index=7, impl=impl)
    r32 = mppm_ext.energy(hidden, logits, tokens.int(), ignore_index=7, impl=impl)
    assert_energy_matches(r64, hidden, logits, tokens, ignore_index=7)
    for name in mppm_ext.TOKEN_QUANTITIES:
        assert torch.equal(getattr(r64, name).nan_to_num(), getattr(r32, name).nan_to_num())
    assert not r64.valid[0, 3:10].any()
