"""Steered generation: the hook is correct with the KV cache, batching with left padding changes nothing,
the first token is steered, the records are what the docs say, and bad input raises."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from gen_fixtures import model, tiny_model, tok  # noqa: E402,F401 (model, tok: pytest fixtures)

from mppm_ext import reference  # noqa: E402
from mppm_ext.steering.generate import (RECORD_FIELDS, StepDelta, _unsteered, steered_generate)  # noqa: E402

PROMPTS = ["the sea is", "a ship sails far from home under grey", "wind"]
TARGETS = ["storm", "fire"]


def fixed_delta(scale: float = 0.7):
    """A delta function that adds the same vector at every step (the hook under test, not the solver)."""
    def fn(ctx) -> StepDelta:
        out = _unsteered(ctx.state)
        d = torch.linspace(-1.0, 1.0, ctx.state.shape[1], dtype=ctx.state.dtype) * scale
        out.delta[:] = d
        return out
    return fn


def assert_same_run(a, b, rtol=1e-9):
    assert torch.equal(a.token, b.token), f"tokens differ:\n{a.token}\n{b.token}"
    for name in ("delta_norm", "kinetic", "surprisal", "target_log_prob_after"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, rtol=rtol, atol=1e-9, equal_nan=True), f"{name}: {x} vs {y}"


@pytest.mark.parametrize("layer", ["final", 0, 1, -1])
def test_kv_cache_matches_full_recomputation_fixed_delta(model, tok, layer):
    kw = dict(targets=TARGETS, layer=layer, max_new_tokens=6, delta_fn=fixed_delta())
    cached = steered_generate(model, tok, PROMPTS, use_cache=True, **kw)
    full = steered_generate(model, tok, PROMPTS, use_cache=False, **kw)
    assert_same_run(cached, full)
    # The δ changes the continuation: the test would notice a hook that does nothing.
    natural = steered_generate(model, tok, PROMPTS, targets=TARGETS, gain=0.0, layer=layer, max_new_tokens=6)
    assert not torch.equal(natural.token, cached.token) or layer == "final"
    assert (cached.delta_norm > 0).all() and (natural.delta_norm == 0).all()


def test_earlier_layer_steering_changes_later_positions_through_the_cache(tok):
    """With a block δ the steered position's keys/values are cached: a run that forgot them (δ only
    in the step's own forward, recomputed without it later) would differ from the full recomputation."""
    model = tiny_model("llama")
    kw = dict(targets=TARGETS, layer=1, max_new_tokens=5, delta_fn=fixed_delta(2.0))
    cached = steered_generate(model, tok, PROMPTS, **kw)
    full = steered_generate(model, tok, PROMPTS, use_cache=False, **kw)
    assert_same_run(cached, full)


def test_kv_cache_matches_full_recomputation_with_solver(model, tok):
    kw = dict(targets=TARGETS, gain=1.0, max_new_tokens=6)
    cached = steered_generate(model, tok, PROMPTS, **kw)
    full = steered_generate(model, tok, PROMPTS, use_cache=False, **kw)
    assert_same_run(cached, full, rtol=1e-6)


def test_sampling_is_seeded_and_cache_independent(model, tok):
    kw = dict(targets=TARGETS, gain=1.0, max_new_tokens=4, do_sample=True, temperature=1.5)
    a = steered_generate(model, tok, PROMPTS, seed=3, **kw)
    b = steered_generate(model, tok, PROMPTS, seed=3, use_cache=False, **kw)
    assert torch.equal(a.token, b.token)
    others = [steered_generate(model, tok, PROMPTS, seed=s, **kw).token for s in (4, 5)]
    assert any(not torch.equal(a.token, o) for o in others)


@pytest.mark.parametrize("mode", ["all", "energy"])
def test_left_padded_batch_equals_unbatched_runs(model, tok, mode):
    kw = dict(targets=TARGETS + ["rain", "wind"], gain=1.0, max_new_tokens=5, mode=mode, top_k=3)
    batch = steered_generate(model, tok, PROMPTS, **kw)
    for i, p in enumerate(PROMPTS):
        one = steered_generate(model, tok, [p], **kw)
        assert torch.equal(batch.token[i], one.token[0]), f"prompt {i}: {batch.token[i]} vs {one.token[0]}"
        assert torch.equal(batch.target[i], one.target[0])
        for name in ("delta_norm", "kinetic", "surprisal", "target_log_prob_after"):
            assert torch.allclose(getattr(batch, name)[i], getattr(one, name)[0], rtol=1e-6, atol=1e-9,
                                  equal_nan=True), name


def test_first_generated_token_is_steered(model, tok):
    gain = 1.0
    run = steered_generate(model, tok, PROMPTS, targets=TARGETS, gain=gain, max_new_tokens=2)
    natural = steered_generate(model, tok, PROMPTS, targets=TARGETS, gain=0.0, max_new_tokens=1)
    # Step 0's "before" is the unsteered state's log p: the natural run's own logits say the same.
    assert torch.allclose(run.target_log_prob_before[:, 0], natural.target_log_prob_after[:, 0], atol=1e-9)
    assert run.feasible[:, 0].all() and run.converged[:, 0].all()
    gained = run.target_log_prob_after[:, 0] - run.target_log_prob_before[:, 0]
    # Each of the m target tokens gains `gain`; the set's log p gains at least min and at most max of them.
    assert (gained > 0.5 * gain).all() and (gained < gain + 1e-2).all(), gained


