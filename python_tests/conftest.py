import os

import pytest
import torch

import mppm_ext

# Triton reads TRITON_INTERPRET when a kernel is defined, i.e. at the first import of mppm_ext.triton's
# kernel modules: set it before any test module can import them, so that without a GPU the Triton
# kernels run on CPU tensors in the interpreter whatever order the tests are collected in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def cuda_available() -> bool:
    return torch.cuda.is_available() and mppm_ext.build_info()["cuda"]


@pytest.fixture(params=mppm_ext.cpu_isas())
def cpu_isa(request):
    """Runs a test once per CPU instruction set this build and CPU support, restoring the default."""
    default = mppm_ext.build_info()["cpu_isa"]
    mppm_ext.set_cpu_isa(request.param)
    yield request.param
    mppm_ext.set_cpu_isa(default)


def kernel_backends() -> list:
    """(impl, device) pairs of every compiled backend that can run here."""
    backends = [pytest.param(("cpp", "cpu"), id="cpp")]
    backends.append(pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.skipif(
        not cuda_available(), reason="needs a CUDA device and a build with nvcc")))
    return backends


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    info = mppm_ext.build_info()
    return (f"mppm_ext {info['version']}: cpu isas {info['cpu_isas_supported']}, cuda built={info['cuda']}, "
            f"devices={info['cuda_device_count']}, torch {torch.__version__}, "
            f"MPPM_EXT_IMPL={os.environ.get('MPPM_EXT_IMPL', '')!r}")
