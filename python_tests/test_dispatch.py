"""Backend choice: an explicit backend that cannot run raises with its reasons (the CG included), and
``impl="auto"`` falling back to the reference because the compiled module is missing warns once."""

from __future__ import annotations

import warnings

import pytest
import torch

import mppm_ext
from helpers import assert_energy_matches, make_inputs
from mppm_ext import _dispatch
from triton_support import REASON as TRITON_REASON


@pytest.fixture
def uncompiled(monkeypatch):
    """As if Python had been started in the source tree: mppm_ext._C cannot be imported."""
    reason = "mppm_ext was imported from the source tree /x, which has no compiled module"
    monkeypatch.setattr(_dispatch, "_compiled_module", lambda: (None, reason))
    monkeypatch.setattr(_dispatch, "_warned_uncompiled", False)
    return reason


def test_auto_without_compiled_module_warns_once_and_still_answers(uncompiled):
    hidden, logits, tokens = make_inputs(2, 11, 8, 97)
    with pytest.warns(RuntimeWarning, match="slow reference backend.*source tree"):
        result = mppm_ext.energy(hidden, logits, tokens)
    assert_energy_matches(result, hidden, logits, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mppm_ext.energy(hidden, logits, tokens)  # the second fallback is silent


def test_explicit_reference_does_not_warn(uncompiled):
    hidden, logits, tokens = make_inputs(1, 5, 4, 13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mppm_ext.energy(hidden, logits, tokens, impl="reference")


def test_explicit_cpp_without_compiled_module_raises_with_the_reason(uncompiled):
    hidden, logits, tokens = make_inputs(1, 5, 4, 13)
    with pytest.raises(mppm_ext.BackendUnavailableError, match="cpp: mppm_ext was imported from the source tree"):
        mppm_ext.energy(hidden, logits, tokens, impl="cpp")


def test_unknown_backend_is_named():
    hidden, logits, tokens = make_inputs(1, 5, 4, 13)
    with pytest.raises(ValueError, match="impl must be 'auto' or one of .*got 'gpu'"):
        mppm_ext.energy(hidden, logits, tokens, impl="gpu")


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton kernels cannot run here: {TRITON_REASON}")
def test_explicit_triton_steering_beyond_the_triton_cg_raises():
    """Too many targets for the Triton CG's register tile: impl='triton' raises, never runs the torch CG."""
    from mppm_ext.triton.cg import MAX_TARGETS

    g = torch.Generator().manual_seed(0)
    B, d, V, m = 1, 8, 300, MAX_TARGETS + 1
    hidden, weight = torch.randn(B, d, generator=g), torch.randn(V, d, generator=g)
    targets = torch.arange(m).unsqueeze(0)
    delta = torch.full((B, m), 0.01)
    with pytest.raises(mppm_ext.BackendUnavailableError, match=f"at most {MAX_TARGETS} targets"):
        mppm_ext.steer_step(hidden, weight, targets, delta, impl="triton")