def test_records_have_the_documented_fields_and_values(model, tok):
    steps = 4
    run = steered_generate(model, tok, PROMPTS, targets=TARGETS, gain=0.0, max_new_tokens=steps)
    for name in RECORD_FIELDS:
        assert getattr(run, name).shape == (len(PROMPTS), steps), name
    recs = run.records()
    assert len(recs) == len(PROMPTS) and all(len(r) == steps for r in recs)
    assert set(recs[0][0]) == set(RECORD_FIELDS)
    assert run.states.shape == run.deltas.shape == (len(PROMPTS), steps, model.config.hidden_size)
    assert len(run.texts) == len(PROMPTS)
    # Unsteered, the records are the package's energy definitions on prompt + continuation.
    ids = torch.cat([run.prompt_ids, run.token], dim=1)
    mask = torch.cat([run.prompt_mask, torch.ones_like(run.token)], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    truth = reference.energy(out.hidden_states[-1], out.logits, ids, attention_mask=mask)
    p = run.prompt_ids.shape[1]
    # Step j pairs the step into state p-1+j with the surprisal of the token it predicts.
    sl = slice(p - 1, p - 1 + steps)
    assert torch.allclose(run.kinetic, truth.kinetic[:, sl], rtol=1e-9, equal_nan=True)
    assert torch.allclose(run.surprisal, truth.surprisal[:, sl], rtol=1e-9, atol=1e-12)
    assert torch.allclose(run.log_energy, torch.log(run.kinetic) + run.surprisal, equal_nan=True)
    # The one-token prompt has no previous state at step 0.
    assert math.isnan(run.kinetic[2, 0]) and not run.kinetic[:2].isnan().any()


def test_energy_mode_steers_to_one_candidate_target(model, tok):
    from mppm_ext.steering.targets import resolve

    words = TARGETS + ["rain", "wind", "ocean"]
    run = steered_generate(model, tok, PROMPTS, targets=words, gain=1.0, mode="energy", top_k=3, max_new_tokens=4)
    allowed = set(resolve(tok, words, model.config.vocab_size).tolist())
    assert set(run.target.view(-1).tolist()) <= allowed
    assert (run.delta_norm > 0).all()


def test_hooks_and_tokenizer_are_restored(model, tok):
    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    side, before = tok.padding_side, hooks()
    steered_generate(model, tok, PROMPTS, targets=TARGETS, max_new_tokens=1)
    steered_generate(model, tok, PROMPTS, targets=TARGETS, max_new_tokens=1, layer=1, delta_fn=fixed_delta())
    assert tok.padding_side == side and hooks() == before


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(prompts=[]), ValueError, "prompts is empty"),
    (dict(prompts="the sea"), TypeError, "list of strings"),
    (dict(prompts=["the sea", ""]), ValueError, "non-empty string"),
    (dict(targets=["zebra"]), ValueError, "not in the tokenizer's vocabulary"),
    (dict(targets=[""]), ValueError, "non-empty string"),
    (dict(targets=[]), ValueError, "non-empty list"),
    (dict(targets=[10_000]), ValueError, "outside the vocabulary"),
    (dict(targets=[1.5]), TypeError, "token ids"),
    (dict(targets=[["storm"], ["fire"]]), ValueError, "per-prompt lists for 3 prompts"),
    (dict(layer=3), ValueError, r"layer must be an int in \[-3, 2\] \(this model has 2 blocks\) or 'final', got 3"),
    (dict(layer=-4), ValueError, r"layer must be an int in \[-3, 2\] .* got -4"),
    (dict(layer="last"), ValueError, r"layer must be an int in \[-3, 2\] .* or 'final', got 'last'"),
    (dict(layer=1.0), ValueError, r"layer must be an int in \[-3, 2\] .* got 1\.0"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=2.0), ValueError, "max_new_tokens"),
    (dict(gain=float("nan")), ValueError, "gain"),
    (dict(gain=-1.0), ValueError, "gain"),
    (dict(mode="best"), ValueError, "mode"),
    (dict(mode="energy", layer=-1), ValueError, "final state only"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(temperature=0.0), ValueError, "temperature"),
])
def test_bad_inputs(tok, kwargs, exc, match):
    model = tiny_model("llama")
    args = dict(prompts=PROMPTS, targets=TARGETS, max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        steered_generate(model, tok, args.pop("prompts"), **args)


def test_block_steering_with_steer_layer_reaches_the_gain_in_the_cached_run(tok):
    """steer_layer sees the sequence so far with earlier δ's replayed, so the gain it solved for is the
    gain the cached generation gets (padded and unpadded rows alike)."""
    model = tiny_model("gpt2")  # absolute positions: the unpadding must be exact
    kw = dict(targets=["storm"], gain=1.0, layer=1, max_new_tokens=2)
    run = steered_generate(model, tok, PROMPTS[:2], **kw)
    ok = run.converged & run.feasible  # the solver may stop short within its trust region: it says so
    assert ok.double().mean() >= 0.5, ok
    gained = (run.target_log_prob_after - run.target_log_prob_before)[ok]
    assert torch.allclose(gained, torch.ones_like(gained), atol=5e-3), gained
    full = steered_generate(model, tok, PROMPTS[:2], use_cache=False, **kw)
    assert_same_run(run, full, rtol=1e-6)
