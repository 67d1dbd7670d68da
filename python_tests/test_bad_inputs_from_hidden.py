"""Bad input to energy_from_hidden, the streaming functions and the compiled softmax_tile epilogue gives a
clear Python exception naming the argument; never a crash, a hang or silent NaN."""

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import mppm_ext
from mppm_ext import _dispatch, streaming

B, T, d, V = 2, 6, 8, 50


def inputs():
    g = torch.Generator().manual_seed(7)
    return {"hidden": torch.randn(B, T, d, generator=g), "weight": torch.randn(V, d, generator=g),
            "tokens": torch.randint(0, V, (B, T), generator=g), "bias": None}


def at(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def case(name, exc, match, **changes):
    return pytest.param(changes, exc, match, id=name)


NAN = float("nan")
CASES = [
    case("hidden_not_tensor", TypeError, "hidden must be a torch.Tensor", hidden=lambda a: a["hidden"].tolist()),
    case("weight_not_tensor", TypeError, "weight must be a torch.Tensor", weight=lambda a: 3),
    case("hidden_rank_4", ValueError, "hidden must be", hidden=lambda a: a["hidden"][None]),
    case("hidden_rank_1", ValueError, "hidden must be", hidden=lambda a: a["hidden"][0, 0]),
    case("tokens_rank", ValueError, "tokens must have 2", tokens=lambda a: a["tokens"][0]),
    case("weight_rank", ValueError, r"weight must be \[V, d\]", weight=lambda a: a["weight"][0]),
    case("weight_d_mismatch", ValueError, "d = 8", weight=lambda a: a["weight"][:, :5]),
    case("empty_vocab", ValueError, "must be >= 1", weight=lambda a: a["weight"][:0]),
    case("empty_hidden", ValueError, "must be >= 1", hidden=lambda a: a["hidden"][..., :0],
         weight=lambda a: a["weight"][:, :0]),
    case("bias_shape", ValueError, r"bias must be \[V\] = \[50\]", bias=lambda a: torch.zeros(V + 1)),
    case("batch_mismatch", ValueError, "must agree on batch and length", tokens=lambda a: a["tokens"][:1]),
    case("length_mismatch", ValueError, "must agree on batch and length", tokens=lambda a: a["tokens"][:, :-1]),
    case("empty_batch", ValueError, "batch is empty", hidden=lambda a: a["hidden"][:0], tokens=lambda a: a["tokens"][:0]),
    case("empty_sequence", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :0],
         tokens=lambda a: a["tokens"][:, :0]),
    case("length_1", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :1], tokens=lambda a: a["tokens"][:, :1]),
    case("length_2", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :2], tokens=lambda a: a["tokens"][:, :2]),
    case("float_tokens", TypeError, "int32 or int64", tokens=lambda a: a["tokens"].float()),
    case("token_too_large", ValueError, r"tokens\[1, 3\] = 50 is outside the vocabulary \[0, 50\)",
         tokens=lambda a: at(a["tokens"], (1, 3), V)),
    case("token_negative", ValueError, "outside the vocabulary", tokens=lambda a: at(a["tokens"], (0, 0), -1)),
    case("int_hidden", TypeError, "hidden has dtype torch.int64", hidden=lambda a: a["hidden"].long()),
    case("complex_weight", TypeError, "weight has dtype torch.complex64", weight=lambda a: a["weight"].cfloat()),
    case("float64_weight", TypeError, "float64 runs only with impl='reference'", weight=lambda a: a["weight"].double()),
    case("nan_hidden", ValueError, "hidden holds NaN or inf at batch 1, position 2", hidden=lambda a: at(a["hidden"], (1, 2, 0), NAN)),
    case("inf_hidden_last", ValueError, "hidden holds NaN or inf at batch 0, position 5",
         hidden=lambda a: at(a["hidden"], (0, 5, 3), float("inf"))),
    case("nan_weight", ValueError, "weight holds NaN or inf", weight=lambda a: at(a["weight"], (49, 7), NAN)),
    case("inf_bias", ValueError, "bias holds NaN or \\+inf", bias=lambda a: at(torch.zeros(V), 3, float("inf"))),
    case("overflowing_logits", ValueError, "logits at batch 0, position 0 overflow float32", weight=lambda a: a["weight"] * 1e37,
         hidden=lambda a: a["hidden"] * 1e3),
    case("meta_and_cpu", ValueError, "all tensors must be on one device", weight=lambda a: a["weight"].to("meta")),
    case("bias_on_meta", ValueError, "all tensors must be on one device", bias=lambda a: torch.zeros(V, device="meta")),
]


def _bad(**changes):
    args = inputs()
    for key, fn in changes.items():
        args[key] = fn(args)
    return args


