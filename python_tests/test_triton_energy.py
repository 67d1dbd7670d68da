"""The Triton energy kernel (mppm_ext.triton.energy.energy_parts) against the float64 reference, plane
by plane (log_prob, kinetic, entropy, logsumexp: the issue 12 contract): shapes, dtypes, tile
boundaries, strides, masks, labels apart from tokens, temperature, -inf logits, non-finite rows,
determinism; then mppm_ext.energy(impl="triton") end to end, and the backend's availability."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import mppm_ext
from helpers import PADDINGS, assert_close, assert_energy_matches, make_inputs, padded_case
from mppm_ext import reference
from triton_support import DEVICE, needs_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PLANES = ("log_prob", "kinetic", "entropy", "logsumexp")
# No shrinking: under the interpreter it takes minutes; a failure is reported as drawn.
BOUNDED = (Phase.explicit, Phase.reuse, Phase.generate)
NEG_INF = float("-inf")


def masks(tokens, labels=None, attention_mask=None, ignore_index=-100):
    """(real states, scored targets), as the caller computes them."""
    return (reference.real_tokens(tokens, attention_mask, ignore_index),
            reference.scored_targets(tokens, labels, attention_mask, ignore_index))


def parts(hidden, logits, tokens, labels=None, attention_mask=None, ignore_index=-100, temperature=1.0):
    """The kernel's [4, B, T] planes, called as the caller does: ids clamped into the vocabulary, the
    tokens standing in for absent labels."""
    from mppm_ext.triton.energy import energy_parts

    V = logits.shape[-1]
    real, scored = masks(tokens, labels, attention_mask, ignore_index)
    targets = tokens if labels is None else labels
    return energy_parts(hidden, logits, tokens.clamp(0, V - 1), targets.clamp(0, V - 1), real, scored,
                        1.0 / temperature)


def reference_planes(hidden, logits, tokens, dtype, labels=None, attention_mask=None, ignore_index=-100,
                     temperature=1.0):
    """The reference's four planes, computed in ``dtype`` on the CPU."""
    hidden, logits, tokens = hidden.cpu().to(dtype), logits.cpu().to(dtype), tokens.cpu()
    labels = None if labels is None else labels.cpu()
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    real, scored = masks(tokens, labels, attention_mask, ignore_index)
    targets = tokens if labels is None else labels
    entropy, lse = reference.entropy_logsumexp(logits, real, temperature)
    return torch.stack([reference.token_log_prob(logits, targets, real, scored, temperature),
                        reference.kinetic(hidden, real), entropy, lse])


def check(hidden, logits, tokens, **kwargs):
    """Every plane against the float64 truth, the float32 reference setting the bound."""
    ours = parts(hidden, logits, tokens, **kwargs)
    assert ours.dtype == torch.float64 and ours.shape == (4, *tokens.shape)
    truth = reference_planes(hidden, logits, tokens, torch.float64, **kwargs)
    ref = reference_planes(hidden, logits, tokens, torch.float32, **kwargs)
    for i, name in enumerate(PLANES):
        assert_close(ours[i], ref[i], truth[i], name)
    return ours


def scatter_neg_inf(logits, fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    hole = (torch.rand(logits.shape, generator=g) < fraction).to(logits.device)
    return torch.where(hole, NEG_INF, logits)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,d,V", [(1, 3, 1, 1), (1, 7, 33, 17), (2, 11, 33, 997), (1, 5, 64, 2053),
                                     (1, 4, 16, 50257)])
