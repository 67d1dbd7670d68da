"""The custom op under torch's own checks: opcheck (schema, fake impl, dispatch) and torch.compile."""

import pytest
import torch

import mppm_ext
from conftest import kernel_backends
from helpers import make_inputs

pytestmark = pytest.mark.parametrize("backend", kernel_backends())


def op_args(device, mask):
    hidden, logits, tokens = make_inputs(2, 9, 16, 301, logits_dtype=torch.bfloat16, device=device)
    m = torch.rand(2, 9, device=device) > 0.2 if mask else None
    return hidden, logits, tokens, tokens, m, -100, 1.0


@pytest.mark.parametrize("mask", [False, True])
def test_opcheck(backend, mask):
    _, device = backend
    torch.library.opcheck(torch.ops.mppm_ext.energy.default, op_args(device, mask))


def test_compile_fullgraph(backend):
    _, device = backend
    hidden, logits, tokens, _, mask, _, _ = op_args(device, True)

    def pipeline(h, z, x, m):
        # The op between elementwise work that inductor fuses (reductions would reorder sums).
        per_token, defined, stats, counts, parts, fault = torch.ops.mppm_ext.energy(h * 2.0, z, x, x, m, -100, 1.0)
        return per_token.neg(), defined, stats * 3.0, counts, parts, fault

    compiled = torch.compile(pipeline, fullgraph=True, dynamic=False)
    expected = pipeline(hidden, logits, tokens, mask)
    for got, want in zip(compiled(hidden, logits, tokens, mask), expected):
        assert torch.equal(got, want)


def test_compile_public_function(backend):
    impl, device = backend
    hidden, logits, tokens, _, mask, _, _ = op_args(device, True)

    def analysis(h, z, x, m):
        return mppm_ext.energy(h, z, x, attention_mask=m, impl=impl).stats.cv["log_energy"]

    eager = analysis(hidden, logits, tokens, mask)
    compiled = torch.compile(analysis)(hidden, logits, tokens, mask)
    assert torch.equal(compiled, eager)


def test_compile_public_function_fullgraph_without_check(backend):
    """check=False reads nothing back, so the public call compiles into one graph (check=True reads the
    fault word, a graph break)."""
    impl, device = backend
    hidden, logits, tokens, _, mask, _, _ = op_args(device, True)

    def analysis(h, z, x, m):
        return mppm_ext.energy(h, z, x, attention_mask=m, impl=impl, check=False).stats.cv["log_energy"]

    eager = analysis(hidden, logits, tokens, mask)
    compiled = torch.compile(analysis, fullgraph=True)(hidden, logits, tokens, mask)
    assert torch.equal(compiled, eager)
