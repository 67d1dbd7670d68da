"""mppm_ext.energy(impl="triton") against the float64 reference: shapes, dtypes, tile boundaries,
strides, masks, extreme values, non-finite inputs, determinism, and the backend's availability."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import mppm_ext
from helpers import PADDINGS, assert_energy_matches, make_inputs, padded_case
from triton_support import DEVICE, needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# No shrinking: under the interpreter it takes minutes; a failure is reported as drawn.
BOUNDED = (Phase.explicit, Phase.reuse, Phase.generate)


def energy(hidden, logits, tokens, **kwargs):
    return mppm_ext.energy(hidden, logits, tokens, impl="triton", **kwargs)


def check(hidden, logits, tokens, **kwargs):
    assert_energy_matches(energy(hidden, logits, tokens, **kwargs), hidden, logits, tokens, **kwargs)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,d,V", [(1, 3, 1, 1), (1, 7, 33, 17), (2, 77, 33, 997), (1, 5, 64, 50257)])
def test_shapes_and_dtypes(dtype, B, T, d, V):
    check(*make_inputs(B, T, d, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("hidden_dtype,logits_dtype", [(torch.float32, torch.bfloat16),
                                                       (torch.float16, torch.float32)], ids=str)
def test_mixed_dtypes(hidden_dtype, logits_dtype):
    check(*make_inputs(2, 9, 40, 1009, hidden_dtype=hidden_dtype, logits_dtype=logits_dtype, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("V", [1, 7, 8, 9, 63, 64, 65, 200])
def test_tile_boundaries(monkeypatch, V):
    """Small tiles so that the masked head, the aligned body and the masked tail all run, with rows
    starting at every offset modulo the vector width (odd V, several positions)."""
    from mppm_ext.triton import energy as module

    monkeypatch.setitem(module._BLOCK_V, torch.float32, 16)
    monkeypatch.setitem(module._BLOCK_V, torch.bfloat16, 16)
    monkeypatch.setattr(module, "_BLOCK_D", 16)
    for dtype in (torch.float32, torch.bfloat16):
        check(*make_inputs(1, 9, 37, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE))


@needs_triton
def test_strided_inputs():
    hidden, logits, tokens = make_inputs(3, 20, 24, 301, device=DEVICE)
    # Every other position, a vocabulary slice of a wider buffer, a batch broadcast with stride 0.
    wide = torch.randn(3, 20, 320, device=DEVICE) * 3
    logits_view = wide[:, ::2, 5:306]
    hidden_view = hidden[:1, ::2].expand(3, -1, -1)
    tokens_view = tokens[:, ::2]
    assert logits_view.stride(-1) == 1 and hidden_view.stride(0) == 0
    check(hidden_view, logits_view, tokens_view)
    # A last dimension that is not contiguous is copied first.
    check(hidden.transpose(1, 2).contiguous().transpose(1, 2), logits.transpose(1, 2).contiguous().transpose(1, 2),
          tokens)


@needs_triton
@pytest.mark.parametrize("padding", PADDINGS)
def test_masks(padding):
    hidden, logits, tokens, kwargs = padded_case(padding, *make_inputs(4, 13, 20, 333, device=DEVICE))
    result = energy(hidden, logits, tokens, **kwargs)
    assert_energy_matches(result, hidden, logits, tokens, **kwargs)
    if padding == "all_masked_row":
        assert result.stats.count[1] == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_and_equal_logits(dtype):
    hidden, logits, tokens = make_inputs(2, 11, 16, 513, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
    extreme = torch.where(torch.rand(logits.shape, device=DEVICE) > 0.5, 1e4, -1e4).to(dtype)
    extreme[..., 7] = 1e4 - 1  # a target slightly below the maximum
    check(hidden, extreme, tokens)
    near = (1.0 + 1e-3 * torch.randn(logits.shape, device=DEVICE)).to(dtype)
    check(hidden, near, tokens)
    equal = torch.full_like(logits, 2.5)
    result = energy(hidden, equal, tokens)
    lp = result.surprisal[:, :-1]
    assert torch.allclose(lp.double(), torch.full_like(lp.double(), torch.log(torch.tensor(513.0)).item()), atol=1e-6)


@needs_triton
def test_shift_invariance():
    hidden, logits, tokens = make_inputs(1, 9, 8, 1000, device=DEVICE)
    a = energy(hidden, logits, tokens).log_prob
    b = energy(hidden, logits + 1000.0, tokens).log_prob
    assert torch.allclose(a, b, atol=1e-4, equal_nan=True)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf
@pytest.mark.parametrize("where,value,match", [
    ((1, 2, 7), float("nan"), "logits holds NaN or inf in the row at batch 1, position 2"),
    ((0, 4, 0), float("inf"), "logits holds NaN or inf in the row at batch 0, position 4"),
    ((0, 4, 49), -float("inf"), "logits holds NaN or inf in the row at batch 0, position 4"),
])
def test_non_finite_logits_raise(where, value, match):
    hidden, logits, tokens = make_inputs(2, 8, 8, 50, device=DEVICE)
    logits[where] = value
    with pytest.raises(ValueError, match=match):
        energy(hidden, logits, tokens)


@needs_triton
def test_non_finite_hidden_raises():
    hidden, logits, tokens = make_inputs(2, 8, 8, 50, device=DEVICE)
    hidden[1, 3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"hidden holds NaN or inf in the step into at batch 1, position 3"):
        energy(hidden, logits, tokens)
    hidden[1, 3, 5] = 1.0
    hidden[0, 7, 0] = float("inf")  # the last state: used by the step into it only
    with pytest.raises(ValueError, match=r"hidden holds NaN or inf in the step into at batch 0, position 7"):
        energy(hidden, logits, tokens)


@needs_triton
def test_deterministic():
    hidden, logits, tokens = make_inputs(2, 17, 33, 9001, logits_dtype=torch.bfloat16, device=DEVICE)
    a, b = energy(hidden, logits, tokens), energy(hidden, logits, tokens)
    for name in mppm_ext.TOKEN_QUANTITIES:
        assert torch.equal(getattr(a, name).nan_to_num(7.0), getattr(b, name).nan_to_num(7.0)), name


@needs_triton
@settings(max_examples=12, deadline=None, phases=BOUNDED, derandomize=True)
@given(B=st.integers(1, 2), T=st.integers(3, 9), d=st.integers(1, 20), V=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 3.0, 50.0]), seed=st.integers(0, 2**16))
def test_property_matches_reference(B, T, d, V, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g).to(dtype).to(DEVICE)
    logits = (scale * torch.randn(B, T, V, generator=g)).to(dtype).to(DEVICE)
    tokens = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(DEVICE)
    check(hidden, logits, tokens, attention_mask=mask)


@needs_triton
def test_auto_passes_over_the_interpreter():
    from mppm_ext._dispatch import triton_reason

    if DEVICE == "cpu":
        assert "impl='auto' passes over" in triton_reason(torch.device("cpu"), "auto")
        assert triton_reason(torch.device("cpu"), "triton") is None


def test_unavailable_reasons():
    from mppm_ext.triton import unavailable_reason

    assert "these are on meta" in unavailable_reason(torch.device("meta"))
    # Without the interpreter (and without triton), CPU tensors get a reason, and impl="triton" raises it.
    script = ("import torch, mppm_ext; from mppm_ext.triton import unavailable_reason; "
              "print(unavailable_reason(torch.device('cpu')));"
              "x = torch.zeros(1, 3, 2); t = torch.zeros(1, 3, dtype=torch.long)\n"
              "try:\n mppm_ext.energy(x, x, t, impl='triton')\n"
              "except mppm_ext.BackendUnavailableError as e:\n print('raised:', e)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-P", "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(__file__) + "/..")
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout or "triton is not importable" in out.stdout
    assert "raised: energy: no backend can run these inputs (triton:" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cuda", reason="N*V > 2^31 needs 4.3 GB of logits: CUDA only")
@needs_triton
def test_int64_offsets():
    B, T, d, V = 1, 16400, 8, 131072
    hidden, logits, tokens = make_inputs(1, 3, d, 3, device=DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(B, T, V, device=DEVICE, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    hidden = torch.randn(B, T, d, device=DEVICE, generator=g)
    assert B * T * V > 2**31
    result = energy(hidden, logits, tokens)
    last = slice(T - 4, T)  # rows whose offsets pass 2^31 elements
    check(hidden[:, last], logits[:, last], tokens[:, last])
    tail = energy(hidden[:, last], logits[:, last], tokens[:, last])
    assert torch.equal(result.log_prob[:, last][:, :-1], tail.log_prob[:, :-1])


@needs_triton
def test_unbatched_and_int32_tokens():
    hidden, logits, tokens = make_inputs(1, 12, 10, 211, device=DEVICE)
    result = energy(hidden[0], logits[0], tokens[0].int())
    assert result.log_prob.shape == (12,)
    reference_result = energy(hidden, logits, tokens)
    assert torch.equal(result.log_energy.nan_to_num(7.0), reference_result.log_energy[0].nan_to_num(7.0))


def test_meta_tensors_name_the_device():
    hidden, logits, tokens = (t.to("meta") for t in make_inputs(1, 5, 4, 9))
    with pytest.raises(mppm_ext.BackendUnavailableError, match="triton: Triton kernels run on CUDA tensors"):
        energy(hidden, logits, tokens)
