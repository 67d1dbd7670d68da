"""Bad input gives a clear Python exception naming the argument, from the public API and from the
compiled module called directly; never a crash or silent NaN."""

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import mppm_ext
from conftest import cuda_available
from helpers import make_inputs
from mppm_ext import _dispatch
from mppm_ext.selftest import named_tensors

B, T, d, V = 2, 6, 8, 50


def inputs():
    return make_inputs(B, T, d, V)


def case(name, exc, match, **changes):
    return pytest.param(changes, exc, match, id=name)


def _bad(**changes):
    hidden, logits, tokens = inputs()
    args = {"hidden": hidden, "logits": logits, "tokens": tokens}
    for key, fn in changes.items():
        args[key] = fn(args)
    return args


CASES = [
    case("hidden_not_tensor", TypeError, "hidden must be a torch.Tensor", hidden=lambda a: a["hidden"].tolist()),
    case("hidden_rank_4", ValueError, "hidden must be", hidden=lambda a: a["hidden"][None]),
    case("hidden_rank_1", ValueError, "hidden must be", hidden=lambda a: a["hidden"][0, 0]),
    case("logits_rank", ValueError, "logits must have 3", logits=lambda a: a["logits"][0]),
    case("tokens_rank", ValueError, "tokens 2", tokens=lambda a: a["tokens"][0]),
    case("batch_mismatch", ValueError, "must agree on batch and length", logits=lambda a: a["logits"][:1]),
    case("length_mismatch", ValueError, "must agree on batch and length", tokens=lambda a: a["tokens"][:, :-1]),
    case("empty_batch", ValueError, "batch is empty", hidden=lambda a: a["hidden"][:0], logits=lambda a: a["logits"][:0],
         tokens=lambda a: a["tokens"][:0]),
    case("empty_sequence", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :0],
         logits=lambda a: a["logits"][:, :0], tokens=lambda a: a["tokens"][:, :0]),
    case("length_1", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :1],
         logits=lambda a: a["logits"][:, :1], tokens=lambda a: a["tokens"][:, :1]),
    case("length_2", ValueError, "at least 3 tokens", hidden=lambda a: a["hidden"][:, :2],
         logits=lambda a: a["logits"][:, :2], tokens=lambda a: a["tokens"][:, :2]),
    case("empty_vocab", ValueError, "got d=8, V=0", logits=lambda a: a["logits"][..., :0]),
    case("empty_hidden", ValueError, "got d=0, V=50", hidden=lambda a: a["hidden"][..., :0]),
    case("float_tokens", TypeError, "int32 or int64", tokens=lambda a: a["tokens"].float()),
    case("int16_tokens", TypeError, "int32 or int64", tokens=lambda a: a["tokens"].short()),
    case("token_too_large", ValueError, r"tokens\[1, 3\] = 50 is outside the vocabulary \[0, 50\)",
         tokens=lambda a: a["tokens"].index_put((torch.tensor(1), torch.tensor(3)), torch.tensor(V))),
    case("token_negative", ValueError, "outside the vocabulary",
         tokens=lambda a: a["tokens"].index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(-1))),
    case("int_hidden", TypeError, "hidden has dtype torch.int64", hidden=lambda a: a["hidden"].long()),
    case("complex_logits", TypeError, "logits has dtype torch.complex64", logits=lambda a: a["logits"].cfloat()),
    case("float64_logits", TypeError, "float64 runs only with impl='reference'", logits=lambda a: a["logits"].double()),
    case("nan_logits", ValueError, "logits holds NaN or inf in the row at batch 1, position 2",
         logits=lambda a: a["logits"].index_put((torch.tensor(1), torch.tensor(2), torch.tensor(7)), torch.tensor(float("nan")))),
    case("inf_logits", ValueError, "logits holds NaN or inf",
         logits=lambda a: a["logits"].index_put((torch.tensor(0), torch.tensor(4), torch.tensor(0)), torch.tensor(float("inf")))),
    case("nan_hidden", ValueError, "hidden holds NaN or inf",
         hidden=lambda a: a["hidden"].index_put((torch.tensor(0), torch.tensor(3), torch.tensor(1)), torch.tensor(float("nan")))),
    case("meta_and_cpu", ValueError, "all tensors must be on one device", logits=lambda a: a["logits"].to("meta")),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("changes,exc,match", CASES)
