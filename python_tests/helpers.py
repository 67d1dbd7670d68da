"""Comparison against the float64 reference, with the one tolerance table of the test suite.

Rule (shared/design/architecture.md, "Testing policy"): an output passes when, elementwise,

    |truth - ours| <= K * max|truth - ref| + ATOL + RTOL * |truth|

where truth is the reference in float64 on the same input values and ref is the reference run in the
kernels' accumulation dtype (float32) on the same inputs. ATOL/RTOL are a few float32 ulps: they
cover positions where the float32 reference happens to be exact, not systematic error.
"""

from __future__ import annotations

import torch

from mppm_ext import STAT_QUANTITIES, TOKEN_QUANTITIES, reference

K = 2.0
# Keyed by the dtype the kernels accumulate in; every input dtype (fp32, bf16, fp16) accumulates in fp32.
TOLERANCE = {torch.float32: {"atol": 1e-6, "rtol": 2.5e-7}}


def assert_close(ours, ref, truth, name: str, accumulate=torch.float32) -> None:
    tol = TOLERANCE[accumulate]
    ours, ref, truth = ours.double().cpu(), ref.double().cpu(), truth.double().cpu()
    # The special values must agree exactly: NaN where undefined, inf where float32 overflows.
    rounded = truth.to(accumulate).double()
    assert torch.equal(ours.isnan(), rounded.isnan()), f"{name}: NaN pattern differs from the reference"
    assert torch.equal(ours.isinf(), rounded.isinf()), f"{name}: inf pattern differs from the reference"
    assert torch.equal(ours[ours.isinf()], rounded[rounded.isinf()]), f"{name}: infinities of different sign"
    finite = rounded.isfinite()
    if not finite.any():
        return
    ref_err = (ref - truth)[finite].abs().nan_to_num(float("inf")).max()
    bound = K * ref_err + tol["atol"] + tol["rtol"] * truth.abs()
    err = (ours - truth).abs()
    bad = finite & ~(err <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}{list(i)}: ours {ours[i].item():.9g}, truth {truth[i].item():.9g}, error {err[i].item():.3g} "
            f"> bound {bound[i].item():.3g} (reference error {ref_err.item():.3g}); {int(bad.sum())} elements fail")


def reference_pair(hidden, logits, tokens, **kwargs):
    """(truth in float64, reference in float32) on the same input values."""
    truth = reference.energy(hidden.double(), logits.double(), tokens, **kwargs)
    ref = reference.energy(hidden.float(), logits.float(), tokens, **kwargs)
    return truth, ref


def assert_energy_matches(result, hidden, logits, tokens, **kwargs) -> None:
    """Every per-token output, the valid mask and every statistic of ``result`` against the reference."""
    truth, ref = reference_pair(hidden, logits, tokens, **kwargs)
    assert result.valid.dtype == torch.bool
    assert torch.equal(result.valid.cpu(), truth.valid), "valid mask differs from the reference"
    for name in TOKEN_QUANTITIES:
        out = getattr(result, name)
        assert out.dtype == torch.float32, f"{name} is {out.dtype}"
        assert_close(out, getattr(ref, name), getattr(truth, name), name)
    assert torch.equal(result.stats.count.cpu(), truth.stats.count)
    assert torch.equal(result.stats.zero_kinetic.cpu(), truth.stats.zero_kinetic)
    for kind in ("mean", "std", "cv"):
        for name in STAT_QUANTITIES:
            assert_close(getattr(result.stats, kind)[name], getattr(ref.stats, kind)[name],
                         getattr(truth.stats, kind)[name], f"stats.{kind}[{name}]")
    assert_close(result.stats.corr_log_kinetic_surprisal, ref.stats.corr_log_kinetic_surprisal,
                 truth.stats.corr_log_kinetic_surprisal, "stats.corr_log_kinetic_surprisal")


def make_inputs(B, T, d, V, *, hidden_dtype=torch.float32, logits_dtype=torch.float32, scale=3.0, device="cpu"):
    """Random hidden states, logits spread like a trained model's (std ``scale``) and token ids, seeded
    by the shape so that every test sees the same values on every run."""
    g = torch.Generator().manual_seed(1234 + B * 7 + T * 13 + V)
    hidden = torch.randn(B, T, d, generator=g).to(hidden_dtype)
    logits = (scale * torch.randn(B, T, V, generator=g)).to(logits_dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden.to(device), logits.to(device), tokens.to(device)
