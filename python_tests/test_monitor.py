"""EnergyMonitor: the numbers it records equal the float64 reference on the model's own states and logits;
cached generation records what generation without a cache records, token for token; padding changes
nothing; rolling statistics, calibration, flags and files; bad input raises naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from gen_fixtures import model, tok  # noqa: E402,F401 (pytest fixtures)
from helpers import assert_close, from_hidden_reference_pair, reference_pair  # noqa: E402

from mppm_ext import reference  # noqa: E402
from mppm_ext.models import anatomy, capture  # noqa: E402
from mppm_ext.monitor import FEATURES, EnergyMonitor  # noqa: E402
from mppm_ext.monitor.records import rolling_statistics  # noqa: E402

TEXTS = ["the sea is calm and blue today while a ship sails far from home",
         "wind rain storm ocean wave water fish boat shore sand cold warm night day light dark city street",
         "old new fire bright stone river mountain green forest tree house road car"]
# Monitored states pass through float32 (the compiled ops' dtype): agreement with the float64 truth is
# to float32 rounding of h and of the log-softmax (|s| <= ~20 here).
TOL = dict(rtol=1e-5, atol=2e-5)


def encode(tok, texts):
    return [tok.encode(t, add_special_tokens=False) for t in texts]


def padded(seqs, side="right", pad=1):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def assert_records_close(a, b, **tol):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra.tokens, rb.tokens)
        for name in FEATURES:
            np.testing.assert_allclose(ra[name], rb[name], equal_nan=True, err_msg=name, **(tol or TOL))


def test_records_equal_float64_reference(model, tok):
    """Surprisal, entropy and log K of an unpadded forward equal mppm_ext.reference on the model's own
    final states and logits in float64."""
    ids = torch.tensor([encode(tok, TEXTS[:1])[0]])
    with EnergyMonitor(model, window=4) as mon, torch.no_grad():
        model(input_ids=ids)
    (rec,) = mon.records()
    cap = capture(model, ids)
    truth = reference.energy(cap.hidden["final"].double(), cap.logits.double(), ids)
    np.testing.assert_allclose(rec["surprisal"][:-1], truth.surprisal[0, :-1].numpy(), **TOL)
    np.testing.assert_allclose(rec["entropy"], truth.entropy[0].numpy(), **TOL)
    np.testing.assert_allclose(rec["log_kinetic"][1:], truth.log_kinetic[0, 1:].numpy(), **TOL)
    np.testing.assert_allclose(rec["log_energy"][1:-1], truth.log_energy[0, 1:-1].numpy(), **TOL)
    assert np.isnan(rec["surprisal"][-1]) and np.isnan(rec["log_kinetic"][0])
    h = cap.hidden["final"][0].double()
    np.testing.assert_allclose(rec["state_norm"], h.norm(dim=-1).numpy(), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity(h[1:], h[:-1], dim=-1).numpy()
    np.testing.assert_allclose(rec["cosine"][1:], cos, rtol=1e-5, atol=1e-6)


def test_logits_path_and_hidden_path_within_the_tolerance_rule(model, tok):
    """A forward that computes every logit is scored from the model's own logits; with logits_to_keep=1 (what
    generate's prefill asks for) from the states through energy_from_hidden. Each path's surprisal, entropy
    and log K meet the tolerance rule against the float64 reference on the model's states and logits, the
    bound set by that path's own float32 reference (the float32 logits as given, or float32 GEMMs of the
    float32 states and unembedding), so the two paths agree to float32 rounding."""
    ids, mask = padded(encode(tok, TEXTS), "right")
    cap = capture(model, ids, mask)
    h, logits = cap.hidden["final"], cap.logits
    weight, _ = anatomy.unembedding(model)
    pairs = {"logits": reference_pair(h, logits, ids, attention_mask=mask),
             "hidden": from_hidden_reference_pair(h, weight.detach(), ids, attention_mask=mask)}
    for path, keep in (("logits", {}), ("hidden", {"logits_to_keep": 1})):
        with EnergyMonitor(model, window=4) as mon, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **keep)
        assert mon.computed_from == {"logits": int(path == "logits"), "hidden": int(path == "hidden")}
        truth, ref = pairs[path]
        for b, rec in enumerate(mon.records()):
            n = int(mask[b].sum())
            for name in ("surprisal", "entropy", "log_kinetic"):
                ours = torch.from_numpy(rec[name]).float()
                assert_close(ours, getattr(ref, name)[b, :n], getattr(truth, name)[b, :n], f"{path} {name} [{b}]")


def test_generation_scores_steps_from_the_models_logits(model, tok):
    """Cached generate: the prefill (logits of its last position only) is scored from the states, every
    later step from the model's logits row and the row kept from the step before."""
    ids = torch.tensor([encode(tok, TEXTS[:1])[0][:5]])
    with EnergyMonitor(model, window=3) as mon:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert mon.computed_from == {"logits": 5, "hidden": 1}
    assert mon._segment.last_logits.shape == (1, model.config.vocab_size)  # one row kept, not [B, T, V]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_changes_nothing(model, tok, side):
    seqs = encode(tok, TEXTS)
    alone = []
    for s in seqs:
        with EnergyMonitor(model, window=4) as mon, torch.no_grad():
            model(input_ids=torch.tensor([s]))
        alone += mon.records()
    ids, mask = padded(seqs, side)
    # Position ids that skip left padding (GPT-2's absolute positions would otherwise count the pads).
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with EnergyMonitor(model, window=4) as mon, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert_records_close(mon.records(), alone)


