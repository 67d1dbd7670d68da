"""Inputs past 32-bit offsets: slow (a few seconds, 4.3 GB), but part of every CI run."""

import math
import subprocess
import sys

import pytest
import torch

import mppm_ext
from conftest import kernel_backends
from helpers import assert_energy_matches

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backend", kernel_backends())
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
        whole, alone = getattr(r, name)[0, tail][1:-1], getattr(sub, name)[0, 1:-1]
        if device == "cpu":
            assert torch.equal(whole, alone), name  # one row kernel, one summation order
        else:
            # 12 rows take the CUDA row-split path (partial sums combined across blocks), the full call the
            # one-block-per-row path: two summation orders of the same float32 values.
            torch.testing.assert_close(whole, alone, rtol=2e-6, atol=2e-6)
    assert_energy_matches(sub, sub_h, sub_z, sub_x)


@pytest.mark.parametrize("backend", kernel_backends())
def test_one_long_sequence_with_wide_states(backend):
    """T = 32768 in one sequence and d = 8192: the statistics and the kinetic path at full length."""
    impl, device = backend
    T, d, V = 32768, 8192, 97
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(1, T, d, generator=g).bfloat16().to(device)
    logits = (3 * torch.randn(1, T, V, generator=g)).to(device)
    tokens = torch.randint(0, V, (1, T), generator=g).to(device)
    assert_energy_matches(mppm_ext.energy(hidden, logits, tokens, impl=impl), hidden, logits, tokens)


PEAK_SCRIPT = """
import resource, torch, mppm_ext
N, V, d = 16384, 50257, 1024
# A small call first, so that one-time costs (lazy imports, thread stacks) are not counted.
mppm_ext.energy(torch.randn(1, 8, d), torch.randn(1, 8, V).bfloat16(), torch.randint(0, V, (1, 8)), impl="cpp")
logits = torch.full((1, N, V), 0.5, dtype=torch.bfloat16)  # written, so its pages are resident
hidden = torch.randn(1, N, d)
tokens = torch.randint(0, V, (1, N))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mppm_ext.energy(hidden, logits, tokens, impl="cpp")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_peak_memory_is_linear_in_tokens():
    """A fresh process (so that its peak is its own) runs energy on 1.6 GB of bf16 logits; the call may
    add O(N) outputs and scratch but nothing near the 3.3 GB a float32 [N, V] temporary would take
    (the reference adds 5.5 GB here)."""
    out = subprocess.run([sys.executable, "-P", "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    N = 16384
    bound = 16 * 2**20 + 256 * N  # allocator slack + a generous O(N) allowance (the outputs take ~60 B/token)
    assert extra < bound, f"energy added {extra / 2**20:.0f} MiB of peak memory (bound {bound / 2**20:.0f} MiB)"
