"""What steered generation steers towards: target token ids, from ids or from words.

A target is given per prompt as token ids (ints) or words (strings); both may be mixed in one list. A word
stands for every token it splits into, written both at the start of a text and after a space (BPE
vocabularies hold " ocean" and "ocean" as different tokens), so that steering towards a word raises the
probability of the forms it can take in the middle of a sentence.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

#: One prompt's targets: token ids and/or words.
TargetList = Sequence[Union[int, str]]


def word_token_ids(tokenizer, word: str, *, bare: bool = True) -> list[int]:
    """Every token id of ``word`` as the tokenizer splits it after a space and (with ``bare``) at the start
    of a text, first seen first. ``bare=False`` leaves out the word-start pieces a BPE vocabulary splits
    a bare word into (SmolLM2 splits "thunder" into "th" + "under"), which mean nothing on their own.

    Raises ValueError for a word that is empty or that the tokenizer maps to its unknown token."""
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"target word must be a non-empty string, got {word!r}")
    word = word.strip()
    ids: list[int] = []
    for form in (" " + word, word) if bare else (" " + word,):
        for i in tokenizer(form, add_special_tokens=False)["input_ids"]:
            if i not in ids:
                ids.append(int(i))
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ValueError(f"target word {word!r} is not in the tokenizer's vocabulary (it maps to the unknown token)")
    return ids


def resolve(tokenizer, targets: TargetList, vocab_size: int, *, bare: bool = True) -> Tensor:
    """``[m]`` int64 unique token ids for one prompt's targets (ids kept, words expanded by
    :func:`word_token_ids` with ``bare``). Raises ValueError for an empty list or an id outside ``[0, vocab_size)`` and
    TypeError for an entry that is neither an int nor a string."""
    if isinstance(targets, (str, int)) or not isinstance(targets, Sequence) or len(targets) == 0:
        raise ValueError(f"targets must be a non-empty list of token ids or words, got {targets!r}")
    ids: list[int] = []
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, str)):
            raise TypeError(f"target entries must be token ids (int) or words (str), got {type(t).__name__}: {t!r}")
        new = word_token_ids(tokenizer, t, bare=bare) if isinstance(t, str) else [t]
        for i in new:
            if not 0 <= i < vocab_size:
                raise ValueError(f"target token id {i} is outside the vocabulary [0, {vocab_size})")
            if i not in ids:
                ids.append(i)
    return torch.tensor(ids, dtype=torch.int64)


def resolve_batch(tokenizer, targets, n_prompts: int, vocab_size: int) -> list[Tensor]:
    """Per-prompt ``[m_b]`` int64 target ids. ``targets`` is one list for every prompt or a list of
    ``n_prompts`` lists (one per prompt)."""
    per_prompt = isinstance(targets, Sequence) and not isinstance(targets, str) and len(targets) > 0 and all(
        isinstance(t, Sequence) and not isinstance(t, str) for t in targets)
    if not per_prompt:
        one = resolve(tokenizer, targets, vocab_size)
        return [one] * n_prompts
    if len(targets) != n_prompts:
        raise ValueError(f"targets has {len(targets)} per-prompt lists for {n_prompts} prompts")
    return [resolve(tokenizer, t, vocab_size) for t in targets]
