"""energy_from_hidden against the float64 reference (full logits) on every backend, dtype and odd shape."""

import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mppm_ext
from backends_from_hidden import BACKENDS, BACKENDS_ISA, COMPILED, backend_isa  # noqa: F401 (fixture)
from helpers import assert_from_hidden_matches
from mppm_ext import streaming

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def small_tiles(monkeypatch):
    """128-column vocabulary chunks and 8-row blocks: V=997 spans 8 chunks and N=152 rows 19 blocks."""
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(streaming.BUDGETS, device_type, streaming.Budget(tile=1024, chunk=1 << 24, max_cols=128))


def problem(B, T, d, V, dtype=torch.float32, bias=False, device="cpu", scale=3.0):
    """Hidden states, an unembedding whose logits spread like a trained model's (std ``scale``), tokens."""
    g = torch.Generator().manual_seed(99 + B * 7 + T * 13 + d * 5 + V)
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) * (scale / d**0.5)
    b = torch.randn(V, generator=g).to(dtype).to(device) if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), tokens.to(device), b


def affine(norm, seed=3):
    """The norm with random (non-identity) affine parameters, so that its weights matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    return norm


def run_and_check(backend, hidden, weight, tokens, **kwargs):
    impl, device = backend
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    norm = moved.get("norm")
    if norm is not None:
        moved["norm"] = norm.to(device)
    result = mppm_ext.energy_from_hidden(hidden.to(device), weight.to(device), tokens.to(device), impl=impl, **moved)
    if norm is not None:
        kwargs["norm"] = norm.cpu()
    assert_from_hidden_matches(result.map(lambda t: t.cpu()), hidden, weight, tokens, **kwargs)
    return result


@pytest.mark.parametrize("backend_isa", BACKENDS_ISA, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (1, 7, 5, 17), (2, 77, 33, 997)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(small_tiles, backend_isa, dtype, shape, bias):
    hidden, weight, tokens, b = problem(*shape, dtype=dtype, bias=bias)
    run_and_check(backend_isa, hidden, weight, tokens, bias=b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_kind", ["rms", "layer"])
@pytest.mark.parametrize("kinetic_state", ["post", "pre"])
def test_final_norm(small_tiles, backend, norm_kind, kinetic_state):
    B, T, d, V = 2, 13, 9, 301
    hidden, weight, tokens, b = problem(B, T, d, V, bias=True)
    hidden = hidden * 5 + 2  # a pre-norm residual stream: larger and off-centre
    norm = affine(torch.nn.RMSNorm(d) if norm_kind == "rms" else torch.nn.LayerNorm(d))
    run_and_check(backend, hidden, weight, tokens, bias=b, norm=norm, kinetic_state=kinetic_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_and_ignore_index(small_tiles, backend):
    B, T, d, V = 3, 21, 7, 257
    hidden, weight, tokens, _ = problem(B, T, d, V)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # an all-masked row: no used position, NaN statistics
    tokens[0, 5] = -100
    hidden[2, 4] = float("nan")  # masked positions may hold anything
    r = run_and_check(backend, hidden, weight, tokens, attention_mask=mask, ignore_index=-100)
    assert int(r.stats.count[2]) == 0
    tokens[0, 5], tokens[1, 8] = 3, -7  # a custom ignore_index, with an integer mask
    run_and_check(backend, hidden[:2], weight, tokens[:2], attention_mask=mask[:2].int(), ignore_index=-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    hidden, weight, tokens, _ = problem(1, 11, 6, 50)
    impl, device = backend
    r = mppm_ext.energy_from_hidden(hidden[0].to(device), weight.to(device), tokens[0].to(device), impl=impl)
    assert r.log_prob.shape == (11,) and r.stats.count.shape == ()
    assert_from_hidden_matches(r.map(lambda t: t.unsqueeze(0).cpu()), hidden, weight, tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary(backend):
    """V = 50257 (GPT-2) with a small d, at the default tiling (several 4096-column chunks)."""
    hidden, weight, tokens, b = problem(1, 9, 3, 50257, bias=True)
    run_and_check(backend, hidden, weight, tokens, bias=b)


@pytest.mark.parametrize("backend", COMPILED)
def test_consistent_with_energy_on_computed_logits(backend):
    impl, device = backend
    B, T, d, V = 2, 19, 24, 1023
    hidden, weight, tokens, b = (t.to(device) for t in problem(B, T, d, V, bias=True))
    norm = affine(torch.nn.LayerNorm(d)).to(device)
    ours = mppm_ext.energy_from_hidden(hidden, weight, tokens, bias=b, norm=norm, impl=impl)
    with torch.no_grad():
        post = norm(hidden)
        theirs = mppm_ext.energy(post, post @ weight.T + b, tokens, impl=impl)
    for name in ("log_prob", "kinetic", "log_energy", "additive_energy"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=2e-5, atol=2e-5,
                                   equal_nan=True, msg=name)
    assert torch.equal(ours.valid, theirs.valid)


@pytest.mark.parametrize("backend_isa", [p for p in BACKENDS_ISA if p.id.startswith(("cpp", "cuda"))], indirect=True)
def test_bitwise_deterministic_across_runs_and_threads(backend_isa):
    impl, device = backend_isa
    hidden, weight, tokens, b = (t.to(device) for t in problem(2, 40, 16, 5003, dtype=torch.bfloat16, bias=True))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            runs.append(mppm_ext.energy_from_hidden(hidden, weight, tokens, bias=b, impl=impl))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for name in ("log_prob", "kinetic", "log_energy"):
            assert torch.equal(getattr(runs[0], name).nan_to_num(), getattr(other, name).nan_to_num()), name


@st.composite
def from_hidden_inputs(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(3, 24))
    d = draw(st.integers(1, 40))
    V = draw(st.sampled_from([1, 2, 17, 100, 1023]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "extreme", "nearly_equal", "peaked"]))
    hidden = torch.randn(B, T, d, generator=g)
    weight = torch.randn(V, d, generator=g) * (3.0 / d**0.5)
    if kind == "extreme":  # logits up to ~1e4
        weight = weight * 3e3 / d**0.5
    elif kind == "nearly_equal":
        weight = 1.0 + 1e-6 * weight
    elif kind == "peaked":
        weight[0] = 30.0 * hidden.reshape(-1, d).mean(0) / (hidden.reshape(-1, d).mean(0).norm() ** 2 + 1e-3)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3 if draw(st.booleans()) else None
    bias = torch.randn(V, generator=g) if draw(st.booleans()) else None
    dtype = draw(st.sampled_from(DTYPES))
    to = (lambda t: None if t is None else t.to(dtype))
    return to(hidden), to(weight), tokens, mask, to(bias)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=from_hidden_inputs())
def test_property_matches_reference(backend, data):
    hidden, weight, tokens, mask, bias = data
    run_and_check(backend, hidden, weight, tokens, bias=bias, attention_mask=mask)


PEAK_SCRIPT = """
import resource, torch, mppm_ext
N, V, d = 4096, 50257, 64
mppm_ext.energy_from_hidden(torch.randn(1, 8, d), torch.randn(V, d), torch.randint(0, V, (1, 8)), impl="cpp")
hidden = torch.randn(1, N, d)
weight = torch.randn(V, d) / 8
tokens = torch.randint(0, V, (1, N))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mppm_ext.energy_from_hidden(hidden, weight, tokens, impl="cpp")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


@pytest.mark.slow
def test_peak_memory_has_no_logits_allocation():
    """A fresh process (its peak is its own) scores N=4096 positions over V=50257: the [N, V] float32
    logits would add 823 MB; the streaming pass may add one 16 MiB tile, a converted chunk and O(N*d)."""
    out = subprocess.run([sys.executable, "-P", "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True,
                         timeout=300)
    extra = int(out.stdout.strip().splitlines()[-1])
    bound = 128 * 2**20
    assert extra < bound, f"energy_from_hidden added {extra / 2**20:.0f} MiB of peak memory (bound 128 MiB)"
