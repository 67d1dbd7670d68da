"""Corpus -> fixed-length token windows -> padded batches. No model runs here.

Windows never cross a document boundary: a document of n tokens gives ceil(n / window) windows, the last
one shorter (padded in its batch). Windows shorter than 3 tokens hold no energy position and are dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

#: The energy needs tokens t-1, t and t+1.
MIN_WINDOW = 3
#: Token-mean control: every HOLDOUT_EVERY-th window (20%) estimates the per-token mean state and is not scanned.
HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class Window:
    """One scanned sequence. ``index`` numbers the windows in corpus order (stable across ranks)."""

    index: int
    document: int
    start: int  # offset of the first token in its document
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """Windows padded on the right. ``ids`` [B, T] int64 (padding = 0), ``mask`` [B, T] int64 (1 = real)."""

    windows: tuple[Window, ...]
    ids: Tensor
    mask: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Split:
    """The windows to scan, and (token-mean control only) the held-out windows that estimate the means."""

    scan: tuple[Window, ...]
    heldout: tuple[Window, ...]
    dropped_short: int  # windows of fewer than MIN_WINDOW tokens


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the windows are raw text spans; no BOS is added)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def split_windows(tokenizer, documents: Sequence[str], window: int, *, max_tokens: Optional[int] = None,
                  holdout: bool = False) -> Split:
    """Tokenise ``documents`` and cut them into windows of at most ``window`` tokens.

    Args:
        window: tokens per window (>= 3).
        max_tokens: stop once the *scanned* windows hold this many tokens (the held-out ones come on top).
        holdout: reserve every ``HOLDOUT_EVERY``-th window (window index % 5 == 4) for the token-mean control.

    Raises:
        ValueError: window < 3, max_tokens < 3, or a corpus with no window of at least 3 tokens.
    """
    if not isinstance(window, int) or window < MIN_WINDOW:
        raise ValueError(f"window must be an integer >= {MIN_WINDOW} (the energy needs tokens t-1, t, t+1), got {window!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < MIN_WINDOW):
        raise ValueError(f"max_tokens must be an integer >= {MIN_WINDOW} or None, got {max_tokens!r}")
    scan, heldout, dropped, scanned_tokens, index = [], [], 0, 0, 0
    for doc, text in enumerate(documents):
        ids = encode(tokenizer, text)
        for start in range(0, len(ids), window):
            if max_tokens is not None and scanned_tokens >= max_tokens:
                break
            chunk = ids[start:start + window]
            if len(chunk) < MIN_WINDOW:
                dropped += 1
                continue
            if holdout and index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
                heldout.append(Window(index, doc, start, tuple(chunk)))
            else:
                if max_tokens is not None:
                    chunk = chunk[:max_tokens - scanned_tokens]
                    if len(chunk) < MIN_WINDOW:
                        break
                scan.append(Window(index, doc, start, tuple(chunk)))
                scanned_tokens += len(chunk)
            index += 1
    if not scan:
        raise ValueError(f"the corpus gives no window of at least {MIN_WINDOW} tokens to scan "
                         f"({len(documents)} documents; is it empty?)")
    if holdout and not heldout:
        raise ValueError(f"the token-mean control needs a held-out split (every {HOLDOUT_EVERY}th window), but the "
                         f"corpus gives only {len(scan)} windows; use a larger corpus or a smaller window")
    return Split(tuple(scan), tuple(heldout), dropped)


def shuffled(windows: Sequence[Window], seed: int) -> tuple[Window, ...]:
    """The shuffle control: each window's tokens permuted, seeded by ``seed`` and the window index so that
    every rank and every run permutes a window the same way."""
    out = []
    for w in windows:
        g = torch.Generator().manual_seed(seed * 1_000_003 + w.index)
        perm = torch.randperm(len(w.tokens), generator=g).tolist()
        out.append(Window(w.index, w.document, w.start, tuple(w.tokens[i] for i in perm)))
    return tuple(out)


def batches(windows: Sequence[Window], batch_size: int) -> list[Batch]:
    """Consecutive groups of ``batch_size`` windows, padded to the longest in each group."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    out = []
    for i in range(0, len(windows), batch_size):
        group = tuple(windows[i:i + batch_size])
        T = max(len(w.tokens) for w in group)
        ids = torch.zeros(len(group), T, dtype=torch.int64)
        mask = torch.zeros(len(group), T, dtype=torch.int64)
        for row, w in enumerate(group):
            ids[row, :len(w.tokens)] = torch.tensor(w.tokens, dtype=torch.int64)
            mask[row, :len(w.tokens)] = 1
        out.append(Batch(group, ids, mask))
    return out


def shard(items: Sequence, rank: int, world: int) -> Iterator:
    """Round-robin share of ``items`` for ``rank`` of ``world`` (batches, so each batch's padding, and with
    it the forward pass, is the same as in a single-process run)."""
    return iter(items[rank::world])