@pytest.mark.parametrize("do_sample", [False, True])
def test_kv_cache_generation_equals_no_cache(model, tok, do_sample):
    """model.generate with the KV cache records what generate without a cache records, token for token
    (left-padded batch); and both equal a plain forward over the generated sequences."""
    ids, mask = padded(encode(tok, ["the sea is", "a ship sails far from home under", "wind"]), "left")
    runs = {}
    for cache in (True, False):
        torch.manual_seed(3)
        with EnergyMonitor(model, window=3) as mon:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=do_sample, use_cache=cache,
                                 pad_token_id=1, top_k=0)
        runs[cache] = (out, mon.records())
    assert torch.equal(runs[True][0], runs[False][0])
    assert_records_close(runs[True][1], runs[False][1])
    out, recs = runs[True]
    assert [len(r) for r in recs] == [int(m.sum()) + 6 for m in mask]  # the last token is never fed back
    # A plain forward over the generated sequences records the same numbers (its last position's surprisal
    # is known there: it scores the last generated token).
    full_mask = torch.cat([mask, torch.ones(3, 7, dtype=mask.dtype)], 1)
    with EnergyMonitor(model, window=3) as mon, torch.no_grad():
        model(input_ids=out, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0))
    for gen, plain in zip(recs, mon.records()):
        np.testing.assert_array_equal(gen.tokens, plain.tokens[:-1])
        for name in ("log_kinetic", "entropy", "state_norm", "cosine"):
            np.testing.assert_allclose(gen[name], plain[name][:-1], equal_nan=True, **TOL)
        np.testing.assert_allclose(gen["surprisal"][:-1], plain["surprisal"][:-2], **TOL)


def test_reset_and_new_batches(model, tok):
    seqs = encode(tok, TEXTS[:2])
    with EnergyMonitor(model, window=3) as mon, torch.no_grad():
        model(input_ids=torch.tensor([seqs[0]]))
        model(input_ids=torch.tensor([seqs[1]]))
        assert [len(r) for r in mon.records()] == [len(seqs[0]), len(seqs[1])]
        mon.reset()
        assert mon.records() == []
    with torch.no_grad():
        model(input_ids=torch.tensor([seqs[0]]))
    assert mon.records() == []  # detached: nothing recorded


def test_rolling_statistics_against_loop():
    rng = np.random.default_rng(0)
    k, s = rng.normal(3, 1, 30), rng.normal(2, 1, 30)
    k[[0, 7]] = np.nan
    k[12] = -np.inf
    s[20] = np.nan
    w = 5
    got = rolling_statistics(k, s, w)
    for t in range(30):
        kk, ss = k[max(0, t - w + 1):t + 1], s[max(0, t - w + 1):t + 1]
        fk = np.isfinite(kk)
        both = fk & np.isfinite(ss)
        if t < w - 1:
            assert np.isnan(got["rolling_mean_log_kinetic"][t])
            continue
        assert got["rolling_mean_log_kinetic"][t] == pytest.approx(kk[fk].mean(), abs=1e-12)
        assert got["rolling_cv_log_kinetic"][t] == pytest.approx(kk[fk].std() / abs(kk[fk].mean()), abs=1e-12)
        assert got["rolling_corr_log_kinetic_surprisal"][t] == pytest.approx(
            np.corrcoef(kk[both], ss[both])[0, 1], abs=1e-12)


def test_calibrate_score_flags_and_files(model, tok, tmp_path):
    texts = [" ".join(np.random.default_rng(i).permutation(TEXTS[1].split()).tolist()) for i in range(12)]
    mon = EnergyMonitor(model, window=4)
    cal = mon.calibrate(texts, tok, batch_size=5)
    assert mon.gaussian is not None and not mon._handles  # calibrate leaves the monitor detached
    assert np.isfinite(np.concatenate([r["mahalanobis"] for r in cal.records])).all()
    # On its own calibration text the flag rate is the asked FPR (up to the ties of a discrete quantile).
    scored = cal.score(cal.records, fpr=0.05)
    rate = np.concatenate([s.flag[np.isfinite(s.score)] for s in scored]).mean()
    assert 0.0 < rate <= 0.05
    # A window of one repeated word is far out of the natural distribution: flagged.
    with mon, torch.no_grad():
        model(input_ids=torch.tensor([encode(tok, [TEXTS[1] + " stone" * 12])[0]]))
    (s,) = mon.score(fpr=0.05)
    assert s.flag[-4:].all()
    assert np.isfinite(mon.records()[0]["mahalanobis"]).all()
    for suffix in (".csv", ".parquet"):
        path = mon.write(tmp_path / f"rec{suffix}")
        if suffix == ".csv":
            lines = path.read_text().splitlines()
            assert lines[0].split(",")[:4] == ["sequence", "position", "token", "log_kinetic"]
            assert len(lines) == 1 + len(mon.records()[0])
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            np.testing.assert_allclose(table["surprisal"].to_numpy(), mon.records()[0]["surprisal"], equal_nan=True)


def test_bad_input(model, tok, tmp_path):
    with pytest.raises(ValueError, match="cannot attach to Linear"):
        EnergyMonitor(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="window must be an int >= 3"):
        EnergyMonitor(model, window=2)
    mon = EnergyMonitor(model, window=8)
    with pytest.raises(ValueError, match=r"texts\[1\] has 3 tokens, fewer than window \+ 1 = 9"):
        mon.calibrate([TEXTS[1], "the sea is"], tok)
    with pytest.raises(ValueError, match="texts is empty"):
        mon.calibrate([], tok)
    with pytest.raises(RuntimeError, match="calibrate"):
        mon.score()
    with mon, pytest.raises(ValueError, match="needs input_ids"), torch.no_grad():
        model(inputs_embeds=torch.zeros(1, 4, 32, dtype=torch.float64))
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ValueError, match="cannot write records"):
        mon.write(blocked / "rec.csv")
