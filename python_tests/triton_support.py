"""Where the Triton tests run: on a CUDA device when there is one, else on CPU tensors in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1 before any kernel module is imported)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reason():
    try:
        from mppm_ext.triton import unavailable_reason
    except ImportError as exc:  # pragma: no cover - the package itself always imports
        return str(exc)
    return unavailable_reason(torch.device(DEVICE))


REASON = _reason()
#: Marks a test module whose tests need the Triton kernels on DEVICE.
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"Triton kernels cannot run here: {REASON}")
