"""Bad input to steer_step and to the compiled cg_solve gives a clear exception naming the argument."""

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import mppm_ext
from mppm_ext import _dispatch
from steer_helpers import steer_inputs

B, m, d, V = 2, 3, 8, 50


def args(**changes):
    hidden, weight, targets, delta, _ = steer_inputs(B, m, d, V)
    a = {"hidden": hidden, "weight": weight, "targets": targets, "delta": delta}
    for key, fn in changes.items():
        a[key] = fn(a)
    return a


def case(name, exc, match, kwargs=None, **changes):
    return pytest.param(changes, kwargs or {}, exc, match, id=name)


def nan_at(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[1] = value
    return t


CASES = [
    case("hidden_not_tensor", TypeError, "hidden must be a torch.Tensor", hidden=lambda a: a["hidden"].tolist()),
    case("hidden_rank_3", ValueError, r"hidden must be \[B, d\]", hidden=lambda a: a["hidden"][None]),
    case("hidden_rank_1", ValueError, r"hidden must be \[B, d\]", hidden=lambda a: a["hidden"][0]),
    case("weight_rank", ValueError, r"weight must be \[V, d\] with d = 8 .*got shape \(8,\)", weight=lambda a: a["weight"][0]),
    case("weight_d_mismatch", ValueError, r"d = 8 \(hidden's last dimension\), got shape \(50, 7\)", weight=lambda a: a["weight"][:, :-1]),
    case("empty_batch", ValueError, "batch is empty", hidden=lambda a: a["hidden"][:0],
         targets=lambda a: a["targets"][:0], delta=lambda a: a["delta"][:0]),
    case("empty_d", ValueError, r"V and hidden size d must be >= 1, got weight \(50, 0\)", hidden=lambda a: a["hidden"][:, :0], weight=lambda a: a["weight"][:, :0]),
    case("targets_rank", ValueError, r"targets must be \[B, m\]", targets=lambda a: a["targets"][0]),
    case("targets_batch", ValueError, r"targets must be \[B, m\]", targets=lambda a: a["targets"][:1]),
    case("no_targets", ValueError, "at least one token", targets=lambda a: a["targets"][:, :0],
         delta=lambda a: a["delta"][:, :0]),
    case("delta_shape", ValueError, "delta must have the shape of targets", delta=lambda a: a["delta"][:, :1]),
    case("float_targets", TypeError, "int32 or int64", targets=lambda a: a["targets"].float()),
    case("int_delta", TypeError, "delta must be a floating tensor", delta=lambda a: a["delta"].long()),
    case("target_too_large", ValueError, r"targets\[1, 2\] = 50 is outside the vocabulary \[0, 50\)",
         targets=lambda a: a["targets"].index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(V))),
    case("target_negative", ValueError, "outside the vocabulary",
         targets=lambda a: a["targets"].index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(-1))),
    case("int_hidden", TypeError, "hidden has dtype torch.int64", hidden=lambda a: a["hidden"].long()),
    case("complex_weight", TypeError, "weight has dtype torch.complex64", weight=lambda a: a["weight"].cfloat()),
    case("float64_hidden_cpp", TypeError, "float64 runs only with impl='reference'", {"impl": "cpp"},
         hidden=lambda a: a["hidden"].double()),
    case("nan_hidden", ValueError, "hidden holds NaN or inf", hidden=lambda a: nan_at(a["hidden"])),
    case("inf_hidden", ValueError, "hidden holds NaN or inf", hidden=lambda a: nan_at(a["hidden"], float("inf"))),
    case("nan_weight", ValueError, "NaN or inf", weight=lambda a: nan_at(a["weight"])),
    case("nan_delta", ValueError, "delta holds NaN or inf", delta=lambda a: nan_at(a["delta"])),
    case("bias_shape", ValueError, r"bias must be \[V\]", {"bias": torch.zeros(V - 1)}),
    case("nan_bias", ValueError, "bias holds NaN or inf", {"bias": nan_at(torch.zeros(V))}),
    case("negative_lam", ValueError, "lam must be a finite number >= 0", {"lam": -1e-3}),
    case("nan_lam", ValueError, "lam must be a finite number", {"lam": float("nan")}),
    case("string_lam", TypeError, "lam must be a real number", {"lam": "0.1"}),
    case("zero_tol", ValueError, "tol must be a finite number > 0", {"tol": 0.0}),
    case("zero_max_iter", ValueError, "max_iter must be >= 1", {"max_iter": 0}),
    case("float_max_iter", TypeError, "max_iter must be an int", {"max_iter": 2.5}),
    case("zero_newton_steps", ValueError, "newton_steps must be >= 1", {"newton_steps": 0}),
    case("negative_max_step", ValueError, "max_step must be a finite number > 0", {"max_step": -1.0}),
    case("bad_impl", ValueError, "impl must be 'auto' or one of", {"impl": "fortran"}),
    case("meta", ValueError, "meta tensors", hidden=lambda a: a["hidden"].to("meta"),
         weight=lambda a: a["weight"].to("meta"), targets=lambda a: a["targets"].to("meta"),
         delta=lambda a: a["delta"].to("meta")),
    case("mixed_devices", ValueError, "all tensors must be on one device", hidden=lambda a: a["hidden"].to("meta")),
]