def test_public_api_rejects(changes, exc, match, impl):
    if impl == "reference" and "float64" in match:
        pytest.skip("float64 is accepted by the reference")
    if impl == "reference" and "in the row at" in match:
        match = "logits holds NaN or inf"  # the reference names no position
    with pytest.raises(exc, match=match):
        mppm_ext.energy(**_bad(**changes), impl=impl)


def _at(t, b, pos, value):
    return t.index_put((torch.tensor(b), torch.tensor(pos)), torch.tensor(value))


#: Bad data, all in sequence 1: (inputs -> inputs, labels or None, the first faulty position (1, t)).
DATA_FAULTS = {
    "token_out_of_range": (lambda h, z, x: (h, z, _at(x, 1, 3, V)), None, 3),
    "label_out_of_range": (lambda h, z, x: (h, z, x), lambda x: _at(x, 1, 3, -7), 3),
    "nan_logits": (lambda h, z, x: (h, _at(z, 1, 2, float("nan")), x), None, 2),
    "inf_logits": (lambda h, z, x: (h, _at(z, 1, 4, float("inf")), x), None, 4),
    "no_finite_logit": (lambda h, z, x: (h, _at(z, 1, 2, float("-inf")), x), None, 2),
    "nan_hidden": (lambda h, z, x: (_at(h, 1, 3, float("nan")), z, x), None, 3),
}


def _bits(x):
    """A tensor's bytes, so that equality is bitwise (NaN == NaN)."""
    return x.contiguous().reshape(-1).view(torch.uint8) if x.is_floating_point() else x


def _bitwise_equal(a, b) -> bool:
    """Every tensor of two results equal bit for bit."""
    other = dict(named_tensors(b))
    return all(x.shape == other[n].shape and torch.equal(_bits(x), _bits(other[n])) for n, x in named_tensors(a))


#: (impl, device) of the check=False tests: the fused kernels on each device, and the reference.
CHECK_IMPLS = [pytest.param(("cpp", "cpu"), id="cpp"), pytest.param(("reference", "cpu"), id="reference"),
               pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(
                   not cuda_available(), reason="needs a CUDA device and a build with nvcc"))]


@pytest.mark.parametrize("backend", CHECK_IMPLS)
def test_check_false_changes_nothing_on_good_data(backend):
    impl, device = backend
    hidden, logits, tokens = (x.to(device) for x in inputs())
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[0, 0] = False
    checked = mppm_ext.energy(hidden, logits, tokens, attention_mask=mask, impl=impl)
    unchecked = mppm_ext.energy(hidden, logits, tokens, attention_mask=mask, impl=impl, check=False)
    assert _bitwise_equal(unchecked, checked)


@pytest.mark.parametrize("backend", CHECK_IMPLS)
@pytest.mark.parametrize("fault", sorted(DATA_FAULTS))
def test_check_false_does_not_raise(fault, backend):
    """check=False: bad data raises nothing; the clean sequence comes out exactly as in a clean call, and the
    fused kernels make every per-token output of the faulty position NaN (check=True raises, see
    test_public_api_rejects and below)."""
    impl, device = backend
    spoil, labels_of, t = DATA_FAULTS[fault]
    hidden, logits, tokens = inputs()
    clean = mppm_ext.energy(*(x.to(device) for x in (hidden, logits, tokens)), impl=impl).map(lambda x: x.cpu())
    hidden, logits, tokens = spoil(hidden, logits, tokens)
    labels = None if labels_of is None else labels_of(tokens).to(device)
    hidden, logits, tokens = (x.to(device) for x in (hidden, logits, tokens))
    with pytest.raises(ValueError):
        mppm_ext.energy(hidden, logits, tokens, labels=labels, impl=impl)
    got = mppm_ext.energy(hidden, logits, tokens, labels=labels, impl=impl, check=False).map(lambda x: x.cpu())
    assert _bitwise_equal(got.map(lambda x: x[0]), clean.map(lambda x: x[0]))
    if impl != "reference":
        assert all(getattr(got, q)[1, t].isnan() for q in mppm_ext.TOKEN_QUANTITIES), "the faulty position is NaN"
        # The positions before it are as in a clean call (but t-1, whose target a bad label at t is).
        for q in mppm_ext.TOKEN_QUANTITIES:
            assert torch.equal(_bits(getattr(got, q)[1, :t - 1]), _bits(getattr(clean, q)[1, :t - 1])), q


