"""mppm_ext.streaming against log_softmax / logsumexp of the full logits in float64."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import mppm_ext
from backends_from_hidden import BACKENDS, BACKENDS_ISA, backend_isa  # noqa: F401 (fixture)
from helpers import assert_close
from mppm_ext import streaming

DTYPES = [torch.float32, torch.bfloat16, torch.float16]



def _problem(n, v, d, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 31 * n + 7 * v + d)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _logits(hidden, weight, bias, dtype=torch.float64):
    z = hidden.to(dtype) @ weight.to(dtype).T
    return z if bias is None else z + bias.to(dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 5 x 3 so that every test crosses many tile boundaries in both directions."""
    for device_type in ("cpu", "cuda"):
        monkeypatch.setitem(streaming.BUDGETS, device_type, streaming.Budget(tile=15, chunk=1 << 24, max_cols=3))


@pytest.mark.parametrize("backend_isa", BACKENDS_ISA, indirect=True)
@pytest.mark.parametrize("n,v,d", [(1, 1, 1), (7, 17, 5), (13, 31, 9), (5, 70, 33), (3, 997, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_log_prob_matches_log_softmax(small_tiles, backend_isa, n, v, d, bias, dtype):
    impl, device = backend_isa
    hidden, weight, b, targets = _problem(n, v, d, bias=bias, dtype=dtype)
    ours = streaming.token_log_prob_from_hidden(*_to(device, hidden, weight, b, targets), impl=impl).cpu()
    truth, ref = (torch.log_softmax(_logits(hidden, weight, b, dt), -1).gather(1, targets[:, None]).squeeze(1)
                  for dt in (torch.float64, torch.float32))
    assert ours.dtype == torch.float64 and ours.shape == (n,)
    assert_close(ours, ref, truth, "log_prob")


@pytest.mark.parametrize("backend_isa", BACKENDS_ISA, indirect=True)
@pytest.mark.parametrize("n,v,d", [(1, 1, 1), (7, 17, 5), (13, 31, 9), (5, 70, 33), (3, 997, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_moments_match_dense(small_tiles, backend_isa, n, v, d, dtype):
    impl, device = backend_isa
    hidden, weight, b, _ = _problem(n, v, d, dtype=dtype)
    lse, wbar = (t.cpu() for t in streaming.softmax_moments(*_to(device, hidden, weight, b), impl=impl))
    assert lse.dtype == torch.float64 and wbar.dtype == torch.float32 and wbar.shape == (n, d)
    (lse_truth, wbar_truth), (lse_ref, wbar_ref) = (
        (torch.logsumexp(z, -1), torch.softmax(z, -1) @ weight.to(dt))
        for dt in (torch.float64, torch.float32) for z in [_logits(hidden, weight, b, dt)])
    assert_close(lse, lse_ref, lse_truth, "lse")
    assert_close(wbar, wbar_ref, wbar_truth, "wbar")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("moments", [False, True])
def test_non_finite_logit_names_its_position(small_tiles, backend, moments):
    impl, device = backend
    hidden, weight, b, targets = _problem(4, 9, 3)
    weight[7, 1] = float("nan")
    hidden[2, 0] = float("inf")
    with pytest.raises(ValueError, match="row 0, vocabulary entry 7"):
        if moments:
            streaming.softmax_moments(*_to(device, hidden, weight, b), impl=impl)
        else:
            streaming.token_log_prob_from_hidden(*_to(device, hidden, weight, b, targets), impl=impl)


class HostReads(TorchFunctionMode):
    """Records every call the package itself makes (the caller's frame in mppm_ext) to a tensor operation
    that reads device data back to the host: on CUDA each one is a synchronisation, on CPU the same call
    sites run, so counting them here counts the syncs a CUDA call would make (the backends share this
    Python; only the tile sizes and the product's variant depend on the device)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
             "masked_select", "unique", "argwhere"}
    PACKAGE = str(Path(mppm_ext.__file__).parent)
    TORCH = str(Path(torch.__file__).parent)

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
        if name in self.READS or mask_index:
            # The nearest frame outside torch (which may wrap the call in Python) is the call site.
            caller = next(f for f in reversed(traceback.extract_stack(limit=8)[:-1]) if self.TORCH not in f.filename)
            if caller.filename.startswith(self.PACKAGE):
                self.sites.append(f"{name} at {Path(caller.filename).name}:{caller.lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_host_read_per_call(small_tiles, backend):
    """Each public streaming call reads device data back once (its one fault check), however many tiles
    its loop folds (5 x 3 tiles here: 4 row blocks x 33 vocabulary chunks)."""
    impl, device = backend
    hidden, weight, b, targets = _to(device, *_problem(17, 97, 8))
    tokens = targets.view(1, -1)
    calls = {
        "token_log_prob_from_hidden": lambda: streaming.token_log_prob_from_hidden(hidden, weight, b, targets,
                                                                                   impl=impl),
        "softmax_moments": lambda: streaming.softmax_moments(hidden, weight, b, impl=impl),
        "energy_from_hidden": lambda: mppm_ext.energy_from_hidden(hidden.unsqueeze(0), weight, tokens, bias=b,
                                                                  impl=impl),
    }
    for name, call in calls.items():
        call()  # first calls may probe the device once (streaming._mm_float32_out)
        with HostReads() as reads:
            call()
        assert len(reads.sites) == 1, f"{name}: {reads.sites}"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("n,v,d", [(1, 1, 1), (32768, 128256, 2048), (7, 50257, 8192), (10**6, 3, 1)])
def test_tiling_stays_within_budget(device_type, n, v, d):
    budget = streaming.BUDGETS[device_type]
    t = streaming.tiling(n, v, d, device_type)
    assert 1 <= t.rows <= n and 1 <= t.cols <= v
    assert t.rows * t.cols <= max(budget.tile, t.cols) and t.cols * d <= max(budget.chunk, d)


def test_float32_out_product_is_probed_not_assumed():
    # torch.mm(..., out_dtype=float32) has no CPU kernel: the probe says so instead of raising, and the
    # 16-bit CPU path forms its tiles from float32 operands.
    assert streaming._mm_float32_out(torch.device("cpu"), torch.bfloat16) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_16bit_tiles_without_float32_out_products(small_tiles, monkeypatch, dtype):
    # Where a torch lacks the float32-output product, the float32-operand tiles give the same answer.
    hidden, weight, b, targets = _problem(13, 31, 9, dtype=dtype)
    args = _to("cuda", hidden, weight, b, targets)
    fast = streaming.token_log_prob_from_hidden(*args, impl="cuda").cpu()
    monkeypatch.setattr(streaming, "_mm_float32_out", lambda device, dtype: False)
    slow = streaming.token_log_prob_from_hidden(*args, impl="cuda").cpu()
    truth, ref = (torch.log_softmax(_logits(hidden, weight, b, dt), -1).gather(1, targets[:, None]).squeeze(1)
                  for dt in (torch.float64, torch.float32))
    assert_close(fast, ref, truth, "log_prob")
    assert_close(slow, ref, truth, "log_prob")