@pytest.mark.parametrize("changes, kwargs, exc, match", CASES)
def test_steer_step_bad_input(changes, kwargs, exc, match):
    kwargs = {"impl": "reference", **kwargs}
    with pytest.raises(exc, match=match):
        mppm_ext.steer_step(**args(**changes), **kwargs)


def test_cuda_impl_on_cpu_tensors():
    with pytest.raises(mppm_ext.BackendUnavailableError, match="cuda backend runs on CUDA tensors"):
        mppm_ext.steer_step(**args(), impl="cuda")


def test_non_contiguous_and_broadcast_inputs_are_accepted():
    a = args()
    hidden = a["hidden"].t().contiguous().t()  # column-major view
    delta = torch.tensor(0.2).expand(B, m)  # stride 0
    out = mppm_ext.steer_step(hidden, a["weight"], a["targets"], delta, impl="reference")
    ref = mppm_ext.steer_step(a["hidden"], a["weight"], a["targets"], delta.contiguous(), impl="reference")
    assert torch.allclose(out.delta_h, ref.delta_h, rtol=1e-5, atol=1e-7)  # a column-major matmul rounds differently


def _cg_args(B=2, m=3, d=5):
    rows, center, rhs = torch.randn(B, m, d), torch.randn(B, d), torch.randn(B, m).double()
    outs = (torch.empty(B, m, dtype=torch.float64), torch.empty(B, dtype=torch.int64),
            torch.empty(B, dtype=torch.float64), torch.empty(B, dtype=torch.uint8),
            torch.empty(B, d + 3 * m, dtype=torch.float64))
    return [rows, center, rhs, 0.0, 1e-6, 10, *outs, 1, 0]


@pytest.mark.parametrize("index, value, exc, match", [
    (0, torch.randn(2, 3, 5).double(), TypeError, "rows has dtype float64"),
    (0, torch.randn(2, 5), ValueError, "rows must have 3 dimensions"),
    (0, torch.randn(2, 5, 3).transpose(1, 2), ValueError, "rows must be a contiguous tensor"),
    (0, torch.randn(2, 0, 5), ValueError, "m >= 1"),
    (1, torch.randn(2, 4), ValueError, "center.shape"),
    (2, torch.randn(2, 3), TypeError, "rhs has dtype float32"),
    (2, torch.randn(3, 3).double(), ValueError, "rhs.shape"),
    (3, -1.0, ValueError, "lam must be"),
    (4, 0.0, ValueError, "tol must be"),
    (5, -1, ValueError, "max_iter must be"),
    (6, torch.empty(2, 2, dtype=torch.float64), ValueError, "out_u.shape"),
    (10, torch.empty(2, 3, dtype=torch.float64), ValueError, "scratch.shape"),
    (11, 0, ValueError, "num_threads must be"),
])
def test_compiled_cg_checks_its_arguments(index, value, exc, match):
    a = _cg_args()
    a[index] = value
    a = [to_dlpack(x) if isinstance(x, torch.Tensor) else x for x in a]
    with pytest.raises(exc, match=match):
        _dispatch.compiled().cg_solve(*a)


def test_compiled_cg_rejects_non_capsules():
    a = _cg_args()
    with pytest.raises(TypeError, match="rows must be a DLPack capsule"):
        _dispatch.compiled().cg_solve(*[x if i == 0 else (to_dlpack(x) if isinstance(x, torch.Tensor) else x)
                                        for i, x in enumerate(a)])
