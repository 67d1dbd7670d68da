"""Backends of the streaming pass (energy_from_hidden, mppm_ext.streaming) as test parameters, with the cpp
backend once per CPU instruction set of its row kernels and the others once."""

import pytest
import torch

import mppm_ext
from conftest import cuda_available
from mppm_ext._dispatch import triton_reason

BACKENDS = [
    pytest.param(("reference", "cpu"), id="reference"),
    pytest.param(("cpp", "cpu"), id="cpp"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA device and a build with nvcc")),
    pytest.param(("triton", "cpu"), id="triton", marks=pytest.mark.skipif(
        triton_reason(torch.device("cpu"), "triton") is not None,
        reason=str(triton_reason(torch.device("cpu"), "triton")))),
]
COMPILED = [p for p in BACKENDS if p.id in ("cpp", "cuda")]
BACKENDS_ISA = [p for p in BACKENDS if p.id != "cpp"] + [
    pytest.param(("cpp", "cpu", isa), id=f"cpp-{isa}") for isa in mppm_ext.cpu_isas()]


@pytest.fixture
def backend_isa(request):
    """(impl, device) from a BACKENDS_ISA param, with its CPU instruction set pinned for the test."""
    impl, device, *isa = request.param
    default = mppm_ext.build_info()["cpu_isa"]
    mppm_ext.set_cpu_isa(isa[0] if isa else default)
    yield impl, device
    mppm_ext.set_cpu_isa(default)
