"""Comparison against the float64 reference, with the one tolerance table of the test suite.

Rule (README, "Reliability"): an output passes when, elementwise,

    |truth - ours| <= K * max|truth - ref| + ATOL + RTOL * |truth|

where truth is the reference in float64 on the same input values and ref is the reference run in the
kernels' accumulation dtype (float32) on the same inputs. ATOL/RTOL are a few float32 ulps: they
cover positions where the float32 reference happens to be exact, not systematic error. The rule and its
constants live in the package (mppm_ext/selftest.py, which `mppm selftest` runs on users' machines), so
that the tests and the self-test apply the same one.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from mppm_ext import STAT_QUANTITIES, TOKEN_QUANTITIES, reference
from mppm_ext.selftest import compare


def assert_close(ours, ref, truth, name: str) -> None:
    """``ours`` within the rule's bound of ``truth``, ``ref`` setting it (:func:`mppm_ext.selftest.compare`,
    the rule's one implementation)."""
    problem = compare(ours, ref, truth, name).problem
    if problem is not None:
        raise AssertionError(f"{name}: {problem}")


def reference_pair(hidden, logits, tokens, **kwargs):
    """(truth in float64, reference in float32) on the same input values. The float32 reference is an
    envelope (see _envelope) of the specification run in float32 and of the same run with the entropy
    formed as the online-softmax kernels form it, log s - u / s with s = sum e^(z - max) and
    u = sum e^(z - max) (z - max) summed in float32 lanes: both are float32 algorithms for the same
    quantity, and in the second a nearly one-hot row's s = 1 + r loses the part of r its lane absorbs,
    so a small entropy (1e-3 nats and below) carries up to ~1e-6 nats of error, which the first does not;
    statistics of such entropies then differ by algorithm, not by a kernel's error."""
    truth = reference.energy(hidden.double(), logits.double(), tokens, **kwargs)
    plain = reference.energy(hidden.float(), logits.float(), tokens, **kwargs)
    # The CPU kernels' tiles: 512 logits in float32 rows, 1024 in 16-bit ones (csrc/cpu/row_kernels.inc).
    tile = 512 if logits.dtype == torch.float32 else 1024
    refs = [plain, _lse_form(plain, logits.float(), kwargs.get("temperature", 1.0), tile)]
    return truth, _envelope(truth, refs)


