"""The one compiled finish (``mppm_ext::energy_finish``): parts -> every per-token quantity and per-sequence
statistic, against the specification's own finish (``reference.energy_from_parts``) in float64.

The parts are drawn in each input dtype (the values a backend produces from float32, bfloat16 or float16
inputs), converted to float64 as the backends hand them over; the float32 run of the reference finish sets
the tolerance (helpers.assert_close)."""

from __future__ import annotations

import pytest
import torch

import mppm_ext
from conftest import cuda_available
from helpers import assert_result_matches
from mppm_ext import ops, reference
from mppm_ext.parts import DEFINED_KINETIC, DEFINED_LOG_PROB, DEFINED_STATE, Parts, finish
from mppm_ext.selftest import named_tensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 2), (1, 3), (2, 7), (3, 77), (2, 1023)]


def _parts(B, T, dtype, *, seed=0, real=None):
    g = torch.Generator().manual_seed(seed + 31 * T + B)
    log_prob = -(torch.rand(B, T, generator=g) * 12).to(dtype).double()
    kinetic = torch.exp(torch.randn(B, T, generator=g) * 2 + 3).to(dtype).double()
    entropy = (torch.rand(B, T, generator=g) * 9).to(dtype).double()
    logsumexp = (torch.randn(B, T, generator=g) * 20).to(dtype).double()
    if real is None:
        real = torch.ones(B, T, dtype=torch.bool)
    return log_prob, kinetic, entropy, logsumexp, real


def _truth_and_ref(parts: Parts):
    lp = torch.where((parts.defined & DEFINED_LOG_PROB) != 0, parts.planes[0], float("nan"))
    k = torch.where((parts.defined & DEFINED_KINETIC) != 0, parts.planes[1], float("nan"))
    h, lse = (torch.where((parts.defined & DEFINED_STATE) != 0, parts.planes[i], float("nan")) for i in (2, 3))
    return (reference.energy_from_parts(lp, k, h, lse),
            reference.energy_from_parts(lp.float(), k.float(), h.float(), lse.float()))


def _check(parts: Parts):
    assert_result_matches(finish(parts), *_truth_and_ref(parts))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T", SHAPES)
def test_finish_matches_reference(B, T, dtype):
    _check(Parts.of(*_parts(B, T, dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_empty_and_all_masked_sequences(dtype):
    B, T = 4, 77
    real = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) > 0.3  # holes
    real[1] = False  # an empty (all-masked) sequence
    real[2, :] = False
    real[2, 10:12] = True  # two real tokens: log p at one position, K at the next, nothing valid
    real[3, :-1] = False  # one real token
    parts = Parts.of(*_parts(B, T, dtype, real=real))
    _check(parts)
    result = finish(parts)
    assert result.stats.count[1:].tolist() == [0, 0, 0]
    assert result.stats.mean["log_energy"][1:].isnan().all()


def test_zero_kinetic_positions_are_counted_and_left_out():
    log_prob, kinetic, entropy, lse, real = _parts(2, 33, torch.float32)
    kinetic[0, 5] = kinetic[0, 9] = kinetic[1, 1] = 0.0
    parts = Parts.of(log_prob, kinetic, entropy, lse, real)
    _check(parts)
    result = finish(parts)
    assert result.stats.zero_kinetic.tolist() == [2, 1]
    assert result.log_kinetic[0, 5] == float("-inf")


def test_special_values_follow_the_reference():
    """A target whose logit is -inf (log p = -inf), a float32 overflow of E, a huge K and one position whose
    log p is the only thing defined: NaN and inf patterns, per token and per sequence, as the reference."""
    log_prob, kinetic, entropy, lse, real = _parts(3, 17, torch.float32)
    log_prob[0, 4] = float("-inf")
    log_prob[1, 6] = -120.0  # E = K exp(120) overflows float32, log E does not
    kinetic[2, 8] = 1e300
    real[2, 12] = False
    _check(Parts.of(log_prob, kinetic, entropy, lse, real))


def test_constant_parts_have_no_correlation():
    B, T = 2, 40
    log_prob = torch.full((B, T), -2.5, dtype=torch.float64)
    kinetic = torch.exp(torch.randn(B, T, dtype=torch.float64))
    zeros = torch.zeros(B, T, dtype=torch.float64)
    parts = Parts.of(log_prob, kinetic, zeros, zeros, torch.ones(B, T, dtype=torch.bool))
    _check(parts)
    assert finish(parts).stats.corr_log_kinetic_surprisal.isnan().all()


def test_finish_op_opcheck_and_compile():
    parts = Parts.of(*_parts(2, 9, torch.float32))
    args = (parts.planes, parts.defined)
    torch.library.opcheck(ops.energy_finish_op, args)
    compiled = torch.compile(lambda *a: ops.energy_finish_op(*a), fullgraph=True, backend="eager")
    for a, b in zip(compiled(*args), ops.energy_finish_op(*args)):
        assert torch.equal(a, b)


def test_finish_op_on_meta_tensors_gives_shapes():
    per_token, stats, counts = ops.energy_finish_op(torch.empty(4, 3, 11, dtype=torch.float64, device="meta"),
                                                    torch.empty(3, 11, dtype=torch.uint8, device="meta"))
    assert per_token.shape == (10, 3, 11) and stats.shape == (3, 34) and counts.shape == (3, 2)


def test_every_unfused_backend_finishes_in_the_compiled_finish(monkeypatch):
    """reference, triton and energy_from_hidden hand their parts to energy_finish, once per call (the fused
    cpp kernel runs the same finish code inside its own op)."""
    from mppm_ext._dispatch import triton_reason

    calls = []
    real_op = ops.energy_finish_op
    monkeypatch.setattr(ops, "energy_finish_op", lambda *args: calls.append(args[0].shape) or real_op(*args))
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(37, 16, generator=g)
    tokens = torch.randint(0, 37, (2, 9), generator=g)
    logits = hidden @ weight.T
    backends = ["reference", "cpp"] + (["triton"] if triton_reason(torch.device("cpu"), "triton") is None else [])
    mppm_ext.energy(hidden, logits, tokens, impl="reference")
    expected = 1
    if "triton" in backends:
        mppm_ext.energy(hidden, logits, tokens, impl="triton")
        expected += 1
    for impl in backends:
        mppm_ext.energy_from_hidden(hidden, weight, tokens, impl=impl)
    expected += len(backends)
    assert calls == [(4, 2, 9)] * expected
    mppm_ext.energy(hidden, logits, tokens, impl="cpp")
    assert len(calls) == expected  # the fused op finishes inside its one call


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a build with nvcc")
@pytest.mark.parametrize("B,T", [(1, 1), (2, 257), (1, 32768), (3, 70001)])
def test_cuda_finish_split_over_blocks(B, T):
    """The CUDA finish cuts each sequence into chunks of blocks (1, 2, 128 and 256 chunks here, the last one
    shorter): against the reference, and bitwise the same from run to run."""
    parts = Parts.of(*_parts(B, T, torch.float32))
    on_gpu = Parts(parts.planes.cuda(), parts.defined.cuda())
    first, second = finish(on_gpu), finish(on_gpu)
    assert_result_matches(first.map(lambda t: t.cpu()), *_truth_and_ref(parts))
    for (name, a), (_, b) in zip(named_tensors(first), named_tensors(second)):
        if a.is_floating_point():
            a, b = (x.contiguous().reshape(-1).view(torch.uint8) for x in (a, b))
        assert torch.equal(a, b), f"{name} differs between two runs"