def test_mask_errors():
    hidden, logits, tokens = inputs()
    with pytest.raises(ValueError, match="attention_mask must have the shape of tokens"):
        mppm_ext.energy(hidden, logits, tokens, attention_mask=torch.ones(B, T + 1))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        mppm_ext.energy(hidden, logits, tokens, attention_mask=torch.ones(B, T))
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        mppm_ext.energy(hidden, logits, tokens, attention_mask=[[1] * T] * B)


def test_masked_positions_may_hold_garbage():
    hidden, logits, tokens = inputs()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    tokens[0, :2] = -5
    logits[0, :2] = float("nan")
    hidden[0, 0] = float("inf")
    r = mppm_ext.energy(hidden, logits, tokens, attention_mask=mask)
    assert r.valid[0].sum() == T - 4 and not r.energy[r.valid].isnan().any()


def test_impl_errors():
    hidden, logits, tokens = inputs()
    with pytest.raises(ValueError, match="impl must be 'auto' or one of"):
        mppm_ext.energy(hidden, logits, tokens, impl="fast")
    with pytest.raises(mppm_ext.BackendUnavailableError, match="cuda: the cuda backend runs on CUDA tensors"):
        mppm_ext.energy(hidden, logits, tokens, impl="cuda")


def test_environment_overrides_auto(monkeypatch):
    hidden, logits, tokens = inputs()
    monkeypatch.setenv("MPPM_EXT_IMPL", "reference")
    with pytest.raises(TypeError, match="float64"):
        mppm_ext.energy(hidden, logits.double(), tokens.double().long(), impl="cpp")
    mppm_ext.energy(hidden, logits.double(), tokens)  # float64 is fine: auto became reference


def test_meta_tensors_give_shapes():
    hidden, logits, tokens = (t.to("meta") for t in inputs())
    r = mppm_ext.energy(hidden, logits, tokens)
    assert r.energy.shape == (B, T) and r.energy.device.type == "meta" and r.stats.count.shape == (B,)


def test_unknown_cpu_isa():
    with pytest.raises(ValueError, match="not available"):
        mppm_ext.set_cpu_isa("avx9000")