def _lane_sum(x: Tensor, lanes: int = 16, accumulators: int = 2, tile: int = 1024) -> Tensor:
    """Sum over the last dimension as the CPU kernels sum a logits row: vectors of ``lanes`` floats dealt
    round-robin to ``accumulators`` float32 accumulators per tile of ``tile`` elements, each lane summed
    in order in float32, the lanes and tiles added in float64, the tail (the last V % lanes) in float64.
    A sum dominated by one term (a nearly one-hot softmax: 1 + 1e-11) loses in float32 what its lane
    absorbs, which a pairwise float32 sum keeps."""
    n = x.shape[-1]
    n_vec = n - n % lanes
    body, tail = x[..., :n_vec], x[..., n_vec:]
    pad = (-n_vec) % tile
    body = torch.nn.functional.pad(body, (0, pad))
    grouped = body.reshape(*x.shape[:-1], -1, tile // (lanes * accumulators), accumulators, lanes)
    per_lane = grouped.float().cumsum(-3)[..., -1, :, :]  # cumsum adds in order, in float32
    return per_lane.double().sum((-1, -2, -3)) + tail.double().sum(-1)


def _lse_form(result, logits, temperature: float, tile: int):
    """``result`` with its entropy recomputed as the online-softmax kernels do, log s - u / s, with s and u
    summed in float32 lanes as they sum them (:func:`_lane_sum`), and the statistics finished again."""
    z = (logits / temperature).float()
    shifted = z - z.amax(-1, keepdim=True)
    e = torch.exp(shifted)
    s = _lane_sum(e, tile=tile)
    u = _lane_sum(e * torch.where(e > 0, shifted, 0.0), tile=tile)
    entropy = torch.where(result.entropy.isnan(), float("nan"), (torch.log(s) - u / s).float())
    return reference.energy_from_parts(result.log_prob, result.kinetic, entropy, result.logsumexp)


def assert_energy_matches(result, hidden, logits, tokens, *, skip_stats=(), **kwargs) -> None:
    """Every per-token output, the valid mask and every statistic of ``result`` (but the statistics of the
    quantities in ``skip_stats``) against the reference."""
    assert_result_matches(result, *reference_pair(hidden, logits, tokens, **kwargs), skip_stats=skip_stats)


def from_hidden_reference_pair(hidden, weight, tokens, *, bias=None, norm=None, kinetic_state="post", **kwargs):
    """(truth in float64, reference in float32) of energy_from_hidden on the same input values; ``norm``
    (an nn.Module) is copied into each precision.

    Two float32 GEMMs of the same operands round each logit differently (BLAS picks its kernel by shape),
    by up to about an ulp, and with few positions one GEMM can be lucky exactly where a quantity's error
    peaks (s = 15 makes half an ulp of s a 5e-7 relative error of PPL = exp(s)). So the float32
    reference is run with the logits from four GEMMs (batched, one [B*T, d] addmm, one vector product
    per position, as the small row blocks of the tiles are, and numpy's, which the Triton interpreter's
    tl.dot calls) and, element by element, the one furthest from the truth sets the bound. Two more
    runs take the contraction in zero-padded blocks of 32 and of 64 columns of d, one numpy product per
    block added in order, as the tiled Triton kernels do (BLOCK_D): the padded block is a GEMM of another
    shape, for which BLAS picks another kernel and so another summation order (a fp16 logit of 40.46 from
    d = 11 products: the unpadded GEMMs all round it correctly, the one padded to 64 is an ulp, 3.8e-6,
    off, while any float32 summation order may err up to d * 2^-24 * sum|h_k w_k| = 5.4e-5 there). One more
    run finishes the float32 logits in float64: a float32 log_softmax rounds z - max once more, which
    can cancel the logits' own error by luck, while backends that subtract in float64 (as all of ours
    do) keep exactly the logits' error."""
    def run(dtype, layout="batched", finish=None):
        n = None if norm is None else copy.deepcopy(norm).to(dtype)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = torch.zeros(w.shape[0], dtype=dtype) if bias is None else bias.to(dtype)
        post = h if n is None else n(h)
        if layout == "batched":
            logits = post @ w.T + b
        elif layout == "flat":
            logits = torch.addmm(b, post.reshape(-1, post.shape[-1]), w.T).reshape(*post.shape[:-1], -1)
        elif layout == "rows":
            rows = [torch.addmm(b, r.unsqueeze(0), w.T) for r in post.reshape(-1, post.shape[-1])]
            logits = torch.cat(rows).reshape(*post.shape[:-1], -1)
        elif layout == "numpy":  # numpy's BLAS: the GEMM the Triton interpreter's tl.dot runs
            logits = torch.from_numpy(post.numpy() @ w.numpy().T) + b
        else:  # ("blocked", width): K-blocked and zero-padded, as in the tiled kernels
            logits = _blocked_matmul(post.reshape(-1, post.shape[-1]), w, layout[1]).reshape(*post.shape[:-1], -1) + b
        state = h if kinetic_state == "pre" else post
        if finish is not None:
            state, logits = state.to(finish), logits.to(finish)
        return reference.energy(state, logits, tokens, **kwargs)

    with torch.no_grad():
        truth = run(torch.float64)
        layouts = ("batched", "flat", "rows", "numpy", ("blocked", 32), ("blocked", 64))
        refs = [run(torch.float32, layout) for layout in layouts]
        refs.append(run(torch.float32, "batched", finish=torch.float64))
    return truth, _envelope(truth, refs)


def _blocked_matmul(x, w, width: int):
    """``x @ w.T`` (float32 [N, d] and [V, d]) summed over d in blocks of ``width`` columns, each block
    zero-padded to ``width`` and multiplied by numpy, the blocks' products added in order."""
    n, d = x.shape
    acc = torch.zeros(n, w.shape[0], dtype=x.dtype)
    for k0 in range(0, d, width):
        xb = torch.zeros(n, width, dtype=x.dtype)
        wb = torch.zeros(w.shape[0], width, dtype=w.dtype)
        xb[:, :min(width, d - k0)] = x[:, k0:k0 + width]
        wb[:, :min(width, d - k0)] = w[:, k0:k0 + width]
        acc = torch.from_numpy(xb.numpy() @ wb.numpy().T) + acc
    return acc


def _tensors(result) -> list:
    out = []
    result.map(lambda t: out.append(t) or t)
    return out


def _envelope(truth, results):
    """An EnergyResult holding, element by element, whichever of ``results`` is furthest from ``truth``."""
    def furthest(t, *xs):
        if not xs[0].is_floating_point():
            return xs[0]
        best = xs[0]
        for x in xs[1:]:
            further = (x.double() - t).abs().nan_to_num(float("inf")) > (best.double() - t).abs().nan_to_num(float("inf"))
            best = torch.where(further, x, best)
        return best

    picked = iter([furthest(t, *xs) for t, *xs in zip(_tensors(truth), *map(_tensors, results))])
    return results[0].map(lambda _: next(picked))


def assert_from_hidden_matches(result, hidden, weight, tokens, **kwargs) -> None:
    """:func:`assert_energy_matches` for energy_from_hidden (batched inputs)."""
    assert_result_matches(result, *from_hidden_reference_pair(hidden, weight, tokens, **kwargs))


def assert_result_matches(result, truth, ref, skip_stats=()) -> None:
    """Every output of an EnergyResult against the float64 truth, with ``ref`` (float32) setting the bound;
    the statistics of the quantities in ``skip_stats`` are left out."""
    assert result.valid.dtype == torch.bool
    assert torch.equal(result.valid.cpu(), truth.valid), "valid mask differs from the reference"
    for name in TOKEN_QUANTITIES:
        out = getattr(result, name)
        assert out.dtype == torch.float32, f"{name} is {out.dtype}"
        assert_close(out, getattr(ref, name), getattr(truth, name), name)
    assert torch.equal(result.stats.count.cpu(), truth.stats.count)
    assert torch.equal(result.stats.zero_kinetic.cpu(), truth.stats.zero_kinetic)
    tiny = torch.finfo(torch.float32).tiny
    for name in (q for q in STAT_QUANTITIES if q not in skip_stats):
        # A sequence whose mean is nonzero but below float32's normal range (the entropy of rows whose
        # logits lie thousands apart: 1e-190 nats) has statistics float32 kernels cannot form (their exp
        # flushes such terms to 0): those sequences' std and cv are left out, the mean is still compared.
        mean = truth.stats.mean[name]
        formable = ~((mean != 0) & (mean.abs() < tiny))
        for kind in ("mean", "std", "cv"):
            keep = formable if kind != "mean" else torch.ones_like(formable)
            ours, reference_, true = (torch.where(keep.to(x.device), x, 0.0) for x in (
                getattr(result.stats, kind)[name], getattr(ref.stats, kind)[name], getattr(truth.stats, kind)[name]))
            assert_close(ours, reference_, true, f"stats.{kind}[{name}]")
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


#: The padding layouts every backend of energy is tested with.
PADDINGS = ("left", "right", "holes", "ignore_index", "all_masked_row")


def padded_case(padding: str, hidden, logits, tokens):
    """``(hidden, logits, tokens, kwargs)`` with ``padding`` applied to ``[B >= 2, T]`` inputs: the mask
    (or ignore_index) goes into kwargs, and the padded positions hold what they may hold, garbage (ids
    outside the vocabulary, NaN logits, inf states) that no backend may read."""
    B, T = tokens.shape
    device = tokens.device
    mask = torch.ones(B, T, dtype=torch.int64, device=device)
    lengths = [0, 3, T // 2, T - 3][:B]
    if padding == "left":
        for b, n in enumerate(lengths):
            mask[b, :n] = 0
    elif padding == "right":
        for b, n in enumerate(lengths):
            mask[b, T - n:] = 0
    elif padding == "holes":
        mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(T)) > 0.3).long().to(device)
    elif padding == "ignore_index":
        tokens = tokens.clone()
        tokens[:, ::5] = -100
        return hidden, logits, tokens, {}
    else:
        mask[1] = 0
    real = mask.bool()
    tokens = torch.where(real, tokens, 10**9)
    logits = torch.where(real.unsqueeze(-1), logits, float("nan"))
    hidden = torch.where(real.unsqueeze(-1), hidden, float("inf"))
    return hidden, logits, tokens, {"attention_mask": mask}