@pytest.mark.parametrize("impl", ["auto", "reference", "cpp"])
@pytest.mark.parametrize("changes,exc,match", CASES)
def test_public_api_rejects(changes, exc, match, impl):
    args = _bad(**changes)
    if impl == "reference" and "float64" in match:
        pytest.skip("float64 is the reference backend's own dtype")
    with pytest.raises(exc, match=match):
        mppm_ext.energy_from_hidden(args["hidden"], args["weight"], args["tokens"], bias=args["bias"], impl=impl)


def test_norm_arguments():
    a = inputs()
    with pytest.raises(TypeError, match="norm must be callable"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], norm="rms")
    with pytest.raises(ValueError, match="kinetic_state must be one of"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], norm=torch.nn.RMSNorm(d), kinetic_state="mid")
    with pytest.raises(ValueError, match="kinetic_state='pre' needs norm"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], kinetic_state="pre")
    with pytest.raises(ValueError, match="norm\\(hidden\\) must return"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], norm=lambda h: h[..., :3])
    with pytest.raises(ValueError, match="norm\\(hidden\\) holds NaN or inf at batch 0, position 0"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], norm=lambda h: h / 0.0)


def test_mask_errors():
    a = inputs()
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], attention_mask=torch.ones(B, T + 1))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], attention_mask=torch.ones(B, T))


