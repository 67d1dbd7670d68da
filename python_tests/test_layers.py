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
