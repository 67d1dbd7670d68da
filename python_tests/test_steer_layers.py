"""steer_layer on tiny random-weight Hugging Face models built from configs (nothing is downloaded)."""

import pytest
import torch

import mppm_ext
from mppm_ext.steering import steer_layer
from mppm_ext.models import anatomy

transformers = pytest.importorskip("transformers")


def gpt2(n_embd=32):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=n_embd, n_head=4, vocab_size=101, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init gives near-flat logits; a larger head makes the targets movable
        model.lm_head.weight.mul_(20.0)
    return model


MODELS = {"gpt2": gpt2, "llama": llama}


def ids(B=2, T=6, V=97):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(5))


# layer -> the block whose output it is (layers numbered as mppm_ext.models.layers; 3 blocks here).
BLOCK_OF = {1: 0, -2: 1}


@pytest.mark.parametrize("layer", [1, -2])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_steer_layer_achieves_gain(family, layer):
    model = MODELS[family]()
    before = model.config._attn_implementation
    targets, delta = torch.tensor([[5, 7], [9, 11]]), torch.tensor([[0.3, 0.2], [0.1, 0.3]])
    out = steer_layer(model, ids(), layer, targets, delta, newton_steps=8, max_step=1.0)
    assert model.config._attn_implementation == before  # restored
    assert out.converged.all() and out.feasible.all(), out.achieved
    # measured independently: a forward with the perturbation added at the last position
    block = anatomy.blocks(model)[BLOCK_OF[layer]]
    add = lambda mod, inp, o: ((o[0] + _at_last(o[0], out.delta_h),) + tuple(o[1:])) if isinstance(o, tuple) \
        else o + _at_last(o, out.delta_h)
    with torch.no_grad():
        base = torch.log_softmax(model(ids()).logits[:, -1].double(), -1).gather(-1, targets)
        handle = block.register_forward_hook(add)
        steered = torch.log_softmax(model(ids()).logits[:, -1].double(), -1).gather(-1, targets)
        handle.remove()
    assert torch.allclose(steered - base, delta.double(), atol=2e-3)
    assert not out.delta_h.requires_grad


def _at_last(hidden, delta_h):
    pad = torch.zeros_like(hidden)
    pad[:, -1] = delta_h
    return pad


def test_vjp_and_jvp_jacobians_agree():
    model = gpt2(n_embd=16)  # the jvp path runs one forward-mode pass per hidden dimension
    targets, delta = torch.tensor([[5, 7]]), torch.full((1, 2), 0.2)
    a = steer_layer(model, ids(B=1), 2, targets, delta, newton_steps=1, position=-3, tol=1e-10)
    b = steer_layer(model, ids(B=1), 2, targets, delta, newton_steps=1, position=-3, tol=1e-10, jacobian="jvp")
    assert torch.allclose(a.delta_h, b.delta_h, rtol=1e-4, atol=1e-6)
    assert torch.allclose(a.predicted_gain, b.predicted_gain, atol=1e-6)


def test_last_layer_equals_steer_step_through_final_norm():
    """Layer -1 (the last block's output) at the last position reaches the logits only through ln_f and the
    head."""
    model = gpt2()
    x = ids()
    targets, delta = torch.tensor([[5, 7], [9, 11]]), torch.full((2, 2), 0.25)
    with torch.no_grad():
        pre = model(x, output_hidden_states=True).hidden_states
    captured = {}
    handle = anatomy.blocks(model)[-1].register_forward_hook(
        lambda mod, inp, o: captured.__setitem__("h", (o[0] if isinstance(o, tuple) else o)[:, -1].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    del pre
    layer = steer_layer(model, x, -1, targets, delta, newton_steps=1, tol=1e-10)
    final = mppm_ext.steer_step(captured["h"], model.lm_head.weight, targets, delta, norm=model.transformer.ln_f,
                                newton_steps=1, tol=1e-10, impl="reference")
    assert torch.allclose(layer.delta_h, final.delta_h, rtol=1e-4, atol=1e-5)
    assert torch.allclose(layer.log_prob_before, final.log_prob_before, atol=1e-4)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(layer=4), ValueError, r"layer must be an int in \[-4, 3\] \(this model has 3 blocks\) or 'final', got 4"),
    (dict(layer=-5), ValueError, r"layer must be an int in \[-4, 3\] .* got -5"),
    (dict(layer=1.0), ValueError, r"layer must be an int in \[-4, 3\] .* got 1\.0"),
    (dict(layer=True), ValueError, r"layer must be an int in \[-4, 3\] .* got True"),
    (dict(layer="mid"), ValueError, r"layer must be an int in \[-4, 3\] .* or 'final', got 'mid'"),
    (dict(position=6), ValueError, r"position must be an int in \[-6, 6\)"),
    (dict(input_ids=torch.zeros(2, 6)), TypeError, "input_ids must hold token ids"),
    (dict(input_ids=torch.zeros(0, 6, dtype=torch.long)), ValueError, "input_ids must be a non-empty"),
    (dict(input_ids=torch.full((2, 6), 500)), ValueError, "outside the vocabulary"),
    (dict(targets=torch.tensor([[5], [500]])), ValueError, r"targets\[1, 0\] = 500"),
    (dict(delta=torch.full((2, 1), float("nan"))), ValueError, "delta holds NaN"),
    (dict(jacobian="fd"), ValueError, "jacobian must be 'vjp' or 'jvp'"),
    (dict(model="gpt2"), TypeError, "model must be a torch.nn.Module"),
    (dict(lam=-1.0), ValueError, "lam must be a finite number >= 0"),
    (dict(attention_mask=torch.ones(2, 5)), ValueError, "attention_mask must have the shape of input_ids"),
])
def test_steer_layer_bad_inputs(bad, exc, match):
    args = dict(model=gpt2(), input_ids=ids(), layer=1, targets=torch.tensor([[5], [9]]), delta=torch.full((2, 1), 0.2))
    args.update(bad)
    with pytest.raises(exc, match=match):
        steer_layer(**args)