def test_shapes_and_dtypes(dtype, B, T, d, V):
    check(*make_inputs(B, T, d, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("hidden_dtype,logits_dtype", [(torch.float32, torch.bfloat16),
                                                       (torch.float16, torch.float32)], ids=str)
def test_mixed_dtypes(hidden_dtype, logits_dtype):
    check(*make_inputs(2, 9, 40, 1009, hidden_dtype=hidden_dtype, logits_dtype=logits_dtype, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.7])
@pytest.mark.parametrize("V", [17, 2053])
def test_temperature(dtype, temperature, V):
    """Inside every softmax quantity, not in K; 0.7 has no exact binary inverse."""
    hidden, logits, tokens = make_inputs(2, 6, 9, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
    at_one = check(hidden, logits, tokens)
    scaled = check(hidden, logits, tokens, temperature=temperature)
    assert torch.equal(scaled[1].nan_to_num(7.0), at_one[1].nan_to_num(7.0)), "the temperature moved K"
    assert not torch.equal(scaled[2].nan_to_num(7.0), at_one[2].nan_to_num(7.0)), "the temperature was ignored"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_labels_apart_from_tokens(dtype):
    """Hugging Face style labels: -100 over a prompt (targets not scored, states still real, so the
    entropy and logsumexp are there), ids that differ from the tokens after it, and padding."""
    B, T, V = 3, 12, 997
    hidden, logits, tokens = make_inputs(B, T, 14, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    labels[:, :4] = -100
    labels[1, 7] = -100
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[2, -3:] = 0
    ours = check(hidden, logits, tokens, labels=labels, attention_mask=mask)
    assert ours[0, :, :3].isnan().all() and ours[0, 0, 3:-1].isfinite().all() and ours[0, 1, 6].isnan()
    assert ours[2:, 0, :4].isfinite().all()
    # Labels equal to the tokens are the tokens' answer.
    assert torch.equal(check(hidden, logits, tokens, labels=tokens.clone()).nan_to_num(7.0),
                       check(hidden, logits, tokens).nan_to_num(7.0))


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # the interpreter's numpy: log 0
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # and 0 / 0 in the -inf row
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 17, 997, 2053])
def test_neg_inf_logits(dtype, V):
    """-inf logits have probability 0 and add 0 to every sum (the entropy's sum of p log p too); a -inf
    target gives log_prob -inf; a row of only -inf gives logsumexp -inf (the caller reports it)."""
    B, T = 2, 7
    hidden, logits, tokens = make_inputs(B, T, 5, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
    if V > 1:
        logits = scatter_neg_inf(logits, 0.3)
        logits[0, 2, tokens[0, 3]] = NEG_INF  # a -inf target
        logits[1, 4] = NEG_INF
        logits[1, 4, tokens[1, 5]] = 1.0  # one finite logit: p = 1 there, log_prob 0, entropy 0
    logits[1, 1] = NEG_INF  # no finite logit at all
    ours = check(hidden, logits, tokens)
    if V > 1:
        assert ours[0, 0, 2] == NEG_INF and ours[1:, 0, 2].isfinite().all()
        assert ours[0, 1, 4] == 0.0 and ours[2, 1, 4] == 0.0 and ours[3, 1, 4] == 1.0
    assert ours[3, 1, 1] == NEG_INF and ours[0, 1, 1].isnan() and ours[2, 1, 1].isnan()


@needs_triton
@pytest.mark.parametrize("V", [1, 7, 8, 9, 63, 64, 65, 200])
def test_tile_boundaries(monkeypatch, V):
    """Small tiles so that the masked head, the aligned body and the masked quarter-tile tail all run,
    with rows starting at every offset modulo the vector width (odd V, several positions), and -inf
    logits landing in each of them."""
    from mppm_ext.triton import energy as module

    # Two bf16 slots (four fp32) of 8 (4) lanes, four rows a tile: 64-element tiles, 16-element tail tiles.
    monkeypatch.setitem(module._BLOCK_V, torch.float32, 64)
    monkeypatch.setitem(module._BLOCK_V, torch.bfloat16, 64)
    monkeypatch.setattr(module, "_BLOCK_D", 16)
    for dtype in (torch.float32, torch.bfloat16):
        hidden, logits, tokens = make_inputs(1, 9, 37, V, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
        check(hidden, logits, tokens)
        check(hidden, scatter_neg_inf(logits, 0.2, seed=V), tokens, temperature=0.5)


@needs_triton
def test_strided_inputs():
    hidden, logits, tokens = make_inputs(3, 20, 24, 301, device=DEVICE)
    # Every other position, a vocabulary slice of a wider buffer, a batch broadcast with stride 0.
    wide = torch.randn(3, 20, 320, device=DEVICE) * 3
    logits_view = wide[:, ::2, 5:306]
    hidden_view = hidden[:1, ::2].expand(3, -1, -1)
    tokens_view = tokens[:, ::2]
    labels_view = torch.randint(0, 301, (3, 20), device=DEVICE)[:, 1::2]
    assert logits_view.stride(-1) == 1 and hidden_view.stride(0) == 0 and labels_view.stride(1) == 2
    check(hidden_view, logits_view, tokens_view, labels=labels_view)


@needs_triton
def test_unit_stride_required():
    from mppm_ext.triton.energy import energy_parts

    hidden, logits, tokens = make_inputs(1, 5, 4, 9, device=DEVICE)
    real = torch.ones_like(tokens, dtype=torch.bool)
    with pytest.raises(ValueError, match="unit stride along their last dimension"):
        energy_parts(hidden, logits.transpose(1, 2).contiguous().transpose(1, 2), tokens, tokens, real, real, 1.0)


@needs_triton
@pytest.mark.parametrize("padding", PADDINGS)
def test_masks(padding):
    """Padded positions hold garbage (NaN logits, inf states, ids outside the vocabulary) that must not
    be read."""
    hidden, logits, tokens, kwargs = padded_case(padding, *make_inputs(4, 13, 20, 333, device=DEVICE))
    ours = check(hidden, logits, tokens, **kwargs)
    if padding == "all_masked_row":
        assert ours[:, 1].isnan().all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_and_equal_logits(dtype):
    hidden, logits, tokens = make_inputs(2, 11, 16, 513, hidden_dtype=dtype, logits_dtype=dtype, device=DEVICE)
    extreme = torch.where(torch.rand(logits.shape, device=DEVICE) > 0.5, 1e4, -1e4).to(dtype)
    extreme[..., 7] = 1e4 - 1  # a target slightly below the maximum
    check(hidden, extreme, tokens)
    near = (1.0 + 1e-3 * torch.randn(logits.shape, device=DEVICE)).to(dtype)
    check(hidden, near, tokens, temperature=2.0)
    equal = parts(hidden, torch.full_like(logits, 2.5), tokens)
    log_v = torch.log(torch.tensor(513.0, dtype=torch.float64)).item()
    for plane, value in ((0, -log_v), (2, log_v), (3, 2.5 + log_v)):
        got = equal[plane, :, :-1] if plane == 0 else equal[plane]
        assert torch.allclose(got, torch.full_like(got, value), rtol=0, atol=1e-6), PLANES[plane]


@needs_triton
def test_shift_invariance():
    hidden, logits, tokens = make_inputs(1, 9, 8, 1000, device=DEVICE)
    a, b = parts(hidden, logits, tokens), parts(hidden, logits + 1000.0, tokens)
    assert torch.allclose(a[0], b[0], atol=1e-4, equal_nan=True)
    assert torch.allclose(a[2], b[2], atol=1e-4, equal_nan=True)
    assert torch.allclose(a[3] + 1000.0, b[3], atol=1e-4, equal_nan=True)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("column", [0, 49])
def test_non_finite_rows_give_nan(value, column):
    """NaN or +inf in a row that is read makes every plane it feeds NaN, at that row only (so that the
    caller can find it); in a row that is not read (a padded position) it changes nothing."""
    hidden, logits, tokens = make_inputs(2, 8, 8, 50, device=DEVICE)
    mask = torch.ones(2, 8, dtype=torch.long, device=DEVICE)
    mask[0, 5] = 0
    clean = parts(hidden, logits, tokens, attention_mask=mask)
    logits[1, 2, column] = value  # real and scored next: log_prob, entropy and logsumexp read it
    logits[0, 7, column] = value  # the last position: entropy and logsumexp only
    logits[0, 5, column] = value  # padding: not read
    ours = parts(hidden, logits, tokens, attention_mask=mask)
    fed = torch.zeros_like(ours, dtype=torch.bool)
    fed[[0, 2, 3], 1, 2] = True
    fed[[2, 3], 0, 7] = True
    assert ours[fed].isnan().all()
    assert torch.equal(ours[~fed].nan_to_num(7.0), clean[~fed].nan_to_num(7.0))


@needs_triton
def test_deterministic():
    hidden, logits, tokens = make_inputs(2, 17, 33, 9001, logits_dtype=torch.bfloat16, device=DEVICE)
    a, b = parts(hidden, logits, tokens, temperature=0.7), parts(hidden, logits, tokens, temperature=0.7)
    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))


@needs_triton
def test_int32_ids():
    hidden, logits, tokens = make_inputs(1, 12, 10, 211, device=DEVICE)
    labels = torch.where(torch.arange(12, device=DEVICE) < 3, -100, tokens.roll(1, -1))
    wide = parts(hidden, logits, tokens, labels=labels)
    narrow = parts(hidden, logits, tokens.int(), labels=labels.int())
    assert torch.equal(wide.nan_to_num(7.0), narrow.nan_to_num(7.0))


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # rows left with no finite logit
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@settings(max_examples=12, deadline=None, phases=BOUNDED, derandomize=True)
@given(B=st.integers(1, 2), T=st.integers(3, 9), d=st.integers(1, 20), V=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), scale=st.sampled_from([1e-3, 3.0, 50.0]),
       temperature=st.sampled_from([1.0, 0.5, 2.0, 1.3]), holes=st.sampled_from([0.0, 0.1, 0.6]),
       seed=st.integers(0, 2**16))
def test_property_matches_reference(B, T, d, V, dtype, scale, temperature, holes, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=g).to(dtype).to(DEVICE)
    logits = scatter_neg_inf((scale * torch.randn(B, T, V, generator=g)).to(dtype), holes, seed).to(DEVICE)
    tokens = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    labels = torch.where(torch.rand(B, T, generator=g) > 0.3, torch.randint(0, V, (B, T), generator=g), -100)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(DEVICE)
    check(hidden, logits, tokens, labels=labels.to(DEVICE), attention_mask=mask, temperature=temperature)


# ------------------------------------------------------------------------------- through mppm_ext.energy


def energy(hidden, logits, tokens, **kwargs):
    return mppm_ext.energy(hidden, logits, tokens, impl="triton", **kwargs)


@needs_triton
@pytest.mark.parametrize("padding", ["holes", "all_masked_row"])
def test_public_energy_matches_reference(padding):
    hidden, logits, tokens, kwargs = padded_case(padding, *make_inputs(4, 13, 20, 333, device=DEVICE))
    assert_energy_matches(energy(hidden, logits, tokens, **kwargs), hidden, logits, tokens, **kwargs)
    result = energy(hidden[0], logits[0], tokens[0].int(), attention_mask=kwargs["attention_mask"][0])
    assert result.log_prob.shape == (13,)


@needs_triton
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on inf
@pytest.mark.parametrize("where,value,match", [
    ((1, 2, 7), float("nan"), "logits holds NaN or inf in the row at batch 1, position 2"),
    ((0, 4, 0), float("inf"), "logits holds NaN or inf in the row at batch 0, position 4"),
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


def test_meta_tensors_name_the_device():
    hidden, logits, tokens = (t.to("meta") for t in make_inputs(1, 5, 4, 9))
    with pytest.raises(mppm_ext.BackendUnavailableError, match="triton: Triton kernels run on CUDA tensors"):
        energy(hidden, logits, tokens)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cuda", reason="N*V > 2^31 needs 4.3 GB of logits: CUDA only")
@needs_triton
def test_int64_offsets():
    B, T, d, V = 1, 16400, 8, 131072
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(B, T, V, device=DEVICE, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), device=DEVICE, generator=g)
    hidden = torch.randn(B, T, d, device=DEVICE, generator=g)
    assert B * T * V > 2**31
    whole = parts(hidden, logits, tokens)
    last = slice(T - 4, T)  # rows whose offsets pass 2^31 elements
    tail = check(hidden[:, last], logits[:, last], tokens[:, last])
    assert torch.equal(whole[[0], :, last][..., :-1], tail[[0], :, :-1])
    assert torch.equal(whole[2:, :, last], tail[2:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@needs_triton
def test_second_device():
    """A launch runs on its tensors' device, not on the current one."""
    hidden, logits, tokens = make_inputs(2, 9, 16, 500, device="cuda:1")
    with torch.cuda.device(0):
        check(hidden, logits, tokens)
