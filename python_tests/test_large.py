"""Inputs past 32-bit offsets: slow (a few seconds, 4.3 GB), but part of every CI run."""

import math

import pytest
import torch

import mppm_ext
from conftest import kernel_backends
from helpers import assert_energy_matches

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", kernel_backends())]


def test_logits_beyond_int32_offsets(backend):
    impl, device = backend
    V = 50257
    T = 2**31 // V + 70  # N * V = 2.151e9 elements > 2^31
    assert T * V > 2**31
    logits = torch.zeros(1, T, V, dtype=torch.bfloat16, device=device)
    g = torch.Generator().manual_seed(5)
    tail = slice(T - 12, T)  # rows whose first element lies beyond 2^31
    assert (T - 12) * V > 2**31
    logits[0, tail] = (3 * torch.randn(12, V, generator=g)).bfloat16().to(device)
    hidden = torch.randn(1, T, 4, generator=g).to(device)
    tokens = torch.randint(0, V, (1, T), generator=g).to(device)
    r = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    # Zero rows: every token has probability 1/V.
    head = r.log_prob[0, : T - 13]
    assert torch.allclose(head, torch.full_like(head, -math.log(V)), atol=2e-6, rtol=0)
    # The random rows at the end equal a run on that slice alone, which matches the reference.
    sub_h, sub_z, sub_x = hidden[:, tail], logits[:, tail], tokens[:, tail]
    sub = mppm_ext.energy(sub_h, sub_z, sub_x, impl=impl)
    for name in ("log_prob", "kinetic"):  # [1:-1]: the slice has no step into its first position
        assert torch.equal(getattr(r, name)[0, tail][1:-1], getattr(sub, name)[0, 1:-1]), name
    assert_energy_matches(sub, sub_h, sub_z, sub_x)
