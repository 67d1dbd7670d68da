"""``mppm steer-bench``: Jacobian steering against the steering methods people use, on prompt × concept
cases, at matched fluency (docs/steer-eval/README.md has the definitions and the procedure).

For every decoding (greedy, seeded sampling), the natural continuation of each prompt is generated once
and shared by the prompt's cases; every method then continues every case (``mid_cases`` can restrict the
middle-layer Jacobian, the costliest, to a subset spread over the set) at each of its strengths. Per case, method and strength the
figures are: similarity to the concept (MiniLM cosine), fluency cost (mean surprisal of the continuation
under the judge model, unhooked), distinct-1/2, the share of steps the solver found feasible and
converged, ||δ|| and ||δ||/||h||, the mean log p of the target set, and CV(log E), CV(log K), CV(s) along
the continuation. :mod:`.bench_stats` turns them into curves and paired-bootstrap comparisons.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import bench_stats as stats
from . import cases as cases_mod
from . import methods as methods_mod
from .evaluate import SentenceEmbedder, _cv, continuation_perplexity, distinct_n
from .generate import GenerationResult, steered_generate

#: Strength grids of the default run (units in methods.KINDS) and the rest of its configuration.
DEFAULTS = dict(
    strengths={"logit_bias": (1.0, 2.0, 4.0, 8.0), "jacobian_final": (0.5, 1.0, 2.0, 4.0),
               "jacobian_mid": (0.5, 1.0, 2.0, 4.0), "actadd": (0.25, 0.5, 1.0, 2.0), "caa": (0.25, 0.5, 1.0, 2.0)},
    # The middle-layer Jacobian step costs about 20 single-position forwards per generated token (2 Gauss-Newton
    # steps of one vmapped VJP over m = 5 targets and a trial each, see steering.cached): 67-84 s per strength
    # for 100 cases x 16 tokens on the shared 2 cores, against about 10 s for a logit-bias job (measured in the
    # default run), so every case, both decodings and 4 strengths fit in the hour (19 min wall).
    max_new_tokens=16, decodings=("greedy", "sampled"), temperature=0.7, mid_cases=None,
    mid_decodings=("greedy", "sampled"),
    # Two Gauss-Newton steps reach the asked gains to ~0.03 nats in the middle layer (measured on SmolLM2);
    # each costs a VJP of m targets and a trial forward.
    mid_solver=dict(newton_steps=2, gain_tol=0.05), extra_costs=(0.25, 0.5, 1.0, 2.0), resamples=2000, seed=0,
    # One batch per job: the 100 cases share 10 prompts, whose prefix is computed once (generate._shared_prefix),
    # and a single-token forward of 100 rows uses the cores better than 40.
    batch=100)
#: --quick (CI smoke run, under 5 minutes on 2 cores): every method at 2 strengths, both decodings, 8 tokens,
#: on 3 prompts x 4 concepts, the middle-layer Jacobian on all of them.
QUICK = dict(DEFAULTS, strengths={"logit_bias": (2.0, 8.0), "jacobian_final": (1.0, 4.0), "jacobian_mid": (1.0, 2.0),
                                  "actadd": (0.5, 2.0), "caa": (0.5, 2.0)},
             max_new_tokens=8)
#: The cases of --quick: the first 3 prompts under 4 concepts.
QUICK_CASES = dict(prompts=3, concepts=("ocean", "music", "space", "fire"))

#: The comparisons reported: (method A, method B); A is a Jacobian method.
COMPARISONS = (("jacobian_final", "logit_bias"), ("jacobian_final", "actadd"), ("jacobian_final", "caa"),
               ("jacobian_mid", "logit_bias"), ("jacobian_mid", "actadd"), ("jacobian_mid", "caa"),
               ("jacobian_mid", "jacobian_final"))

#: Per-row figures, in CSV order after the identifying columns.
FIGURES = ("similarity", "cost", "perplexity", "distinct_1", "distinct_2", "feasible_steps", "converged_steps",
           "delta_norm", "relative_delta_norm", "target_log_prob", "cv_log_energy", "cv_log_kinetic",
           "cv_surprisal")


def _mean(x: torch.Tensor) -> float:
    x = x[x.isfinite()]
    return float(x.mean()) if x.numel() else math.nan


def row_figures(run: GenerationResult, i: int, similarity: float, cost: float, *, steered: bool,
                solver: bool, state_edit: bool) -> dict:
    """The figures of row ``i`` of ``run`` (see :data:`FIGURES`). ``solver``: feasible/converged shares mean
    something (Jacobian methods); ``state_edit``: ||δ|| means something (not the logit bias, not natural)."""
    tokens = run.token[i].tolist()
    nan = math.nan
    return dict(
        similarity=similarity, cost=cost, perplexity=math.exp(cost), distinct_1=distinct_n(tokens, 1),
        distinct_2=distinct_n(tokens, 2),
        feasible_steps=float(run.feasible[i].double().mean()) if solver else nan,
        converged_steps=float(run.converged[i].double().mean()) if solver else nan,
        delta_norm=_mean(run.delta_norm[i]) if state_edit else nan,
        relative_delta_norm=_mean(run.delta_norm[i] / run.state_norm[i]) if state_edit else nan,
        target_log_prob=_mean(run.target_log_prob_after[i]) if steered else nan,
        cv_log_energy=_cv(run.log_energy[i]), cv_log_kinetic=_cv(torch.log(run.kinetic[i])),
        cv_surprisal=_cv(run.surprisal[i]))


def final_state_cost(model, run: GenerationResult) -> torch.Tensor:
    """``[B]`` float64 mean surprisal of each generated token under logits ``W h + b`` of ``run.states``
    (the final states before δ of a run steered at the final state or the logits)."""
    from ..models import anatomy

    weight, bias = anatomy.unembedding(model)
    logits = run.states.double() @ weight.detach().double().cpu().T
    if bias is not None:
        logits = logits + bias.detach().double().cpu()
    return -torch.log_softmax(logits, -1).gather(-1, run.token.unsqueeze(-1)).squeeze(-1).mean(-1)


def _batched(fn, n: int, size: int) -> list:
    """fn(slice) for consecutive slices of at most ``size`` rows of ``range(n)``."""
    return [fn(slice(s, min(s + size, n))) for s in range(0, n, size)]


class Bench:
    """One benchmark run's inputs, checked at construction (before any generation)."""

    def __init__(self, model, tokenizer, case_set: cases_mod.CaseSet, *, embedder=None, judge=None,
                 strengths: Optional[dict] = None, mid_layer=None, max_new_tokens: int = 16,
                 decodings: Sequence[str] = ("greedy", "sampled"), temperature: float = 0.7,
                 mid_cases: Optional[int] = None, mid_decodings: Sequence[str] = ("greedy", "sampled"), mid_solver: Optional[dict] = None,
                 extra_costs: Sequence[float] = (0.25, 0.5, 1.0, 2.0), resamples: int = 2000, seed: int = 0,
                 batch: int = 40):
        from ..models import anatomy, layers

        self.model, self.tokenizer, self.case_set = model, tokenizer, case_set
        n_blocks = len(anatomy.blocks(model))  # ValueError for a model without the expected blocks
        mid = n_blocks // 2 if mid_layer is None else mid_layer
        self.mid = layers.resolve(model, mid, name="mid_layer")
        if self.mid.is_final:
            raise ValueError("mid_layer must be an int state index (the 'final' state is jacobian_final's)")
        grids = dict(DEFAULTS["strengths"] if strengths is None else strengths)
        self.methods = [methods_mod.make_method(name, grid, self.mid.index) for name, grid in grids.items()]
        for name, value in (("max_new_tokens", max_new_tokens), ("mid_cases", 1 if mid_cases is None else mid_cases),
                            ("resamples", resamples), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        bad = [d for d in (*decodings, *mid_decodings) if d not in ("greedy", "sampled")] or \
            ([] if decodings else ["(none)"])
        if bad:
            raise ValueError(f"decodings must be 'greedy' and/or 'sampled', got {bad}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if any(not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0) for c in extra_costs) or not extra_costs:
            raise ValueError(f"extra_costs must be finite numbers >= 0 (nats per token), got {extra_costs!r}")
        self.cases = case_set.cases
        vocab = model.get_output_embeddings().weight.shape[0]
        self.concept_targets = cases_mod.concept_targets(tokenizer, case_set.concepts, vocab)
        self.embedder = embedder or SentenceEmbedder()
        self.judge = judge if judge is not None else model
        self.max_new_tokens, self.decodings, self.temperature = max_new_tokens, tuple(decodings), float(temperature)
        # mid_cases None: every case (the default since the cached Jacobian, steering.cached).
        self.mid_subset = cases_mod.pick(len(self.cases), len(self.cases) if mid_cases is None else mid_cases)
        self.mid_decodings = tuple(d for d in mid_decodings if d in self.decodings)
        self.mid_solver = dict(DEFAULTS["mid_solver"] if mid_solver is None else mid_solver)
        self.extra_costs, self.resamples, self.seed, self.batch = tuple(extra_costs), resamples, seed, batch

    # ------------------------------------------------------------------------------------ generation

    def _jobs(self):
        for decoding in self.decodings:
            for method in self.methods:
                if method.name == "jacobian_mid" and decoding not in self.mid_decodings:
                    continue
                rows = self.mid_subset if method.name == "jacobian_mid" else list(range(len(self.cases)))
                for strength in method.strengths:
                    yield decoding, method, strength, rows

    def _similarity(self, texts: list[str], concept_rows: list[int]) -> np.ndarray:
        emb = self.embedder.encode(texts)
        return (emb * self.concept_emb[concept_rows]).sum(-1).double().numpy()

    def _score(self, run: GenerationResult, site=None) -> torch.Tensor:
        """Fluency cost ``[B]``: the mean surprisal of each continuation under the judge (unhooked). ``site``:
        where the method acted ("logits", "final", an int, or None for natural text)."""
        if self.judge is self.model and site in (None, "logits", "final"):
            # Nothing inside the model was edited (no cached state changed), so the unsteered logits of each
            # step are those of the recorded pre-δ final states: no second forward pass (half of a job's cost).
            return final_state_cost(self.model, run)
        return torch.log(continuation_perplexity(self.judge, run))

    def _decode_kw(self, decoding: str) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=decoding == "sampled",
                    temperature=self.temperature, seed=self.seed)

    def run(self, progress: bool = True, checkpoint: Optional[Path] = None) -> dict:
        """Generate and score everything: the rows of the report, the contrast directions and the time taken
        (see :func:`build_report`). With ``checkpoint``, the rows so far are written there (JSON) after
        every generation, so that a long run that is stopped keeps what it computed."""
        from tqdm.auto import tqdm

        start, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        self.concept_emb = self.embedder.encode([c.concept for c in self.case_set.concepts])
        directions = methods_mod.contrast_directions(self.model, self.tokenizer, self.case_set.concepts, self.mid)
        rows = []
        jobs = list(self._jobs())
        bar = tqdm(total=len(self.decodings) + len(jobs), desc="steer-bench", disable=not progress)
        for decoding in self.decodings:
            bar.set_postfix_str(f"{decoding} natural")
            nat = steered_generate(self.model, self.tokenizer, list(self.case_set.prompts),
                                   **self._decode_kw(decoding))
            cost = self._score(nat)
            sims = (self.embedder.encode(nat.texts) @ self.concept_emb.T).double().numpy()  # [prompts, concepts]
            for case in self.cases:
                p = case.prompt_index
                rows.append(dict(self._ids(case, decoding, "natural", 0.0), continuation=nat.texts[p],
                                 **row_figures(nat, p, float(sims[p, case.concept_index]), float(cost[p]),
                                               steered=False, solver=False, state_edit=False)))
            bar.update()
        for decoding, method, strength, subset in jobs:
            bar.set_postfix_str(f"{decoding} {method.name} {strength:g}")
            rows += self._method_rows(decoding, method, strength, subset, directions)
            if checkpoint is not None:
                checkpoint.write_text(json.dumps(rows))
            bar.update()
        bar.close()
        return dict(rows=rows, directions=directions, seconds=time.perf_counter() - start,
                    cpu_seconds=time.process_time() - cpu, threads=torch.get_num_threads(),
                    load_average=[load, os.getloadavg()[0]], cpu_count=os.cpu_count())

    def _ids(self, case: cases_mod.Case, decoding: str, method: str, strength: float) -> dict:
        return dict(case=case.index, prompt_index=case.prompt_index, concept=case.concept.name, decoding=decoding,
                    method=method, strength=strength)

    def _method_rows(self, decoding, method, strength, subset, directions) -> list[dict]:
        cases = [self.cases[i] for i in subset]
        kind = method.name
        dirs = directions.get(kind)

        def one(sl: slice):
            part = cases[sl]
            run = methods_mod.generate(
                self.model, self.tokenizer, method, strength, [c.prompt for c in part],
                [self.concept_targets[c.concept_index] for c in part],
                None if dirs is None else dirs[[c.concept_index for c in part]],
                solver_options=self.mid_solver if kind == "jacobian_mid" else None, **self._decode_kw(decoding))
            return part, run, self._score(run, method.layer)

        out = []
        for part, run, cost in _batched(one, len(cases), self.batch):
            sims = self._similarity(run.texts, [c.concept_index for c in part])
            for j, case in enumerate(part):
                out.append(dict(self._ids(case, decoding, kind, strength), continuation=run.texts[j],
                                **row_figures(run, j, float(sims[j]), float(cost[j]), steered=True,
                                              solver=kind.startswith("jacobian"), state_edit=kind != "logit_bias")))
        return out


# ---------------------------------------------------------------------------------------- analysis


def curves(rows: list[dict], method: str, strengths: Sequence[float], decoding: str, subset: Sequence[int]):
    """Per-case curve points ``cost, sim`` ``[n, 1 + K]`` of ``method`` on the cases ``subset`` (column 0 the
    natural continuation), from the report rows."""
    index = {(r["case"], r["decoding"], r["method"], r["strength"]): r for r in rows}
    cost = np.array([[index[(c, decoding, "natural", 0.0)]["cost"]] +
                     [index[(c, decoding, method, s)]["cost"] for s in strengths] for c in subset])
    sim = np.array([[index[(c, decoding, "natural", 0.0)]["similarity"]] +
                    [index[(c, decoding, method, s)]["similarity"] for s in strengths] for c in subset])
    return cost, sim


def analyse(bench: Bench, rows: list[dict]) -> dict:
    """Mean curves and the paired-bootstrap comparisons of :data:`COMPARISONS`, per decoding."""
    by_name = {m.name: m for m in bench.methods}
    all_cases = list(range(len(bench.cases)))
    out = {}
    for decoding in bench.decodings:
        entry = {"curves": {}, "comparisons": [], "gains": []}
        for m in bench.methods:
            if m.name == "jacobian_mid" and decoding not in bench.mid_decodings:
                continue
            subset = bench.mid_subset if m.name == "jacobian_mid" else all_cases
            cost, sim = curves(rows, m.name, m.strengths, decoding, subset)
            entry["curves"][m.name] = dict(strengths=[0.0, *m.strengths], cases=len(subset),
                                           cost=cost.mean(0).tolist(), similarity=sim.mean(0).tolist())
            gain = stats.matched_difference(cost, sim, cost[:, :1], sim[:, :1], cost[:, 0], bench.extra_costs,
                                            resamples=bench.resamples, seed=bench.seed)
            entry["gains"].append(dict(method=m.name, cases=len(subset), budgets=gain))
        for a, b in COMPARISONS:
            if a not in entry["curves"] or b not in entry["curves"]:
                continue
            subset = bench.mid_subset if "jacobian_mid" in (a, b) else all_cases
            ca, sa = curves(rows, a, by_name[a].strengths, decoding, subset)
            cb, sb = curves(rows, b, by_name[b].strengths, decoding, subset)
            budgets = stats.matched_difference(ca, sa, cb, sb, ca[:, 0], bench.extra_costs,
                                               resamples=bench.resamples, seed=bench.seed)
            calls = [stats.call(x["low"], x["high"]) for x in budgets]
            for x, c in zip(budgets, calls):
                x["call"] = c
            entry["comparisons"].append(dict(a=a, b=b, cases=len(subset), budgets=budgets,
                                             verdict=stats.verdict(calls)))
        out[decoding] = entry
    return out


def build_report(bench: Bench, result: dict, config: dict) -> dict:
    """The JSON-ready report: ``config``, ``prompts`` (the cases), ``methods`` (name, layer, strengths, unit,
    the cases it ran on), ``rows`` (per case, decoding, method and strength), ``analysis``, ``directions``
    (the raw ActAdd/CAA difference norms next to the state norm, per concept)."""
    d = result["directions"]
    methods = [dict(name=m.name, layer=m.layer, strengths=list(m.strengths), unit=m.unit,
                    cases=bench.mid_subset if m.name == "jacobian_mid" and len(bench.mid_subset) < len(bench.cases)
                    else "all",
                    decodings=list(bench.mid_decodings if m.name == "jacobian_mid" else bench.decodings))
               for m in bench.methods]
    prompts = [dict(case=c.index, prompt=c.prompt, concept=c.concept.name, concept_sentence=c.concept.concept,
                    words=list(c.concept.words), pairs=[list(p) for p in c.concept.pairs]) for c in bench.cases]
    directions = [dict(concept=c.name, actadd_norm=float(d["actadd"][i].norm()), caa_norm=float(d["caa"][i].norm()),
                       state_norm=float(d["state_norm"][i]))
                  for i, c in enumerate(bench.case_set.concepts)]
    config = dict(config, seconds=result["seconds"], cpu_seconds=result["cpu_seconds"], threads=result["threads"],
                  load_average=result["load_average"], cpu_count=result["cpu_count"],
                  mid_layer=bench.mid.index, num_blocks=bench.mid.num_blocks,
                  max_new_tokens=bench.max_new_tokens, decodings=list(bench.decodings),
                  temperature=bench.temperature, seed=bench.seed, extra_costs=list(bench.extra_costs),
                  resamples=bench.resamples, mid_solver=bench.mid_solver, cases=len(bench.cases),
                  prompts=len(bench.case_set.prompts), concepts=len(bench.case_set.concepts))
    return dict(config=config, prompts=prompts, methods=methods, rows=result["rows"],
                analysis=analyse(bench, result["rows"]), directions=directions)


__all__ = ["DEFAULTS", "QUICK", "QUICK_CASES", "COMPARISONS", "FIGURES", "Bench", "row_figures", "curves", "analyse",
           "build_report"]
