"""mppm_ext._C.energy_finish called directly: the energy op's finish on parts computed elsewhere.

It must give bitwise what the energy op gives from the same parts (the op is its row pass + this
finish), ignore the parts that are not defined and the planes past the fourth, agree with a float64
computation of the definitions written here, and reject every malformed view with an exception that
names the argument."""

import math

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from helpers import make_inputs
from mppm_ext import _dispatch

LOG_PROB, KINETIC, STATE = 1, 2, 4  # the kDefined* bits
P = 4  # the parts planes: log_prob, kinetic, entropy, logsumexp


def _c():
    return _dispatch.compiled()


def finish(parts, defined, num_threads=1):
    """(out_tokens, out_stats, out_counts) of _C.energy_finish on CPU tensors."""
    _, B, T = parts.shape
    out = (torch.empty(_c().NUM_TOKEN_QUANTITIES, B, T), torch.empty(B, _c().NUM_STAT_COLUMNS),
           torch.empty(B, _c().NUM_COUNT_COLUMNS, dtype=torch.int64))
    _c().energy_finish(to_dlpack(parts), to_dlpack(defined), *map(to_dlpack, out), to_dlpack(workspace()),
                       num_threads, 0)
    return out


def workspace():
    """The workspace of a CPU call: the CPU kernels need none."""
    return torch.empty(0, dtype=torch.uint8)


def energy(hidden, logits, tokens, mask=None, labels=None, inv_temperature=1.0):
    """(out_tokens, out_defined, out_stats, out_counts, scratch) of _C.energy."""
    B, T = tokens.shape
    out = (torch.empty(_c().NUM_TOKEN_QUANTITIES, B, T), torch.empty(B, T, dtype=torch.uint8),
           torch.empty(B, _c().NUM_STAT_COLUMNS), torch.empty(B, _c().NUM_COUNT_COLUMNS, dtype=torch.int64),
           torch.empty(P, B, T, dtype=torch.float64))
    fault = torch.empty(1, dtype=torch.int64)
    _c().energy(to_dlpack(hidden), to_dlpack(logits), to_dlpack(tokens), to_dlpack(tokens if labels is None else labels),
                None if mask is None else to_dlpack(mask), -100, inv_temperature, *map(to_dlpack, out),
                to_dlpack(fault), to_dlpack(workspace()), 2, 0)
    assert int(fault) == -1, "these inputs hold no fault"
    return out


