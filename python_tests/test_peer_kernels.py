"""Issue 12 at the op level (mppm_ext.ops, i.e. the compiled kernels without the public API's validation):
labels separate from tokens, the temperature, legal -inf logits, and the per-token entropy and logsumexp,
against the float64 reference with the tolerance rule of helpers.py, on every CPU instruction set and
logits dtype; and softmax_tile's temperature and entropy accumulator against a torch computation."""

import pytest
import torch

from helpers import assert_result_matches, make_inputs, reference_pair
from mppm_ext import ops, reference
from mppm_ext._validate import fused_fault
from mppm_ext.results import unpack_energy

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def op_energy(hidden, logits, tokens, labels=None, mask=None, temperature=1.0):
    """EnergyResult of the fused op (Python passes the tokens as labels when there are none); a fault in its
    fault word raises as the public function raises it."""
    labels = tokens if labels is None else labels
    out = ops.energy_op(hidden, logits, tokens, labels, mask, IGNORE, 1.0 / temperature)
    fused_fault(out[5], tokens, labels, logits.shape[-1])
    return unpack_energy(*out[:4])


def check(hidden, logits, tokens, labels=None, mask=None, temperature=1.0):
    result = op_energy(hidden, logits, tokens, labels, None if mask is None else mask.to(torch.uint8), temperature)
    assert_result_matches(result, *reference_pair(hidden, logits, tokens, labels=labels, attention_mask=mask,
                                                   temperature=temperature))
    return result


def with_neg_inf(logits, seed=0):
    """Scattered -inf (about one logit in five), a row with one finite entry, a target logit of -inf."""
    g = torch.Generator().manual_seed(seed)
    logits = logits.clone()
    logits[torch.rand(logits.shape, generator=g) < 0.2] = float("-inf")
    logits[0, 1, 1:] = float("-inf")
    logits[0, 1, 0] = 3.0
    return logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 17, 997, 50257])
def test_neg_inf_logits(cpu_isa, dtype, V):
    hidden, logits, tokens = make_inputs(2, 9, 16, V, hidden_dtype=dtype, logits_dtype=dtype)
    logits = with_neg_inf(logits) if V > 1 else logits
    if V > 1:
        tokens[1, 4] = 5
        logits[1, 3, 5] = float("-inf")  # the target of state 3: log_prob -inf, not a fault
    result = check(hidden, logits, tokens)
    if V > 1:
        assert result.log_prob[1, 3] == float("-inf")
        assert result.entropy[0, 1] == 0.0  # one finite entry: probability 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [17, 997, 50257])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature(cpu_isa, dtype, V, temperature):
    hidden, logits, tokens = make_inputs(2, 11, 16, V, hidden_dtype=dtype, logits_dtype=dtype)
    check(hidden, with_neg_inf(logits, seed=V), tokens, temperature=temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 17, 997, 50257])
def test_completion_labels(cpu_isa, dtype, V):
    """HF-style completion mask: labels -100 on the prompt; the first completion token is scored from the
    last prompt state, while every real state still has its entropy, logsumexp and kinetic step."""
    hidden, logits, tokens = make_inputs(2, 13, 16, V, hidden_dtype=dtype, logits_dtype=dtype)
    labels = tokens.clone()
    prompt = [5, 9]
    for b, n in enumerate(prompt):
        labels[b, :n] = IGNORE
    labels[1, 11] = (tokens[1, 11] + 1) % V  # a label that differs from the token
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, 12] = False
    result = check(hidden, logits, tokens, labels=labels, mask=mask)
    assert result.log_prob[0, :4].isnan().all() and not result.log_prob[0, 4].isnan()
    assert not result.entropy[0, :5].isnan().any() and not result.kinetic[0, 1:5].isnan().any()


def test_labels_default_to_tokens():
    hidden, logits, tokens = make_inputs(2, 9, 8, 97)
    a, b = op_energy(hidden, logits, tokens), op_energy(hidden, logits, tokens, labels=tokens.clone())
    for name in ("log_prob", "entropy", "logsumexp", "energy"):
        assert torch.equal(getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num()), name


