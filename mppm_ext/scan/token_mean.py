"""The token-identity control: b[x] = mean hidden state over the held-out positions holding
token x, subtracted from h_t before differencing, so that K measures motion the current token's identity
does not explain."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenMeans:
    """Per-token mean states. ``slot`` [V] int64 maps a token id to a row of ``means`` (-1: unseen in the
    held-out split); ``means`` [U+1, d] float64, whose last row is the mean over all held-out positions
    and stands in for unseen tokens."""

    slot: Tensor
    means: Tensor
    counts: Tensor  # [U] int64, held-out positions per seen token

    def subtract(self, hidden: Tensor, ids: Tensor) -> Tensor:
        """``hidden`` [B, T, d] minus b[ids] [B, T] -> float64 [B, T, d] (on ``means``' device)."""
        rows = self.slot.to(ids.device)[ids.clamp(0, self.slot.numel() - 1)]
        rows = torch.where(rows < 0, self.means.shape[0] - 1, rows)
        return hidden.double() - self.means.to(hidden.device)[rows]

    def coverage(self, ids: Tensor, mask: Tensor) -> tuple[int, int]:
        """(real positions whose token was seen in the held-out split, real positions)."""
        real = mask != 0
        seen = self.slot.to(ids.device)[ids.clamp(0, self.slot.numel() - 1)] >= 0
        return int((seen & real).sum()), int(real.sum())


class TokenMeanAccumulator:
    """Sums states per token id over held-out batches. Only the ids in ``heldout_ids`` get a row, so the
    memory is O(distinct held-out tokens x d), not O(V x d) (262k x 640 float64 would be 1.3 GB for Gemma)."""

    def __init__(self, vocab: int, heldout_ids: Tensor, hidden_size: int):
        seen = torch.unique(heldout_ids)
        self.slot = torch.full((vocab,), -1, dtype=torch.int64)
        self.slot[seen] = torch.arange(seen.numel())
        # Row U holds the sum over every position (the unseen-token fallback).
        self.sums = torch.zeros(seen.numel() + 1, hidden_size, dtype=torch.float64)
        self.counts = torch.zeros(seen.numel() + 1, dtype=torch.int64)

    def add(self, hidden: Tensor, ids: Tensor, mask: Tensor) -> None:
        """Accumulate ``hidden`` [B, T, d] at the real positions of ``ids``/``mask`` [B, T]."""
        real = (mask != 0).cpu()
        h = hidden.detach().double().cpu()[real]
        rows = self.slot[ids.cpu()[real]]
        if bool((rows < 0).any()):
            raise ValueError("a held-out token id was not registered with the accumulator")
        self.sums.index_add_(0, rows, h)
        self.counts.index_add_(0, rows, torch.ones_like(rows))
        self.sums[-1] += h.sum(0)
        self.counts[-1] += rows.numel()

    def finish(self) -> TokenMeans:
        """The means; call after every rank's sums were added together."""
        if int(self.counts[-1]) == 0:
            raise ValueError("the held-out split holds no real position")
        means = self.sums / self.counts.clamp(min=1).unsqueeze(-1).double()
        return TokenMeans(slot=self.slot, means=means, counts=self.counts[:-1].clone())
