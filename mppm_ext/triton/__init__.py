"""Triton kernels (optional: nothing here imports triton until a kernel is asked for).

One family of kernels per module, each kernel ``_<op>_kernel`` next to the function that launches it:
    energy.energy_parts                 log p_t, K_t, entropy and logsumexp from logits and hidden states
    linear.token_log_prob_from_hidden   log softmax((h W^T + b) / temperature)[target], its logsumexp and
                                        entropy, without the [N, V] logits
    linear.softmax_moments              logsumexp and W^T softmax(W h + b) in one pass over W
    cg.cg_solve                         batched conjugate gradient of the steering solve
The online softmax with the entropy is in ``_online`` (the linear kernels share it; energy keeps it in base 2).

On a GPU-less machine the kernels run on CPU tensors in Triton's interpreter, which Triton turns on
when ``TRITON_INTERPRET=1`` is set at the moment a kernel is defined, i.e. before the first import of
these modules (the tests set it in conftest.py). That is for testing: it is about 10^4 times slower
than the compiled C++ kernels.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


def _interpreted() -> bool:
    """Whether this process's kernels were defined in Triton's interpreter (raises ImportError
    without triton)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .energy import _energy_kernel

    return isinstance(_energy_kernel, InterpretedFunction)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on tensors of ``device``, or ``None`` when they can: a CUDA
    device with triton importable, or the CPU when the kernels were defined under
    ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), these are on {device}"
    try:
        interpreted = _interpreted()
    except ImportError as exc:
        return f"triton is not importable ({exc}); it comes with the 'test' extra on Linux x86-64"
    if device.type == "cpu" and not interpreted:
        return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                "mppm_ext.triton's kernels are first imported")
    return None


def on_device(x: Tensor):
    """The context to launch a kernel on ``x`` in: Triton launches on the current CUDA device, whatever
    device the tensors are on, so a CUDA tensor's own device is made current (a no-op on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


__all__ = ["unavailable_reason", "on_device"]
