"""Backend choice for every op: ``impl="auto"`` walks a priority list and keeps, for each backend it
skips, the reason; an explicit ``impl`` that cannot run raises with that reason. The environment
variable ``MPPM_EXT_IMPL`` replaces ``"auto"`` for whole runs."""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence

import torch

#: Priority order of the backends when ``impl="auto"``.
PRIORITY = ("cuda", "triton", "cpp", "reference")


class BackendUnavailableError(RuntimeError):
    """Raised when the requested backend (or every backend) cannot run the given inputs."""


def _compiled_module():
    try:
        from . import _C
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(here, os.pardir, "pyproject.toml")):
            return None, (f"mppm_ext was imported from the source tree {here}, which has no compiled module; "
                          "install it (pip install .) and run Python from another directory")
        return None, f"the compiled module mppm_ext._C is not importable ({exc})"
    return _C, None


def compiled():
    """The compiled module ``mppm_ext._C``, or raise with the reason it is missing."""
    module, reason = _compiled_module()
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def compiled_or_none():
    """The compiled module, or None where it is missing (the callers have a fallback)."""
    return _compiled_module()[0]


def cpp_reason(device: torch.device) -> Optional[str]:
    if device.type not in ("cpu", "meta"):
        return f"the cpp backend runs on CPU tensors, these are on {device}"
    return _compiled_module()[1]


def cuda_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, these are on {device}"
    module, reason = _compiled_module()
    if module is None:
        return reason
    if not module.build_info()["cuda"]:
        return "this build of mppm_ext has no CUDA kernels (no nvcc when it was built)"
    return None


def triton_reason(device: torch.device, requested: str) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` for a call that asked for ``requested``
    (``"auto"`` or a backend name). On CPU tensors Triton runs only in its interpreter, which is for
    tests (thousands of times slower than cpp): ``"auto"`` passes it over, ``impl="triton"`` gets it."""
    try:
        from .triton import unavailable_reason
    except ImportError as exc:
        return f"mppm_ext.triton is not part of this installation ({exc})"
    why = unavailable_reason(device)
    if why is None and device.type == "cpu" and resolve(requested) != "triton":
        return "on CPU tensors Triton runs only in its interpreter, which impl='auto' passes over (ask for impl='triton')"
    return why


def backend_reasons(device: torch.device, impl: str,
                    logits_dtype: Optional[torch.dtype] = None) -> dict[str, Callable[[], Optional[str]]]:
    """The reasons table for :func:`choose` of an op that has every backend, for tensors on ``device``
    and a call that asked for ``impl`` (and, for the streaming ops, ``logits_dtype``)."""
    rounded = (f"logits_dtype={logits_dtype} asks for logits rounded to 16 bits, and the Triton kernels keep "
               "theirs in float32 registers")
    return {
        "cuda": lambda: cuda_reason(device),
        "triton": lambda: rounded if logits_dtype is not None else triton_reason(device, impl),
        "cpp": lambda: cpp_reason(device),
        "reference": lambda: None,
    }


def resolve(impl: str) -> str:
    """``impl`` with ``"auto"`` replaced by ``MPPM_EXT_IMPL`` when that is set."""
    if impl == "auto":
        return os.environ.get("MPPM_EXT_IMPL", "auto") or "auto"
    return impl


def choose(op: str, impl: str, reasons: dict[str, Callable[[], Optional[str]]]) -> str:
    """Pick the backend for ``op``.

    Args:
        op: the op's name, for messages.
        impl: ``"auto"`` or one of ``PRIORITY``.
        reasons: for every backend the op has, a callable returning why it cannot run these inputs
            (``None`` when it can). Backends missing from the mapping do not exist for this op.
    """
    impl = resolve(impl)
    if impl != "auto" and impl not in PRIORITY:
        raise ValueError(f"impl must be 'auto' or one of {PRIORITY}, got {impl!r}")
    candidates: Sequence[str] = PRIORITY if impl == "auto" else (impl,)
    skipped = []
    for name in candidates:
        why = reasons[name]() if name in reasons else f"{op} has no {name} backend"
        if why is None:
            if name == "reference" and impl == "auto":
                _warn_if_uncompiled()
            return name
        skipped.append(f"{name}: {why}")
    raise BackendUnavailableError(f"{op}: no backend can run these inputs (" + "; ".join(skipped) + ")")


_warned_uncompiled = False


def _warn_if_uncompiled() -> None:
    """``impl="auto"`` fell back to the reference backend: when that is because the compiled module is
    missing (typically Python started in the source tree, which imports it instead of the installed
    package), say so once per process — the reference is 3-10x slower and holds [B, T, V] temporaries."""
    global _warned_uncompiled
    reason = _compiled_module()[1]
    if reason is not None and not _warned_uncompiled:
        _warned_uncompiled = True
        warnings.warn(f"mppm_ext is running its slow reference backend: {reason}", RuntimeWarning, stacklevel=4)