class TestCompiledModuleDirectly:
    """mppm_ext._C checks its own arguments: a caller that bypasses the Python API cannot crash it."""

    def tensors(self):
        hidden, logits, tokens = inputs()
        return {
            "hidden": hidden, "logits": logits, "tokens": tokens, "labels": tokens,
            "out_tokens": torch.empty(10, B, T), "out_defined": torch.empty(B, T, dtype=torch.uint8),
            "out_stats": torch.empty(B, 34), "out_counts": torch.empty(B, 2, dtype=torch.int64),
            "scratch": torch.empty(4, B, T, dtype=torch.float64), "out_fault": torch.empty(1, dtype=torch.int64),
            "workspace": torch.empty(0, dtype=torch.uint8),
        }

    @staticmethod
    def capsules(tensors, **over):
        out = {**tensors, "mask": None, "inv_temperature": 1.0, **over}
        return {k: (to_dlpack(v) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}

    def args(self, **over):
        return self.capsules(self.tensors(), **over)

    def call(self, **over):
        _dispatch.compiled().energy(**self.args(**over), ignore_index=-100, num_threads=1, stream=0)

    def test_good_call(self):
        self.call()

    @pytest.mark.parametrize("over,exc,match", [
        ({"hidden": "not a capsule"}, TypeError, "hidden must be a DLPack capsule"),
        ({"hidden": torch.zeros(B, T)}, ValueError, "hidden must have 3 dimensions"),
        ({"logits": torch.zeros(B, T + 1, V)}, ValueError, r"logits.shape\[1\] must equal"),
        ({"logits": torch.zeros(B, T, V, dtype=torch.float64)}, TypeError, "logits has dtype float64"),
        ({"logits": torch.zeros(B, T, 2 * V)[..., ::2]}, ValueError, "contiguous in its last dimension"),
        ({"tokens": torch.zeros(B, T)}, TypeError, "tokens has dtype float32"),
        ({"mask": torch.ones(B, T, dtype=torch.int64)}, TypeError, "mask has dtype int64"),
        ({"labels": torch.zeros(B, T)}, TypeError, "labels has dtype float32"),
        ({"labels": torch.zeros(B, T + 1, dtype=torch.int64)}, ValueError, r"labels.shape\[1\] must equal"),
        ({"labels": torch.zeros(B * T, dtype=torch.int64)}, ValueError, "labels must have 2 dimensions"),
        ({"inv_temperature": 0.0}, ValueError, "inv_temperature must be a finite number > 0"),
        ({"inv_temperature": float("inf")}, ValueError, "inv_temperature must be a finite number > 0"),
        ({"inv_temperature": float("nan")}, ValueError, "inv_temperature must be a finite number > 0"),
        ({"out_tokens": torch.empty(10, B, T + 1)}, ValueError, r"out_tokens.shape\[2\]"),
        ({"out_tokens": torch.empty(8, B, T)}, ValueError, r"out_tokens.shape\[0\]"),
        ({"out_stats": torch.empty(34, B).t()}, ValueError, "out_stats must be a contiguous tensor"),
        ({"out_counts": torch.empty(B, 2)}, TypeError, "out_counts has dtype float32"),
        ({"scratch": torch.empty(4, B, T)}, TypeError, "scratch has dtype float32"),
        ({"scratch": torch.empty(2, B, T, dtype=torch.float64)}, ValueError, r"scratch.shape\[0\]"),
        ({"hidden": torch.zeros(B, T, 0)}, ValueError, "non-empty last dimension"),
        ({"out_fault": torch.empty(2, dtype=torch.int64)}, ValueError, r"out_fault.shape\[0\]"),
        ({"out_fault": torch.empty(1, dtype=torch.int32)}, TypeError, "out_fault has dtype int32"),
        ({"workspace": torch.empty(0, dtype=torch.int64)}, TypeError, "workspace has dtype int64"),
        ({"workspace": torch.empty(32, dtype=torch.uint8)[1:]}, ValueError, "workspace must be 16-byte aligned"),
    ], ids=lambda x: x if isinstance(x, str) and len(x) < 30 else None)
    def test_bad_views(self, over, exc, match):
        with pytest.raises(exc, match=match):
            self.call(**over)

    @pytest.mark.parametrize("over,b,t,kind", [
        ({}, None, None, None),
        ({"tokens": torch.full((B, T), V)}, 0, 0, "token_out_of_range"),
        ({"labels": make_inputs(B, T, d, V)[2].index_put((torch.tensor(1), torch.tensor(4)), torch.tensor(-7))},
         1, 4, "label_out_of_range"),
    ])
    def test_data_faults_go_to_the_fault_word(self, over, b, t, kind):
        """Bad data is not raised by the op but packed into out_fault (the public call raises it):
        -1 for none, else ((b * T + t) << ENERGY_FAULT_BITS) | the kind's index in ENERGY_FAULTS."""
        c = _dispatch.compiled()
        fault = torch.full((1,), 12345, dtype=torch.int64)
        c.energy(**self.args(**over, out_fault=fault), ignore_index=-100, num_threads=1, stream=0)
        want = -1 if kind is None else ((b * T + t) << c.ENERGY_FAULT_BITS) | c.ENERGY_FAULTS.index(kind)
        assert int(fault) == want

    def test_workspace_sizes(self):
        c = _dispatch.compiled()
        assert c.energy_workspace_bytes(B, T, V, None) == 0  # CPU tensors: none
        with pytest.raises(ValueError, match="V >= 1"):
            c.energy_workspace_bytes(B, T, 0, None)

    @pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a build with nvcc")
    def test_cuda_workspace_too_small(self):
        c = _dispatch.compiled()
        needed = c.energy_workspace_bytes(B, T, V, 0)
        assert needed > 0  # at least the finish's chunk sums
        cuda = {k: v.cuda() for k, v in self.tensors().items()}
        with pytest.raises(ValueError, match=f"workspace must hold at least {needed} bytes"):
            c.energy(**self.capsules(cuda, workspace=torch.empty(needed - 1, dtype=torch.uint8, device="cuda")),
                     ignore_index=-100, num_threads=1, stream=0)

    def test_bad_thread_count(self):
        with pytest.raises(ValueError, match="num_threads"):
            _dispatch.compiled().energy(**self.args(), ignore_index=-100, num_threads=0, stream=0)
