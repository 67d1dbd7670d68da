"""Properties the definitions imply, checked on the kernels directly."""

import math

import pytest
import torch

import mppm_ext
from conftest import kernel_backends
from helpers import assert_energy_matches, make_inputs

pytestmark = pytest.mark.parametrize("backend", kernel_backends())


def test_logit_shift_changes_nothing(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(2, 13, 32, 4099, device=device)
    base = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    shifted = mppm_ext.energy(hidden, logits + 1000.0, tokens, impl=impl)
    # 1000 + z loses the low bits of z in float32 (ulp(1000) = 6e-5): that is the tolerance.
    torch.testing.assert_close(shifted.log_prob, base.log_prob, atol=3e-4, rtol=0, equal_nan=True)
    assert_energy_matches(shifted, hidden, logits + 1000.0, tokens)


def test_equal_logits_give_log_vocab(backend):
    impl, device = backend
    V = 50257
    hidden, _, tokens = make_inputs(1, 9, 16, V, device=device)
    logits = torch.full((1, 9, V), 3.25, device=device)
    r = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    expected = torch.full((8,), math.log(V))
    torch.testing.assert_close(r.surprisal[0, :8].cpu(), expected.float(), atol=2e-6, rtol=0)
    torch.testing.assert_close(r.stats.cv["surprisal"].cpu(), torch.zeros(1), atol=1e-6, rtol=0)


def test_first_and_last_token_ids(backend):
    impl, device = backend
    V = 32003
    hidden, logits, tokens = make_inputs(2, 8, 16, V, device=device)
    tokens[0] = 0
    tokens[1] = V - 1
    logits[0, :, 0] = 40.0  # the target dominates: log p close to 0
    logits[1, :, V - 1] = -40.0
    r = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    assert_energy_matches(r, hidden, logits, tokens)
    assert (r.log_prob[0, :-1] > -1e-6).all() and (r.log_prob[1, :-1] < -40).all()


def test_non_contiguous_and_broadcast_inputs(backend):
    impl, device = backend
    B, T, d, V = 3, 17, 40, 1031
    hidden, logits, tokens = make_inputs(B, T, d, V, device=device)
    cases = {
        # time-major storage, transposed into [B, T, ...]
        "transposed": (hidden.transpose(0, 1).contiguous().transpose(0, 1),
                       logits.transpose(0, 1).contiguous().transpose(0, 1), tokens.t().contiguous().t()),
        # every other position of a longer sequence
        "strided": (torch.repeat_interleave(hidden, 2, dim=1)[:, ::2], torch.repeat_interleave(logits, 2, dim=1)[:, ::2],
                    torch.repeat_interleave(tokens, 2, dim=1)[:, ::2]),
        # one sequence broadcast over the batch (stride 0)
        "broadcast": (hidden[:1].expand(B, T, d), logits[:1].expand(B, T, V), tokens[:1].expand(B, T)),
        # the last dimension itself strided: the wrapper copies it
        "last_dim_strided": (torch.repeat_interleave(hidden, 2, dim=2)[..., ::2],
                             torch.repeat_interleave(logits, 2, dim=2)[..., ::2], tokens),
    }
    for name, (h, z, x) in cases.items():
        assert not (h.is_contiguous() and z.is_contiguous()), name
        assert_energy_matches(mppm_ext.energy(h, z, x, impl=impl), h, z, x)


def test_zero_velocity_is_counted_not_nan(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(1, 12, 8, 101, device=device)
    hidden[0, 5] = hidden[0, 4]  # no step into position 5
    r = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    assert r.kinetic[0, 5] == 0 and r.log_kinetic[0, 5] == -math.inf and r.log_energy[0, 5] == -math.inf
    assert r.stats.zero_kinetic.item() == 1 and r.stats.count.item() == 9
    assert all(v.isfinite().all() for v in r.stats.mean.values())
    assert_energy_matches(r, hidden, logits, tokens)


def test_unbatched_equals_batched(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(1, 21, 24, 333, device=device)
    batched = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    single = mppm_ext.energy(hidden[0], logits[0], tokens[0], impl=impl)
    assert single.log_prob.shape == (21,) and single.stats.count.shape == ()
    for name in mppm_ext.TOKEN_QUANTITIES:
        assert torch.equal(getattr(single, name).nan_to_num(), getattr(batched, name)[0].nan_to_num())


def test_bitwise_deterministic_across_runs_and_threads(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(4, 129, 64, 5003, logits_dtype=torch.bfloat16, device=device)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(mppm_ext.energy(hidden, logits, tokens, impl=impl))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for name in mppm_ext.TOKEN_QUANTITIES:
            assert torch.equal(getattr(runs[0], name).nan_to_num(), getattr(other, name).nan_to_num()), name
        for name in mppm_ext.STAT_QUANTITIES:
            assert torch.equal(runs[0].stats.cv[name], other.stats.cv[name]), name


def test_reference_backend_agrees(backend):
    impl, device = backend
    hidden, logits, tokens = make_inputs(2, 15, 16, 211, device=device)
    ours = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    ref = mppm_ext.energy(hidden, logits, tokens, impl="reference")
    for name in mppm_ext.TOKEN_QUANTITIES:
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), equal_nan=True, rtol=2e-5, atol=2e-5)
