"""mppm_ext.scan: the scan's per-token parts and statistics against direct calls on the same windows, and
what each control changes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")

import mppm_ext  # noqa: E402
from mppm_ext import models, reference  # noqa: E402
from mppm_ext.scan import ScanConfig, run_scan  # noqa: E402
from mppm_ext.scan.passes import BASE, PRE_NORM, SHUFFLED, TOKEN_MEAN, layer_variant  # noqa: E402
from mppm_ext.scan.stats import paired, summarize  # noqa: E402
from mppm_ext.scan.token_mean import TokenMeanAccumulator  # noqa: E402
from mppm_ext.scan.windows import batches, shuffled, split_windows  # noqa: E402

DOCS = ["It was the best of times, it was the worst of times, it was the age of wisdom. " * 3,
        "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.",
        "ab"]  # too short for a window: dropped and counted


def scan(model="random:llama-tiny", docs=DOCS, **kw):
    cfg = ScanConfig(models=(model,), corpus=docs, window=kw.pop("window", 23), batch_size=kw.pop("batch_size", 3),
                     progress=False, **kw)
    return run_scan(cfg, kw.pop("out", None) or _tmp(), write=False)


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="mppm-scan-test-")


@pytest.fixture(scope="module")
def llama():
    return models.load("random:llama-tiny")


@pytest.mark.parametrize("name", ["random:llama-tiny", "random:opt-tiny-proj", "random:phi-tiny"])
def test_parts_equal_a_direct_energy_call_on_the_same_windows(name):
    result = scan(name)
    model = result.models[0]
    loaded = models.load(name)
    split = split_windows(loaded.tokenizer, DOCS, 23)
    assert model.dropped_short == split.dropped_short >= 1
    assert [w.index for w in model.windows] == [w.index for w in split.scan]
    toks, lp, kin, ent = model.parts[BASE]
    row = 0
    per_window_cv = []
    weight, bias = models.unembedding(loaded.model)
    for batch in batches(split.scan, 3):
        cap = models.capture(loaded.model, batch.ids, batch.mask)
        direct = mppm_ext.energy_from_hidden(cap.hidden["final"], weight, batch.ids, bias=bias, attention_mask=batch.mask)
        for b, w in enumerate(batch.windows):
            n = len(w.tokens)
            assert toks[row, :n].tolist() == list(w.tokens)
            exact(lp[row, :n], direct.log_prob[b, :n].double())
            exact(kin[row, :n], direct.kinetic[b, :n].double())
            exact(ent[row, :n], direct.entropy[b, :n].double())
            if int(direct.stats.count[b]) >= 2:
                per_window_cv.append(direct.stats.cv["log_energy"][b].double())
            row += 1
    summary = next(r for r in result.summary if r["variant"] == BASE and r["pairing"] == "same")
    # The scan's statistics are float64 from float32 parts; the kernel's are float32.
    assert summary["seq_cv_log_energy"] == pytest.approx(float(torch.stack(per_window_cv).mean()), rel=1e-5)


def test_parts_match_the_model_logits_with_project_out():
    # OPT-350m-like project_out: the state that feeds the unembedding (d = 16) is not the residual stream;
    # the scan's fused parts must agree with energy on the model's own logits.
    name = "random:opt-tiny-proj"
    model = scan(name).models[0]
    loaded = models.load(name)
    log_prob, row = model.parts[BASE][1], 0
    for batch in batches(split_windows(loaded.tokenizer, DOCS, 23).scan, 3):
        cap = models.capture(loaded.model, batch.ids, batch.mask)
        assert cap.hidden["final"].shape[-1] == 16
        direct = mppm_ext.energy(cap.hidden["final"], cap.logits, batch.ids, attention_mask=batch.mask)
        for b, w in enumerate(batch.windows):
            n = len(w.tokens)
            torch.testing.assert_close(log_prob[row, :n], direct.log_prob[b, :n].double(), rtol=1e-5, atol=1e-5,
                                       equal_nan=True)
            row += 1


def test_pooled_statistics_are_over_every_used_position():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 5
    kin = torch.rand(4, 9, generator=g, dtype=torch.float64) + 0.1
    lp[:, -1] = float("nan")
    kin[:, 0] = float("nan")
    kin[2, 4] = 0.0  # a zero step: counted, not used
    lp[3, 6:] = float("nan")
    kin[3, 7:] = float("nan")  # a shorter window
    row, quantiles, histograms = summarize(lp, kin, "same")
    used = ~lp.isnan() & ~kin.isnan() & (kin > 0)
    log_e = (torch.log(kin) - lp)[used]
    assert row["positions"] == int(used.sum()) and row["zero_kinetic"] == 1
    # The per-token quantities come from the compiled finish, whose per-token outputs are float32: the
    # pooled figures carry that rounding (a few 1e-8 relative), not the float64 accumulation's.
    assert row["pooled_mean_log_energy"] == pytest.approx(float(log_e.mean()), rel=1e-6)
    assert row["pooled_cv_log_energy"] == pytest.approx(float(log_e.std(unbiased=False) / log_e.mean().abs()), rel=1e-6)
    k, s = torch.log(kin)[used], -lp[used]
    assert row["pooled_corr"] == pytest.approx(float(torch.corrcoef(torch.stack([k, s]))[0, 1]), rel=1e-6)
    assert sum(h["count"] for h in histograms if h["quantity"] == "kinetic") == int(used.sum())
    median = next(q["value"] for q in quantiles if q["quantity"] == "surprisal" and q["quantile"] == 0.5)
    assert median == pytest.approx(float(s.median()), rel=0.2)


def test_shifted_pairing_pairs_each_step_with_the_previous_surprisal():
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, float("nan")]], dtype=torch.float64)
    kin = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    same, shifted = paired(lp, kin, "same"), paired(lp, kin, "shifted")
    assert same.valid.tolist() == [[False, True, True, True, False]]
    assert shifted.valid.tolist() == [[False, True, True, True, True]]
    assert shifted.log_energy[0, 1:].tolist() == pytest.approx([math.log(k) + s for k, s in
                                                                zip([1, 2, 3, 4], [1, 2, 3, 4])])
    with pytest.raises(ValueError, match="pairing"):
        paired(lp, kin, "backwards")


def test_shuffle_permutes_each_window_and_changes_the_result():
    result = scan(controls=("shuffle",))
    base, mixed = result.models[0].parts[BASE], result.models[0].parts[SHUFFLED]
    for a, b in zip(base[0], mixed[0]):
        assert sorted(a.tolist()) == sorted(b.tolist())
    assert not torch.equal(base[0], mixed[0])
    assert not torch.allclose(base[2].nan_to_num(), mixed[2].nan_to_num())
    # Seeded by window index: the same permutation every run.
    windows = split_windows(models.load("random:llama-tiny").tokenizer, DOCS, 23).scan
    assert shuffled(windows, 0) == shuffled(windows, 0) != shuffled(windows, 1)


def test_pre_norm_and_layer_controls_use_those_states(llama):
    result = scan(controls=("pre-norm",), layers=(1, "mid", -1, "final"), batch_size=64)
    model = result.models[0]
    split = split_windows(llama.tokenizer, DOCS, 23)
    (batch,) = batches(split.scan, 64)
    real = batch.mask != 0
    pre = models.capture(llama.model, batch.ids, batch.mask, layers=(-1,), logits=False).hidden[-1]
    layer1 = models.capture(llama.model, batch.ids, batch.mask, layers=(1,), logits=False).hidden[1]
    # random:llama-tiny has 2 blocks: "mid" is state 1 (the first block's output); the pre-norm control is
    # layer -1.
    for variant, state in ((PRE_NORM, pre), (layer_variant(1), layer1), (layer_variant("mid"), layer1),
                           (layer_variant(-1), pre)):
        _, lp, kin, ent = model.parts[variant]
        want = reference.kinetic(state.double(), real)
        assert torch.allclose(kin, want[:, :kin.shape[1]], rtol=1e-12, atol=0, equal_nan=True), variant
        exact(lp, model.parts[BASE][1])  # the variants keep the base prediction
        exact(ent, model.parts[BASE][3])
    assert not torch.allclose(model.parts[PRE_NORM][2].nan_to_num(), model.parts[BASE][2].nan_to_num())
    # "final" is the base state; its kinetic is the float64 one of the same state (the base's comes from the
    # fused op, in float32 lanes).
    torch.testing.assert_close(model.parts[layer_variant("final")][2], model.parts[BASE][2], rtol=1e-5, atol=1e-6,
                               equal_nan=True)


def test_token_mean_of_states_that_only_depend_on_the_token_removes_all_motion():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(11, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    acc = TokenMeanAccumulator(11, ids.flatten(), 5)
    acc.add(table[ids], ids, mask)
    means = acc.finish()
    moved = means.subtract(table[ids], ids)
    assert moved.abs().max() < 1e-15  # the mean of equal values, up to the rounding of sum / count
    k = reference.kinetic(moved, mask != 0)
    assert k[:, 1:].max() < 1e-30


def test_token_mean_of_one_repeated_token_leaves_the_steps_unchanged():
    # h_t - b[x] - (h_{t-1} - b[x]) = h_t - h_{t-1}: one token id, one mean, the same steps. GPT-2's learned
    # positions make the states move along a repeated token, so the steps are not trivially zero.
    result = scan("random:gpt2-tiny", docs=["z" * 300], window=20, controls=("token-mean",))
    model = result.models[0]
    assert model.coverage == 1.0
    _, _, base, _ = model.parts[BASE]
    _, _, sub, _ = model.parts[TOKEN_MEAN]
    assert float(base.nan_to_num().max()) > 0
    assert torch.allclose(sub, base, rtol=1e-4, atol=1e-6, equal_nan=True)
    # The held-out windows (index % 5 == 4) are not scanned.
    assert all(w.index % 5 != 4 for w in model.windows)


def test_token_mean_changes_the_steps_between_different_tokens():
    result = scan("random:gpt2-tiny", docs=["ab" * 150], window=20, controls=("token-mean",))
    _, _, base, _ = result.models[0].parts[BASE]
    _, _, sub, _ = result.models[0].parts[TOKEN_MEAN]
    assert not torch.allclose(sub.nan_to_num(), base.nan_to_num(), rtol=1e-3)


def test_random_twin_is_scanned_after_a_trained_model(llama):
    trained = dataclasses.replace(llama, name="pretend-trained", trained=True)
    # Seed 5: the twin of a model built from seed 0 must not be that model again.
    result = scan(trained, controls=("random-twin",), seed=5)
    assert [m.label for m in result.models] == ["pretend-trained", "random-twin:pretend-trained"]
    assert [m.info["trained"] for m in result.models] == [True, False]
    assert not torch.equal(result.models[0].parts[BASE][2].nan_to_num(), result.models[1].parts[BASE][2].nan_to_num())
    # A model that is random already gets no twin.
    assert len(scan(llama, controls=("random-twin",)).models) == 1


def test_max_tokens_caps_the_scanned_tokens(llama):
    split = split_windows(llama.tokenizer, DOCS, 23, max_tokens=50)
    assert sum(len(w.tokens) for w in split.scan) == 50


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=2), "window"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_tokens=1), "max_tokens"),
    (dict(controls=("reverse",)), "controls"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scan(**kwargs)


@pytest.mark.parametrize("docs", [[], [""], ["   \n"]])
def test_empty_corpus(docs):
    with pytest.raises(ValueError, match="empty"):
        scan(docs=docs)


def test_corpus_with_no_window_of_three_tokens(llama):
    with pytest.raises(ValueError, match="no window of at least 3 tokens"):
        split_windows(llama.tokenizer, ["ab", "c"], 16)


def test_token_mean_needs_a_held_out_split():
    with pytest.raises(ValueError, match="held-out"):
        scan(docs=["short text of one window"], window=64, controls=("token-mean",))
