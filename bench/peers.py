"""Peer libraries timed beside mppm_ext when they are importable (never installed by the bench).

Each returns ``None`` when the peer is missing, so a provider list simply leaves it out. The peers
compute the negative log-likelihood only (cross-entropy with ``reduction="none"``), one of the eight
quantities mppm_ext returns: they bound from below what the log-prob part of the work costs there."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


def liger_cross_entropy() -> Optional[Callable[[Tensor, Tensor], Tensor]]:
    """Liger-Kernel's Triton cross-entropy on logits (CUDA only)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerCrossEntropyLoss(reduction="none")
    return lambda logits, targets: loss(logits, targets)


def liger_fused_linear_cross_entropy() -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Liger-Kernel's fused linear cross-entropy (chunked matmul + Triton CE; CUDA only)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return lambda hidden, weight, targets: loss(weight, hidden, targets)


def cut_cross_entropy() -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Apple's cut-cross-entropy: the classifier matmul fused with the loss (CUDA only)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets, reduction="none")


def torch_linear_cross_entropy_chunked() -> Optional[Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """torch.nn.functional.linear_cross_entropy with its chunked path (recent torch releases only)."""
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options_type is None:
        return None
    options = options_type()
    return lambda hidden, weight, targets: fn(hidden, weight, targets, reduction="none", options=options)
