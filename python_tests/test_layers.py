"""The one layer convention (mppm_ext.models.layers) and the four places that take a ``layer``: the same
index names the same residual-stream state in models.capture, the scan, steer_layer and steered_generate,
on tiny random models of several families (OPT-350m-style post-LN with project_out among them)."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mppm_ext import models  # noqa: E402
from mppm_ext.models import anatomy  # noqa: E402
from mppm_ext.models import layers as L  # noqa: E402

FAMILIES = ["random:llama-tiny", "random:gpt2-tiny", "random:opt-tiny-proj", "random:gemma3-tiny"]
# Families whose state 0 is inputs_embeds itself (no position embedding added after it).
NO_ADDED_POSITIONS = {"random:llama-tiny", "random:gemma3-tiny"}
N_BLOCKS = 2  # every tiny config
SPECS = [0, 1, -1, -(N_BLOCKS + 1), "final"]


@pytest.fixture(scope="module")
def tiny():
    return {name: models.load(name) for name in FAMILIES}


def _ids(B=2, T=7):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(3))


def _delta(B, d):
    return torch.linspace(-0.5, 0.5, B * d).view(B, d)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


def _unembed(model, h):
    weight, bias = anatomy.unembedding(model)
    out = h @ weight.T
    return out if bias is None else out + bias


# ------------------------------------------------------------------------------------ the convention


@pytest.mark.parametrize("spec, index", [(0, 0), (1, 1), (2, 2), (-1, 2), (-2, 1), (-3, 0), ("final", None)])
def test_resolve_numbers_the_states(tiny, spec, index):
    ref = L.resolve(tiny["random:llama-tiny"].model, spec)
    assert ref == L.LayerRef(index, N_BLOCKS)
    assert ref.is_final == (index is None) and ref.name == ("final" if index is None else str(index))


@pytest.mark.parametrize("bad", [3, -4, True, False, 1.0, "mid", "last", None])
def test_resolve_refuses_bad_layers(tiny, bad):
    message = rf"^layer must be an int in \[-3, 2\] \(this model has 2 blocks\) or 'final', got {re.escape(repr(bad))}$"
    with pytest.raises(ValueError, match=message):
        L.resolve(tiny["random:llama-tiny"].model, bad)


def test_resolve_names_the_argument(tiny):
    with pytest.raises(ValueError, match=r"^layers\[1\] must be an int in \[-3, 2\]"):
        L.resolve(tiny["random:gpt2-tiny"].model, 5, name="layers[1]")
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        L.resolve(torch.nn.Linear(2, 2), 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_read_hook_reads_hugging_face_states(tiny, name):
    """States 0 .. L-1 are HF's hidden_states (read here without edits: how HF records them differs by
    family); "final" reproduces the logits through the unembedding and
    is the final chain applied to state L."""
    model, ids = tiny[name].model, _ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    seen = {}
    handles = [L.read_hook(model, spec, lambda h, spec=spec: seen.__setitem__(spec, h)) for spec in (0, 1, 2, "final")]
    try:
        logits = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(logits, out.logits)  # reading changes nothing
    for i in (0, 1):
        assert torch.equal(seen[i], out.hidden_states[i]), i
    torch.testing.assert_close(_unembed(model, seen["final"]), logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(anatomy.final_norm(model)(seen[2]), seen["final"], rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_edit_hook_adds_at_that_state(tiny, name, spec):
    """The edit lands where read_hook reads, checked another way: the next block's input for a middle
    state, inputs_embeds for state 0, final_norm + unembedding for -1, the unembedding for "final"."""
    model, ids = tiny[name].model, _ids()
    ref, position = L.resolve(model, spec), 4
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True, use_cache=False)
    seen = {}
    read = L.read_hook(model, ref, lambda h: seen.__setitem__("h", h))
    _logits(model, ids)
    read.remove()
    h = seen["h"]
    delta = _delta(ids.shape[0], h.shape[-1])
    handle = L.edit_hook(model, ref, lambda state: L.add_at(state, position, delta))
    try:
        with torch.no_grad():
            edited = model(ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    moved = L.add_at(h, position, delta)
    assert torch.equal(moved[:, :position], h[:, :position]) and not torch.equal(moved, h)
    # Causality: positions before the edit keep their logits.
    torch.testing.assert_close(edited.logits[:, :position], plain.logits[:, :position], rtol=0, atol=0)
    assert not torch.allclose(edited.logits[:, position], plain.logits[:, position])
    if ref.is_final:
        want = _unembed(model, moved)
    elif ref.index == N_BLOCKS:
        with torch.no_grad():
            want = _unembed(model, anatomy.final_norm(model)(moved))
    elif ref.index > 0:
        # The output of block i-1 is the input of block i: the same edit made there by hand.
        def pre(mod, args, kwargs):
            if args:
                return (L.add_at(args[0], position, delta),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": L.add_at(kwargs["hidden_states"], position, delta)}

        handle = anatomy.blocks(model)[ref.index].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            want = _logits(model, ids)
        finally:
            handle.remove()
    elif name in NO_ADDED_POSITIONS:
        want = _logits(model, None, inputs_embeds=moved)
    else:
        pytest.skip("state 0 is not inputs_embeds in this family (learned positions are added after it)")
    torch.testing.assert_close(edited.logits, want, rtol=1e-5, atol=1e-5)


def test_edit_hook_returning_none_leaves_the_state(tiny):
    model, ids = tiny["random:gpt2-tiny"].model, _ids()
    before = _logits(model, ids)
    handles = [L.edit_hook(model, spec, lambda h: None) for spec in SPECS]
    try:
        assert torch.equal(_logits(model, ids), before)
    finally:
        for h in handles:
            h.remove()


def test_resolve_passes_a_layer_ref_through(tiny):
    model = tiny["random:llama-tiny"].model
    ref = L.resolve(model, -1)
    assert L.resolve(model, ref) is ref
    with pytest.raises(ValueError, match="layer was resolved for a model of 5 blocks; this one has 2"):
        L.resolve(model, L.LayerRef(1, 5))


# -------------------------------------------------------------------- the four consumers agree


PROMPT = "Call me Ishmael. Some years ago"


def _scan_state(model, ids, spec):
    from mppm_ext.scan.passes import ModelHandle, StatePlan, capture_states, resolve_layer
    from mppm_ext.scan.windows import Batch

    plan = StatePlan(layers=(("v", resolve_layer(model, spec)),))
    post, _, states = capture_states(ModelHandle.of(model), Batch((), ids, torch.ones_like(ids)), plan)
    return states["v"], post


def _steer_layer_state(model, ids, spec, monkeypatch):
    """(the state steer_layer linearizes at and perturbs [B, d], its log p of the targets with a zero
    perturbation [B, m], the model's own log p [B, m])."""
    from mppm_ext.steering import layers as steer_layers

    seen = {}

    def spy(problem, hidden, targets, delta, options):
        seen["h"], seen["problem"] = hidden, problem
        return real(problem, hidden, targets, delta, options)

    real = steer_layers.gauss_newton
    monkeypatch.setattr(steer_layers, "gauss_newton", spy)
    targets = torch.tensor([[5, 7]]).expand(ids.shape[0], 2)
    steer_layers.steer_layer(model, ids, spec, targets, torch.full(targets.shape, 0.1), newton_steps=1)
    zero = torch.zeros(ids.shape[0], seen["h"].shape[-1])
    with steer_layers.eager_attention(model), torch.no_grad():
        perturbed = seen["problem"].log_prob(zero)
        own = torch.log_softmax(_logits(model, ids)[:, -1].float(), -1).gather(-1, targets)
    return seen["h"], perturbed, own


def _generate_state(loaded, spec):
    """(the state steered_generate's delta function sees at step 0 [B, d], the result's prompt ids,
    surprisal of the first token, the first token)."""
    from mppm_ext.steering.generate import _unsteered, steered_generate

    seen = {}

    def zero_delta(ctx):
        seen["state"] = ctx.state.clone()
        return _unsteered(ctx.state)

    run = steered_generate(loaded.model, loaded.tokenizer, [PROMPT], targets=None, layer=spec, max_new_tokens=1,
                           delta_fn=zero_delta)
    assert torch.equal(run.states[:, 0], seen["state"].float())
    return seen["state"], run


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", SPECS)
def test_one_index_one_state_everywhere(tiny, name, spec, monkeypatch):
    loaded = tiny[name]
    model = loaded.model
    state, run = _generate_state(loaded, spec)
    ids = run.prompt_ids
    captured = models.capture(model, ids, layers=(spec, "final"))
    want = captured.hidden[spec]
    # The scan's state, and its base state "final".
    scanned, base = _scan_state(model, ids, spec)
    assert torch.equal(scanned, want)
    assert torch.equal(base, captured.hidden["final"])
    # steer_layer: the state it linearizes at is capture's at the position; a zero perturbation there
    # changes nothing.
    steered, perturbed, own = _steer_layer_state(model, ids, spec, monkeypatch)
    torch.testing.assert_close(steered, want[:, -1].float(), rtol=1e-5, atol=1e-6)  # eager vs fused attention
    assert torch.equal(perturbed, own)
    # steered_generate: the delta function sees capture's state at the newest position, and its zero δ
    # leaves the first token's prediction as the model makes it.
    torch.testing.assert_close(state, want[:, -1], rtol=1e-5, atol=1e-6)
    log_p = torch.log_softmax(captured.logits[:, -1].double(), -1)
    assert torch.equal(run.token[:, 0], log_p.argmax(-1))
    torch.testing.assert_close(run.surprisal[:, 0], -log_p.max(-1).values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_states_differ(tiny, name):
    """So that test_one_index_one_state_everywhere fails for a consumer that mixes two indices up."""
    model = tiny[name].model
    hidden = models.capture(model, _ids(), layers=(0, 1, 2, "final"), logits=False).hidden
    states = list(hidden.values())
    for i, a in enumerate(states):
        for b in states[i + 1:]:
            assert a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("consumer", ["capture", "scan", "steer_layer", "steered_generate"])
@pytest.mark.parametrize("bad, shown", [(3, "3"), (-4, "-4"), (True, "True"), (1.5, "1.5"), ("mid", "'mid'")])
def test_bad_layers_are_refused_everywhere(tiny, consumer, bad, shown):
    loaded = tiny["random:llama-tiny"]
    model, ids = loaded.model, _ids(B=1)
    rng = r"an int in \[-3, 2\] \(this model has 2 blocks\) or 'final'"
    if consumer == "capture":
        call, message = lambda: models.capture(model, ids, layers=(bad,)), rf"layers\[0\] must be {rng}, got {shown}"
    elif consumer == "scan":
        if bad == "mid":
            pytest.skip("the scan takes 'mid'")
        from mppm_ext.scan.passes import resolve_layer

        call, message = lambda: resolve_layer(model, bad), rf"layers holds {shown}; each must be 'mid' or {rng}"
    elif consumer == "steer_layer":
        from mppm_ext.steering import steer_layer

        call = lambda: steer_layer(model, ids, bad, torch.tensor([[5]]), torch.full((1, 1), 0.1))  # noqa: E731
        message = rf"layer must be {rng}, got {shown}"
    else:
        from mppm_ext.steering.generate import steered_generate

        call = lambda: steered_generate(model, loaded.tokenizer, [PROMPT], layer=bad, max_new_tokens=1)  # noqa: E731
        message = rf"layer must be {rng}, got {shown}"
    with pytest.raises(ValueError, match=message):
        call()