def test_label_out_of_range():
    hidden, logits, tokens = make_inputs(2, 9, 8, 50)
    labels = tokens.clone()
    labels[1, 4] = 50
    with pytest.raises(ValueError, match=r"labels\[1, 4\] = 50 is outside the vocabulary \[0, 50\)"):
        op_energy(hidden, logits, tokens, labels=labels)
    labels[1, 4] = IGNORE  # not scored: fine
    op_energy(hidden, logits, tokens, labels=labels)
    labels[0, 0] = 99  # no state before it: never a target, never read
    op_energy(hidden, logits, tokens, labels=labels)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_pos_inf_still_rejected(cpu_isa, value, dtype):
    hidden, logits, tokens = make_inputs(2, 9, 8, 997, hidden_dtype=dtype, logits_dtype=dtype)
    logits = with_neg_inf(logits)
    logits[1, 8, 990] = value  # the last state: read for its entropy only
    with pytest.raises(ValueError, match="logits holds NaN or inf in the row at batch 1, position 8"):
        op_energy(hidden, logits, tokens)


@pytest.mark.parametrize("V", [1, 17, 997, 50257])
def test_row_without_finite_entry(cpu_isa, V):
    hidden, logits, tokens = make_inputs(2, 9, 8, V)
    logits[1, 6] = float("-inf")
    with pytest.raises(ValueError, match="logits row at batch 1, position 6 has no finite entry"):
        op_energy(hidden, logits, tokens)
    mask = torch.ones(2, 9, dtype=torch.uint8)
    mask[1, 6] = 0  # a padded state's row is not read
    op_energy(hidden, logits, tokens, mask=mask)


def torch_fold(tiles, temperature, targets):
    """(lse, entropy, picked) of the float64 softmax of the concatenated tiles / temperature."""
    x = torch.cat(tiles, dim=1).double() / temperature
    p = torch.softmax(x, dim=1)
    return torch.logsumexp(x, dim=1), torch.special.entr(p).sum(1), x.gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("moments", [False, True], ids=["log_prob", "moments"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("C", [1, 17, 997])
def test_softmax_tile_entropy_and_temperature(cpu_isa, moments, temperature, C):
    R, n_tiles = 5, 3
    g = torch.Generator().manual_seed(C)
    tiles = [3 * torch.randn(R, C, generator=g) for _ in range(n_tiles)]
    tiles[0][0] = float("-inf")  # a tile row of -inf only adds nothing
    tiles[1][1, ::2] = float("-inf")
    targets = torch.randint(0, n_tiles * C, (R,), generator=g)
    targets[1] = C  # a -inf target logit
    run_max = torch.full((R,), float("-inf"), dtype=torch.float64)
    run_sum, run_ent, picked = (torch.zeros(R, dtype=torch.float64) for _ in range(3))
    bad_col = torch.full((R,), -1, dtype=torch.int64)
    alpha = torch.empty(R) if moments else None
    for k, tile in enumerate(tiles):
        z = tile.clone()
        ops.softmax_tile_op(z, k * C, 1.0 / temperature, run_max, run_sum, run_ent, bad_col, targets, picked, alpha)
        x = tile / temperature
        if moments:
            assert not alpha.isnan().any()
            want = torch.exp(x.double() - run_max.unsqueeze(1)).nan_to_num(nan=0.0)  # -inf - -inf: nothing seen
            torch.testing.assert_close(z.double(), want, rtol=2e-6, atol=1e-7)
        else:
            assert torch.equal(z, x)
    lse, entropy, want_picked = torch_fold(tiles, temperature, targets)
    assert (bad_col == -1).all()
    torch.testing.assert_close(run_max + run_sum.log(), lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run_sum.log() - run_ent / run_sum, entropy, rtol=1e-6, atol=1e-6)
    assert torch.equal(picked, want_picked.float().double())


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_softmax_tile_bad_col(cpu_isa, value):
    z = torch.randn(3, 40)
    z[1, 7] = float("-inf")
    z[1, 9] = value
    run_max = torch.full((3,), float("-inf"), dtype=torch.float64)
    run_sum = torch.zeros(3, dtype=torch.float64)
    bad_col = torch.full((3,), -1, dtype=torch.int64)
    ops.softmax_tile_op(z, 100, 1.0, run_max, run_sum, None, bad_col, None, None, None)
    assert bad_col.tolist() == [-1, 109, -1]
    assert run_max[1] == float("-inf") and run_sum[1] == 0.0  # the faulty row's state is left alone


def test_reference_entropy_is_the_definition():
    """The specification itself: entropy = -sum p log p with 0 log 0 = 0, logsumexp of z / temperature."""
    z = torch.tensor([[[0.0, float("-inf"), 1.0]]], dtype=torch.float64)
    h, lse = reference.entropy_logsumexp(z, torch.ones(1, 1, dtype=torch.bool), temperature=2.0)
    p = torch.softmax(torch.tensor([0.0, 0.5], dtype=torch.float64), 0)
    assert torch.allclose(h, -(p * p.log()).sum()) and torch.allclose(lse, torch.logsumexp(torch.tensor([0.0, 0.5]).double(), 0))