def test_impl_errors():
    a = inputs()
    with pytest.raises(ValueError, match="impl must be"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], impl="fast")
    with pytest.raises(mppm_ext.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"], impl="cuda")


def test_unused_positions_may_hold_garbage():
    """A NaN state and an out-of-range id at a masked position are never read."""
    a = inputs()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    hidden = at(a["hidden"], (0, 2), NAN)
    tokens = at(a["tokens"], (0, 2), 10**6)
    r = mppm_ext.energy_from_hidden(hidden, a["weight"], tokens, attention_mask=mask, impl="cpp")
    assert r.log_energy[1, 1:-1].isfinite().all()  # the ends are undefined by definition
    assert r.valid[0].tolist() == [False, False, False, False, True, False]


def test_meta_tensors_give_shapes():
    a = {k: (v.to("meta") if v is not None else v) for k, v in inputs().items()}
    r = mppm_ext.energy_from_hidden(a["hidden"], a["weight"], a["tokens"])
    assert r.energy.shape == (B, T) and r.energy.device.type == "meta" and r.stats.count.shape == (B,)


def test_streaming_meta_tensors_give_shapes():
    a = {k: (v.to("meta") if v is not None else v) for k, v in inputs().items()}
    lp = streaming.token_log_prob_from_hidden(a["hidden"][0], a["weight"], None, a["tokens"][0])
    lse, wbar = streaming.softmax_moments(a["hidden"][0], a["weight"], None)
    assert lp.shape == (T,) and lse.shape == (T,) and wbar.shape == (T, d) and wbar.device.type == "meta"


def test_broadcast_and_non_contiguous_views():
    """Stride-0 and transposed views are accepted and give the same numbers as contiguous copies."""
    a = inputs()
    hidden = a["hidden"][:1].expand(B, T, d)
    weight = torch.randn(d, V).T  # [V, d] with unit stride along V, not d
    bias = torch.zeros(1).expand(V)
    r = mppm_ext.energy_from_hidden(hidden, weight, a["tokens"], bias=bias, impl="cpp")
    c = mppm_ext.energy_from_hidden(hidden.contiguous(), weight.contiguous(), a["tokens"], bias=bias.contiguous(),
                                    impl="cpp")
    assert torch.equal(r.log_prob.nan_to_num(), c.log_prob.nan_to_num())


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_streaming_functions_reject(impl):
    a = inputs()
    h, w, x = a["hidden"][0], a["weight"], a["tokens"][0]
    with pytest.raises(ValueError, match=r"hidden must be \[N, d\]"):
        streaming.token_log_prob_from_hidden(a["hidden"], w, None, x, impl=impl)
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[6\]"):
        streaming.token_log_prob_from_hidden(h, w, None, x[:3], impl=impl)
    with pytest.raises(ValueError, match=r"targets\[2\] = 50 is outside"):
        streaming.token_log_prob_from_hidden(h, w, None, at(x, 2, V), impl=impl)
    with pytest.raises(TypeError, match="targets must hold token ids"):
        streaming.token_log_prob_from_hidden(h, w, None, x.float(), impl=impl)
    with pytest.raises(ValueError, match=r"hidden must be \[B, d\]"):
        streaming.softmax_moments(a["hidden"], w, None, impl=impl)
    with pytest.raises(ValueError, match="row 4, vocabulary entry 0"):
        streaming.softmax_moments(at(h, (4, 1), NAN), w, None, impl=impl)
    assert streaming.token_log_prob_from_hidden(h[:0], w, None, x[:0], impl=impl).shape == (0,)
    lse, wbar = streaming.softmax_moments(h[:0], w, None, impl=impl)
    assert lse.shape == (0,) and wbar.shape == (0, d)
    # No graph is built: an input that asks for one is refused, not silently dropped; without grad mode it runs.
    with pytest.raises(ValueError, match="not differentiable, and hidden requires grad"):
        streaming.softmax_moments(h.requires_grad_(), w, None, impl=impl)
    with pytest.raises(ValueError, match="not differentiable, and weight requires grad"):
        streaming.softmax_moments(h.detach(), w.requires_grad_(), None, impl=impl)
    with torch.no_grad():
        assert not streaming.softmax_moments(h, w, None, impl=impl)[1].requires_grad


class TestSoftmaxTileDirectly:
    """mppm_ext._C.softmax_tile checks its own arguments: a caller that bypasses Python cannot crash it."""

    R, C = 4, 9

    def args(self, **over):
        out = {
            "z": torch.randn(self.R, self.C), "run_max": torch.full((self.R,), -float("inf"), dtype=torch.float64),
            "run_sum": torch.zeros(self.R, dtype=torch.float64), "bad_col": torch.full((self.R,), -1),
            "targets": torch.tensor([0, 3, 8, 100]), "picked": torch.zeros(self.R, dtype=torch.float64),
            "alpha": torch.empty(self.R),
        }
        out.update(over)
        return out

    def call(self, v0=0, num_threads=1, **over):
        args = self.args(**over)
        views = {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        views.setdefault("run_ent", None)
        _dispatch.compiled().softmax_tile(**views, v0=v0, inv_temperature=1.0, num_threads=num_threads, stream=0)
        return args

    def test_good_call(self):
        z = torch.randn(self.R, self.C)
        a = self.call(z=z.clone())
        torch.testing.assert_close(a["run_max"] + a["run_sum"].log(), torch.logsumexp(z.double(), 1))
        # z now holds exp(z - max), unnormalised: the running sum normalises it
        torch.testing.assert_close(a["z"].double() / a["run_sum"].unsqueeze(1), torch.softmax(z.double(), 1))
        assert (a["alpha"] == 0).all()  # the first tile rescales nothing
        assert a["picked"][:3].tolist() == [z[0, 0].item(), z[1, 3].item(), z[2, 8].item()]
        assert a["picked"][3] == 0 and (a["bad_col"] == -1).all()

    def test_target_outside_tile_and_non_finite(self):
        z = torch.randn(self.R, self.C)
        z[1, 5] = float("nan")
        z[3, 0] = float("inf")
        a = self.call(z=z.clone(), v0=100, targets=torch.tensor([-5, 2**62, 99, 105]))
        assert a["bad_col"].tolist() == [-1, 105, -1, 100]
        assert a["picked"].tolist() == [0.0, 0.0, 0.0, z[3, 5].item()]  # only row 3's target is in the tile
        assert (a["z"][1] == 0).all() and a["alpha"][1] == 1.0

    @pytest.mark.parametrize("over,exc,match", [
        ({"z": "not a capsule"}, TypeError, "z must be a DLPack capsule"),
        ({"z": torch.zeros(4)}, ValueError, "z must have 2 dimensions"),
        ({"z": torch.zeros(4, 9, dtype=torch.float64)}, TypeError, "z has dtype float64"),
        ({"z": torch.zeros(4, 18)[:, ::2]}, ValueError, "contiguous in its last dimension"),
        ({"z": torch.zeros(4, 0)}, ValueError, "at least one column"),
        ({"z": torch.zeros(1, 9).expand(4, 9)}, ValueError, "must not overlap itself"),
        ({"run_max": torch.zeros(5, dtype=torch.float64)}, ValueError, r"run_max.shape\[0\] must equal"),
        ({"run_sum": torch.zeros(4)}, TypeError, "run_sum has dtype float32"),
        ({"bad_col": torch.zeros(8, dtype=torch.int64)[::2]}, ValueError, "bad_col must be a contiguous"),
        ({"targets": torch.zeros(4, dtype=torch.int32)}, TypeError, "targets has dtype int32"),
        ({"picked": None}, ValueError, "targets and picked must be given together"),
        ({"alpha": torch.zeros(4, 1)}, ValueError, "alpha must have 1 dimensions"),
    ], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
    def test_bad_views(self, over, exc, match):
        with pytest.raises(exc, match=match):
            self.call(**over)

    def test_bad_scalars(self):
        with pytest.raises(ValueError, match="v0 must be >= 0"):
            self.call(v0=-1)
        with pytest.raises(ValueError, match="num_threads"):
            self.call(num_threads=0)

    def test_empty_rows(self):
        a = self.call(z=torch.zeros(0, 9), run_max=torch.zeros(0, dtype=torch.float64),
                      run_sum=torch.zeros(0, dtype=torch.float64), bad_col=torch.zeros(0, dtype=torch.int64),
                      targets=None, picked=None, alpha=None)
        assert a["z"].shape == (0, 9)