def bits(t):
    """The bytes of a tensor, so that equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return t.contiguous().view(torch.uint8)


def assert_bitwise(got, want):
    for name, g, w in zip(("out_tokens", "out_stats", "out_counts"), got, want):
        assert torch.equal(bits(g), bits(w)), f"{name} differs bitwise"


@pytest.mark.parametrize("B,T,d,V,dtype,masked", [
    (1, 1, 3, 5, torch.float32, False),
    (3, 17, 8, 50, torch.float32, True),
    (2, 129, 33, 257, torch.bfloat16, True),
    (5, 40, 16, 1000, torch.float16, False),
    (2, 0, 4, 7, torch.float32, False),
])
def test_energy_is_its_parts_plus_the_finish(B, T, d, V, dtype, masked):
    hidden, logits, tokens = make_inputs(B, T, d, V, hidden_dtype=dtype, logits_dtype=dtype)
    if T > 3:
        hidden[0, 2] = hidden[0, 1]  # a zero kinetic step, counted apart
    mask = None
    if masked:
        mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(T)) > 0.25).to(torch.uint8)
        tokens = tokens.masked_fill(mask == 0, -100)
    out_tokens, defined, stats, counts, scratch = energy(hidden, logits, tokens, mask)
    assert_bitwise(finish(scratch, defined), (out_tokens, stats, counts))


def random_parts(B, T, planes=P, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = torch.empty(planes, B, T, dtype=torch.float64)
    parts[0] = -torch.rand(B, T, generator=g, dtype=torch.float64) * 8  # log_prob < 0
    parts[1] = torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # kinetic >= 0
    parts[2] = torch.rand(B, T, generator=g, dtype=torch.float64) * 9  # entropy >= 0
    parts[3] = torch.randn(B, T, generator=g, dtype=torch.float64) * 20  # logsumexp
    if planes > P:
        parts[P:] = torch.randn(planes - P, B, T, generator=g, dtype=torch.float64)
    defined = torch.randint(0, 8, (B, T), generator=g, dtype=torch.uint8)
    defined[:, 0] = defined[:, 0] | LOG_PROB
    return parts, defined


def test_ignores_undefined_parts_and_later_planes():
    parts, defined = random_parts(3, 50)
    want = finish(parts, defined)
    garbage = torch.cat([parts, torch.full((2, 3, 50), float("nan"), dtype=torch.float64)])
    garbage[0][(defined & LOG_PROB) == 0] = float("nan")
    garbage[1][(defined & KINETIC) == 0] = -float("inf")
    garbage[2][(defined & STATE) == 0] = float("nan")
    garbage[3][(defined & STATE) == 0] = float("inf")
    assert_bitwise(finish(garbage, defined), want)


def test_thread_count_changes_nothing():
    parts, defined = random_parts(7, 333, seed=3)
    assert_bitwise(finish(parts, defined, num_threads=2), finish(parts, defined, num_threads=1))


def test_values_follow_the_definitions():
    """Against a float64 computation of the definitions (see csrc/include/mppm/energy.h): each float32
    output is its float64 value rounded once, so one float32 ulp bounds the difference."""
    B, T = 3, 64
    parts, defined = random_parts(B, T, seed=5)
    parts[1, 1, 10] = 0.0
    defined[1, 10] = LOG_PROB | KINETIC | STATE  # a valid zero kinetic: counted apart, left out of the statistics
    defined[2] = 0  # a sequence with nothing valid: NaN statistics
    defined[0] |= STATE  # the entropy and logsumexp, defined at every position of the first sequence
    out_tokens, stats, counts = finish(parts, defined)
    lp, k, entropy, lse = parts
    has_lp, has_k, has_state = ((defined & bit) != 0 for bit in (LOG_PROB, KINETIC, STATE))
    valid = has_lp & has_k
    log_k = k.log()
    planes = [(lp, has_lp), (-lp, has_lp), (k, has_k), (log_k, has_k), ((log_k - lp).exp(), valid),
              (log_k - lp, valid), (k + lp, valid), (log_k + lp, valid), (entropy, has_state), (lse, has_state)]
    close = dict(rtol=2.0 ** -23, atol=0.0)
    for q, (value, where) in enumerate(planes):
        torch.testing.assert_close(out_tokens[q], torch.where(where, value, 0.0).float(), **close, msg=f"plane {q}")
    used = valid & (k > 0)
    assert counts[:, 0].tolist() == used.sum(1).tolist()
    assert counts[:, 1].tolist() == (valid & (k == 0)).sum(1).tolist()
    n_q = (stats.shape[1] - 1) // 3
    for b in range(B):
        u = used[b]
        if not u.any():
            assert stats[b].isnan().all()
            continue
        values = [planes[q][0][b, u] for q in range(8)]
        # A valid position whose state bit is clear has no entropy and logsumexp: NaN statistics of them.
        values += [torch.where(has_state[b, u], x[b, u], float("nan")) for x in (entropy, lse)]
        values += [(-lp[b, u]).exp()]
        for q, v in enumerate(values):
            mean, sd = v.mean(), v.std(correction=0)
            torch.testing.assert_close(stats[b, q], mean.float(), **close, equal_nan=True)
            torch.testing.assert_close(stats[b, n_q + q], sd.float(), **close, equal_nan=True)
            torch.testing.assert_close(stats[b, 2 * n_q + q], (sd / mean.abs()).float(), **close, equal_nan=True)
        corr = torch.corrcoef(torch.stack([values[3], values[1]]))[0, 1]
        assert math.isclose(stats[b, 3 * n_q].item(), corr.item(), rel_tol=1e-6)


class TestBadViews:
    """Each malformed argument raises TypeError (dtype) or ValueError (the rest) naming it."""

    B, T = 2, 6

    def args(self, **over):
        B, T = self.B, self.T
        parts, defined = random_parts(B, T)
        args = {"parts": parts, "defined": defined, "out_tokens": torch.empty(10, B, T),
                "out_stats": torch.empty(B, _c().NUM_STAT_COLUMNS),
                "out_counts": torch.empty(B, _c().NUM_COUNT_COLUMNS, dtype=torch.int64),
                "workspace": workspace(), "num_threads": 1, "stream": 0}
        args.update(over)
        return {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}

    def test_good_call(self):
        _c().energy_finish(**self.args())

    @pytest.mark.parametrize("over,exc,match", [
        ({"parts": "not a capsule"}, TypeError, "parts must be a DLPack capsule"),
        ({"parts": torch.zeros(4, B, T)}, TypeError, "parts has dtype float32"),
        ({"parts": torch.zeros(B, T, dtype=torch.float64)}, ValueError, "parts must have 3 dimensions"),
        ({"parts": torch.zeros(3, B, T, dtype=torch.float64)}, ValueError, "parts must be .* P >= 4"),
        ({"parts": torch.zeros(4, 0, T, dtype=torch.float64)}, ValueError, r"parts must hold .*\(B >= 1\)"),
        ({"parts": torch.zeros(4, B, 2 * T, dtype=torch.float64)[..., ::2]}, ValueError,
         "parts must be a contiguous tensor"),
        ({"parts": torch.zeros(4, T, B, dtype=torch.float64).transpose(1, 2)}, ValueError,
         "parts must be a contiguous tensor"),
        ({"defined": torch.zeros(B, T, dtype=torch.int64)}, TypeError, "defined has dtype int64"),
        ({"defined": torch.zeros(B, T + 1, dtype=torch.uint8)}, ValueError, r"defined.shape\[1\] must equal"),
        ({"defined": torch.zeros(B + 1, T, dtype=torch.uint8)}, ValueError, r"defined.shape\[0\] must equal"),
        ({"defined": torch.zeros(B * T, dtype=torch.uint8)}, ValueError, "defined must have 2 dimensions"),
        ({"defined": torch.zeros(T, B, dtype=torch.uint8).t()}, ValueError, "defined must be a contiguous tensor"),
        ({"out_tokens": torch.empty(10, B, T, dtype=torch.float64)}, TypeError, "out_tokens has dtype float64"),
        ({"out_tokens": torch.empty(8, B, T)}, ValueError, r"out_tokens.shape\[0\] must equal"),
        ({"out_tokens": torch.empty(10, B, T + 1)}, ValueError, r"out_tokens.shape\[2\] must equal"),
        ({"out_tokens": torch.empty(10, T, B).transpose(1, 2)}, ValueError, "out_tokens must be a contiguous"),
        ({"out_stats": torch.empty(B, 28)}, ValueError, r"out_stats.shape\[1\] must equal"),
        ({"out_stats": torch.empty(34, B).t()}, ValueError, "out_stats must be a contiguous tensor"),
        ({"out_stats": torch.empty(B, 34, dtype=torch.float64)}, TypeError, "out_stats has dtype float64"),
        ({"out_counts": torch.empty(B, 2)}, TypeError, "out_counts has dtype float32"),
        ({"out_counts": torch.empty(B + 1, 2, dtype=torch.int64)}, ValueError, r"out_counts.shape\[0\] must equal"),
        ({"out_counts": torch.empty(2 * B, dtype=torch.int64)}, ValueError, "out_counts must have 2 dimensions"),
        ({"num_threads": 0}, ValueError, "num_threads must be >= 1"),
        ({"workspace": torch.empty(0)}, TypeError, "workspace has dtype float32"),
        ({"workspace": torch.empty(1, 16, dtype=torch.uint8)}, ValueError, "workspace must have 1 dimensions"),
        ({"workspace": torch.empty(32, dtype=torch.uint8)[1:]}, ValueError, "workspace must be 16-byte aligned"),
    ], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
    def test_bad_views(self, over, exc, match):
        with pytest.raises(exc, match=match):
            _c().energy_finish(**self.args(**over))

    def test_workspace_sizes(self):
        """CPU tensors need no workspace; a CUDA call's size depends only on the shapes (in a build with CUDA)."""
        assert _c().finish_workspace_bytes(self.B, self.T, None) == 0
        with pytest.raises(ValueError, match="B, T >= 0"):
            _c().finish_workspace_bytes(-1, self.T, None)
