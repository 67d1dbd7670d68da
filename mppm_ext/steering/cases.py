"""The case set of ``mppm steer-bench``: every prompt continued under every concept (``cases.json``).

A concept carries what each steering method needs: the sentence a continuation is compared with in
embedding space (``concept``), the words steered towards (``words``; logit bias and the Jacobian methods
target the token each word is after a space) and contrastive prompt pairs (``pairs`` = [positive,
negative]; ActAdd uses the first pair, CAA the mean difference over all of them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor

from . import targets as targets_mod

CASES_FILE = Path(__file__).with_name("cases.json")


@dataclass(frozen=True)
class Concept:
    name: str
    concept: str
    words: tuple
    pairs: tuple  # ((positive, negative), ...)


@dataclass(frozen=True)
class Case:
    """One prompt under one concept; ``prompt_index`` and ``concept_index`` point into the case set."""

    index: int
    prompt_index: int
    concept_index: int
    prompt: str
    concept: Concept


@dataclass(frozen=True)
class CaseSet:
    prompts: tuple
    concepts: tuple

    @property
    def cases(self) -> list[Case]:
        """Prompt-major: case ``p * len(concepts) + c`` is prompt p under concept c."""
        return [Case(p * len(self.concepts) + c, p, c, prompt, concept)
                for p, prompt in enumerate(self.prompts) for c, concept in enumerate(self.concepts)]

    def select(self, prompts: Optional[int] = None, concepts: Optional[Sequence[str]] = None) -> "CaseSet":
        """The first ``prompts`` prompts and the named ``concepts`` (in the given order). ValueError for a
        count below 1 or an unknown concept name (naming the known ones)."""
        chosen = self.concepts
        if concepts is not None:
            known = {c.name: c for c in self.concepts}
            unknown = [n for n in concepts if n not in known]
            if unknown or not concepts:
                raise ValueError(f"concepts: unknown concept name(s) {unknown or concepts!r}; the case set has "
                                 f"{sorted(known)}")
            chosen = tuple(known[n] for n in dict.fromkeys(concepts))
        if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1):
            raise ValueError(f"prompts must be an int >= 1, got {prompts!r}")
        return CaseSet(self.prompts[:prompts], chosen)


def load_cases(path: Optional[Path] = None) -> CaseSet:
    """The case set (default: the one shipped with the package). ValueError naming the file and what is
    wrong for a malformed one."""
    path = Path(path) if path is not None else CASES_FILE
    try:
        raw = json.loads(path.read_text())
        prompts = tuple(raw["prompts"])
        concepts = tuple(Concept(c["name"], c["concept"], tuple(c["words"]), tuple(tuple(p) for p in c["pairs"]))
                         for c in raw["concepts"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a case set (a JSON object with 'prompts': [str] and 'concepts': "
                         f"[{{name, concept, words, pairs}}]): {err}") from err
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{path}: 'prompts' must be a non-empty list of non-empty strings")
    if not concepts:
        raise ValueError(f"{path}: 'concepts' is empty")
    for c in concepts:
        if not c.name or not c.concept or not c.words:
            raise ValueError(f"{path}: concept {c.name!r} needs a name, a concept sentence and words")
        if not c.pairs or not all(len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p) for p in c.pairs):
            raise ValueError(f"{path}: concept {c.name!r}: 'pairs' must be a non-empty list of "
                             "[positive, negative] non-empty strings")
    if len({c.name for c in concepts}) != len(concepts):
        raise ValueError(f"{path}: concept names must be unique")
    return CaseSet(prompts, concepts)


def concept_targets(tokenizer, concepts: Sequence[Concept], vocab_size: int) -> list[Tensor]:
    """Per concept, ``[m]`` int64 ids of its words' space-prefixed tokens (what the logit bias and the
    Jacobian methods raise). ValueError naming the concept for a word the tokenizer does not know."""
    out = []
    for c in concepts:
        try:
            out.append(targets_mod.resolve(tokenizer, list(c.words), vocab_size, bare=False))
        except ValueError as err:
            raise ValueError(f"concept {c.name!r}: {err}") from err
    return out


def pick(n_total: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``0 .. n_total - 1`` (first and last included): the subset of cases
    a budgeted method runs on. With the prompt-major layout this covers many prompts and concepts."""
    if n >= n_total:
        return list(range(n_total))
    return sorted({round(i * (n_total - 1) / max(n - 1, 1)) for i in range(n)})


__all__ = ["Concept", "Case", "CaseSet", "load_cases", "concept_targets", "pick", "CASES_FILE"]
