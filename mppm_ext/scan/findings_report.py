"""The findings report from a findings scan directory: bootstrap intervals (:mod:`.intervals`) on every
statistic, verdicts computed from the intervals, sentences generated from the numbers.

A verdict is "yes" when the whole 95% interval of the tested difference lies on the "yes" side of its
threshold, "no" when it lies on the other side, and "undecided" when the interval straddles it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import intervals as I
from .output import read_csv, read_tokens

#: Seed of the bootstrap (a corpus's count matrix also depends on its position and window count).
SEED = 20260
#: The paper's figures (trained: log-kinetic about 7, potential 0.2-2.5; random: potential 6-8).
PAPER_LOG_K = 7.0
PAPER_POTENTIAL = {"trained": (0.2, 2.5), "random": (6.0, 8.0)}
#: "Far below": std(log E) under this fraction of sqrt(std^2(log K) + std^2(s)), the figure log K and s
#: independent would give. 0.5 means three quarters of the parts' variance cancel.
FAR_BELOW = 0.5
#: CV(A) "is CV(K)" when their ratio's interval lies within 1 +- CLOSE.
CLOSE = 0.10
#: A pooled CV(K) above this at the middle layer gets the "which positions dominate" sentence.
LARGE_CV = 2.0
ALL = "all corpora"
BASE, TOKEN_MEAN, TOKEN_MEAN_SEEN, DROP = "base", "token_mean", "token_mean_seen", "drop_first"


@dataclass
class Run:
    """Every statistic of a findings scan: ``stats[(scope, model, variant, pairing)]`` -> statistic ->
    [replicates + 1]; scope is a corpus or ALL; variant a scan variant, DROP (base without the first
    positions) or TOKEN_MEAN_SEEN (the token-mean control at positions whose two tokens have a mean)."""

    corpora: list[str]
    models: list[str]
    info: dict[str, dict]
    summary: dict[str, list[dict]]
    meta: dict[str, dict]
    run: dict
    stats: dict = field(default_factory=dict)
    dominance: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)

    def get(self, model: str, name: str, variant: str = BASE, scope: str = ALL, pairing: str = "same"):
        return self.stats.get((scope, model, variant, pairing), {}).get(name)

    def trained(self, model: str) -> bool:
        return str(self.info[model]["trained"]) == "True"


def load(scan_root: Path, replicates: int = I.REPLICATES) -> Run:
    """Read every corpus's scan directory under ``scan_root`` and compute the statistics."""
    run_file = scan_root / "findings_run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    corpora = run.get("corpora") or sorted(p.name for p in scan_root.iterdir() if (p / "summary.csv").exists())
    if not corpora:
        raise FileNotFoundError(f"{scan_root} holds no corpus scan directory (<corpus>/summary.csv)")
    summary = {c: read_csv(scan_root / c / "summary.csv") for c in corpora}
    meta = {c: json.loads((scan_root / c / "metadata.json").read_text()) for c in corpora}
    models = list(dict.fromkeys(r["model"] for c in corpora for r in summary[c]))
    info = {r["model"]: r for c in corpora for r in summary[c]}
    out = Run(corpora, models, info, summary, meta, run)
    parts: dict[tuple, list] = {}
    for ci, corpus in enumerate(corpora):
        groups = I.groups(read_tokens(scan_root / corpus))
        heldout = run.get("heldout_tokens", {}).get(corpus, {})
        for (model, variant), g in groups.items():
            c = I.counts(g.log_prob.shape[0], replicates, (SEED, ci, g.log_prob.shape[0]))
            todo = [(variant, "same", g, False)]
            if variant == BASE:
                todo += [(BASE, "shifted", g.shifted(), False), (DROP, "same", g, True)]
                out.dominance[(corpus, model)] = I.dominance(g)
            if variant == "layer_mid":
                out.dominance[(corpus, model, "layer_mid")] = I.dominance(g)
            if variant == TOKEN_MEAN and model in heldout:
                mask = I.coverage_mask(g, heldout[model])
                out.coverage[(corpus, model)] = float(mask[g.used()].mean())
                todo.append((TOKEN_MEAN_SEEN, "same", I.restricted(g, mask), False))
            for name, pairing, grp, drop in todo:
                out.stats[(corpus, model, name, pairing)] = I.statistics([(grp, c)], drop_first=drop)
                parts.setdefault((model, name, pairing, drop), []).append((grp, c))
    for (model, name, pairing, drop), p in parts.items():
        out.stats[(ALL, model, name, pairing)] = I.statistics(p, drop_first=drop)
    return out


# ----------------------------------------------------------------------------------------------- formatting

def fmt(x: float, digits: int = 3) -> str:
    """A number for the report: 3 significant digits, no exponent below 1e5, 'n/a' for NaN."""
    if x is None or not math.isfinite(x):
        return "n/a" if x is None or math.isnan(x) else ("∞" if x > 0 else "−∞")
    text = f"{x:.2e}" if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3) else f"{x:.{digits}g}"
    return text.replace("-", "−")


def ci(values: Optional[np.ndarray], digits: int = 3) -> str:
    """'point [low, high]'."""
    if values is None:
        return "n/a"
    point, lo, hi = I.interval(values)
    return f"{fmt(point, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def verdict(values: np.ndarray, threshold: float = 0.0) -> str:
    """'yes' when the interval of ``values`` lies below ``threshold``, 'no' above, else 'undecided'."""
    _, lo, hi = I.interval(values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    return "yes" if hi < threshold else ("no" if lo > threshold else "undecided")


def _count(labels: Sequence[str]) -> str:
    return ", ".join(f"{labels.count(v)} {v}" for v in ("yes", "no", "undecided", "undefined") if labels.count(v))


def _models(models: Sequence[str], kind: str) -> str:
    """'the 1 trained model' / 'the 6 random-weight models'."""
    return f"the {len(models)} {kind} model{'' if len(models) == 1 else 's'}"


def _median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.median(xs)) if xs else math.nan


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _point(r: Run, model: str, name: str, **kw) -> float:
    v = r.get(model, name, **kw)
    return float(v[0]) if v is not None else math.nan


def _cv_cell(r: Run, model: str, name: str, agg: str = "seq", **kw) -> str:
    st = r.stats.get((kw.get("scope", ALL), model, kw.get("variant", BASE), kw.get("pairing", "same")))
    if st is None:
        return "n/a"
    if not I.cv_defined(st, name, agg):
        return "undefined"
    return ci(st[f"{agg}_cv_{name}"])


# ------------------------------------------------------------------------------------------------ sections

def _conserved(r: Run, model: str, agg: str = "seq", scope: str = ALL, variant: str = BASE) -> str:
    """CV(E) below both CV(K) and CV(PPL), over the whole interval of the margin."""
    m = r.get(model, f"{agg}_margin", variant=variant, scope=scope)
    return verdict(m) if m is not None else "n/a"


def _far_below(r: Run, model: str, agg: str = "seq") -> str:
    return verdict(r.get(model, f"{agg}_std_ratio") - FAR_BELOW)


def _kind(r: Run, model: str) -> str:
    return "trained" if r.trained(model) else "random"


def _tokens_of(model: str) -> str:
    if not model.startswith("random:"):
        return "own"
    reader = model.partition("@")[2]
    return reader if reader else "bytes"


def main_table(r: Run, scope: str = ALL) -> str:
    head = ("model", "kind", "tokens read", "windows", "mean s", "mean log K", "CV(E)", "CV(K)", "CV(PPL)",
            "CV(E) − min(CV(K), CV(PPL))", "E conserved?", "std(log E)", "√(std²(log K)+std²(s))", "ratio",
            "log E far below?", "corr(log K, s)",
            "CV(ℓ)")
    rows = []
    for m in r.models:
        if (scope, m, BASE, "same") not in r.stats:
            continue
        g = lambda name: r.get(m, name, scope=scope)  # noqa: E731
        indep = np.sqrt(g("seq_std_log_kinetic") ** 2 + g("seq_std_surprisal") ** 2)
        rows.append([m, _kind(r, m), _tokens_of(m), str(int(g("windows")[0])), ci(g("seq_mean_surprisal")),
                     ci(g("seq_mean_log_kinetic")), _cv_cell(r, m, "energy", scope=scope),
                     _cv_cell(r, m, "kinetic", scope=scope), _cv_cell(r, m, "ppl", scope=scope),
                     ci(g("seq_margin")), _conserved(r, m, scope=scope), ci(g("seq_std_log_energy")), ci(indep),
                     ci(g("seq_std_ratio")),
                     verdict(g("seq_std_ratio") - FAR_BELOW), ci(g("seq_corr"), 2),
                     _cv_cell(r, m, "log_lagrangian", scope=scope)])
    return _table(head, rows)


def pooled_table(r: Run) -> str:
    head = ("model", "kind", "positions", "pooled CV(E)", "pooled CV(K)", "pooled CV(PPL)", "E conserved (pooled)?",
            "pooled std ratio", "pooled corr(log K, s)", "pooled CV(A)", "pooled CV(ℓ)")
    rows = []
    for m in r.models:
        g = lambda name: r.get(m, name)  # noqa: E731
        rows.append([m, _kind(r, m), str(int(g("positions")[0])), ci(g("pooled_cv_energy")), ci(g("pooled_cv_kinetic")),
                     ci(g("pooled_cv_ppl")), _conserved(r, m, "pooled"), ci(g("pooled_std_ratio")),
                     ci(g("pooled_corr"), 2), _cv_cell(r, m, "additive_energy", "pooled"),
                     _cv_cell(r, m, "log_lagrangian", "pooled")])
    return _table(head, rows)


def sample_size_note(r: Run) -> str:
    """How the pooled CV(E) of each model moves from one corpus's positions to all corpora's."""
    parts, grows = [], []
    for m in r.models:
        single = [_point(r, m, "pooled_cv_energy", scope=c) for c in r.corpora if (c, m, BASE, "same") in r.stats]
        if len(single) < 2:
            continue
        if _point(r, m, "pooled_cv_energy") > max(single):
            grows.append(m)
        parts.append(f"{m}: {fmt(_median(single))} on one corpus (median; {fmt(min(single))} – {fmt(max(single))}), "
                     f"{fmt(_point(r, m, 'pooled_cv_energy'))} on all {len(single)} together, against a per-window "
                     f"CV(E) of {fmt(_point(r, m, 'seq_cv_energy'))}")
    if not parts:
        return ""
    return ("Pooled CV(E) by sample: " + "; ".join(parts) + f". For {len(grows)} of {len(parts)} models"
            + (f" ({', '.join(grows)})" if grows else "") + " the figure on all corpora exceeds every single corpus's: "
            "there it grows with the number of positions (a heavy tail meets more extreme values), so it describes "
            "the sample, not the model.")


def corpus_table(r: Run, corpus: str) -> str:
    head = ("model", "windows", "CV(E)", "CV(K)", "CV(PPL)", "E conserved?", "std ratio", "corr(log K, s)")
    rows = []
    for m in r.models:
        g = lambda name: r.get(m, name, scope=corpus)  # noqa: E731
        if g("windows") is None:
            continue
        rows.append([m, str(int(g("windows")[0])), _cv_cell(r, m, "energy", scope=corpus),
                     _cv_cell(r, m, "kinetic", scope=corpus), _cv_cell(r, m, "ppl", scope=corpus),
                     _conserved(r, m, scope=corpus), ci(g("seq_std_ratio")), ci(g("seq_corr"), 2)])
    return _table(head, rows)


def answer_conservation(r: Run) -> str:
    seq = [_conserved(r, m) for m in r.models]
    pooled = [_conserved(r, m, "pooled") for m in r.models]
    far = [_far_below(r, m) for m in r.models]
    per_corpus = [_conserved(r, m, scope=c) for c in r.corpora for m in r.models
                  if (c, m, BASE, "same") in r.stats]
    lo = min(I.interval(r.get(m, "seq_corr"))[1] for m in r.models)
    hi = max(I.interval(r.get(m, "seq_corr"))[2] for m in r.models)
    overall = "Yes" if set(seq) == {"yes"} else ("No" if set(seq) == {"no"} else "Not for every model")
    text = (f"**{overall}.** Per window (the headline), CV(E) lies below both CV(K) and CV(PPL) over the whole "
            f"interval for {seq.count('yes')} of {len(seq)} models; the interval says no for {seq.count('no')} and "
            f"is undecided for {seq.count('undecided')}. On the pooled positions: {_count(pooled)}. Per corpus "
            f"and model ({len(per_corpus)} pairs): {_count(per_corpus)}. ")
    text += (f"Offset-free, std(log E) would be far below √(std²(log K) + std²(s)) (ratio under {FAR_BELOW}, the "
             f"whole interval) if log K and s traded off; it is for {far.count('yes')} of {len(far)} models "
             f"({_count(far)}). That needs corr(log K, s) near −1; its per-window intervals together span "
             f"{fmt(lo, 2)} to {fmt(hi, 2)}.")
    return text


def answer_additive(r: Run) -> str:
    parts, same = [], []
    for m in r.models:
        st = r.stats[(ALL, m, BASE, "same")]
        if not I.cv_defined(st, "additive_energy", "pooled"):
            parts.append(f"{m}: CV(A) undefined (|mean A| = {fmt(abs(st['pooled_mean_additive_energy'][0]))} against "
                         f"std {fmt(st['pooled_std_additive_energy'][0])})")
            same.append("undefined")
            continue
        ratio = st["pooled_cv_additive_energy"] / st["pooled_cv_kinetic"]
        _, lo, hi = I.interval(ratio)
        label = "yes" if 1 - CLOSE <= lo and hi <= 1 + CLOSE else ("no" if hi < 1 - CLOSE or lo > 1 + CLOSE
                                                                    else "undecided")
        same.append(label)
        share = abs(st["pooled_mean_additive_energy"][0] - st["pooled_mean_kinetic"][0]) / st["pooled_mean_kinetic"][0]
        parts.append(f"{m}: CV(A)/CV(K) = {ci(ratio)}, |mean log p| / mean K = {fmt(share)}")
    return (f"CV(A) equals CV(K) within ±{int(CLOSE * 100)}% (whole interval) for {same.count('yes')} of "
            f"{len(same)} models ({_count(same)}): where |log p| is small next to K, A = K + log p is K plus a "
            "near-constant and its CV is K's own, which says nothing about K and the perplexity trading off. "
            "Per model (pooled positions): " + "; ".join(parts) + ".")


def _group(r: Run, trained: bool, byte_level: bool = False) -> list[str]:
    return [m for m in r.models if r.trained(m) == trained and (trained or (_tokens_of(m) == "bytes") == byte_level)]


def answer_log_additive(r: Run) -> str:
    trained, random = _group(r, True), _group(r, False)
    if not trained or not random:
        return "**Cannot say from this run:** it needs trained and random-weight models on the same tokens."

    def per(models, name):
        return "; ".join(f"{m} {ci(r.get(m, name))}" for m in models)

    cv_t = [_point(r, m, "seq_cv_log_lagrangian") for m in trained]
    cv_r = [_point(r, m, "seq_cv_log_lagrangian") for m in random]
    lo_t = min(I.interval(r.get(m, "seq_cv_log_lagrangian"))[1] for m in trained)
    hi_r = max(I.interval(r.get(m, "seq_cv_log_lagrangian"))[2] for m in random)
    reproduces = hi_r < lo_t
    std_t = [I.interval(r.get(m, "seq_std_log_lagrangian")) for m in trained]
    std_r = [I.interval(r.get(m, "seq_std_log_lagrangian")) for m in random]
    offset_free = max(x[2] for x in std_r) < min(x[1] for x in std_t)
    pinned = _median([_point(r, m, "seq_mean_surprisal") / float(r.info[m]["log_vocab"]) for m in random])
    cvs_t = _median([_point(r, m, "seq_cv_surprisal") for m in trained])
    cvs_r = _median([_point(r, m, "seq_cv_surprisal") for m in random])
    mean_t = _median([abs(_point(r, m, "seq_mean_log_lagrangian")) for m in trained])
    mean_r = _median([abs(_point(r, m, "seq_mean_log_lagrangian")) for m in random])
    undefined = [m for m in r.models if not I.cv_defined(r.stats[(ALL, m, BASE, "same")], "log_lagrangian")]
    text = (f"ℓ = log K − s = log K + log p is the sum the paper's \"K ≈ 7\" (a log K) suggests. "
            + (f"By this report's rule CV(ℓ) is undefined for {', '.join(undefined)} (|mean ℓ| below half its std); "
               "the figures below are the would-be CVs. " if undefined else "")
            + "Its per-window CV is "
            f"{fmt(_median(cv_t))} (median) for {_models(trained, 'trained')} and {fmt(_median(cv_r))} for "
            f"{_models(random, 'random-weight')}; "
            + ("every random model's interval lies below every trained model's, so **this reading reproduces the "
               "paper's \"random models conserve more tightly\"**. " if reproduces else
               "the intervals overlap, so this reading does **not** clearly reproduce \"random models conserve more "
               "tightly\". ")
            + f"Why: random models' surprisal is pinned near log V (mean s is {fmt(100 * pinned)}% of log V, median; "
              f"per-window CV(s) {fmt(cvs_r)} against {fmt(cvs_t)} for trained models), and their |mean ℓ| is "
              f"{fmt(mean_r)} against {fmt(mean_t)} (medians), so the same spread sits on a larger offset. "
              "The offset-free comparison is the spread itself, std(ℓ) per window: trained "
            + per(trained, "seq_std_log_lagrangian") + "; random " + per(random, "seq_std_log_lagrangian") + ". "
            + ("Random models' std(ℓ) is lower over the whole intervals, so they are steadier even without the "
               "offset; but std(ℓ) is no conservation either: for independent parts it is √(std²(log K) + "
               "std²(s)), see the offset-free columns of the table."
               if offset_free else
               "Their intervals do not all separate: without the offset the random models are not clearly steadier, "
               "so the lower CV(ℓ) comes from the larger |mean ℓ|."))
    return text


def answer_random(r: Run) -> str:
    trained, random = _group(r, True), _group(r, False)
    if not trained or not random:
        return ("**Cannot say from this run:** it needs both trained and random-weight models "
                f"(trained: {len(trained)}, random: {len(random)}; install the trained ones with `mppm setup`).")
    hi_r = max(I.interval(r.get(m, "seq_cv_energy"))[2] for m in random)
    lo_t = min(I.interval(r.get(m, "seq_cv_energy"))[1] for m in trained)
    tighter = "Yes" if hi_r < lo_t else "Undecided"
    ppl_vs_k = [verdict(r.get(m, "seq_cv_ppl") - r.get(m, "seq_cv_kinetic")) for m in random]
    text = (f"**{tighter}** for CV(E): per window it is {fmt(_median([_point(r, m, 'seq_cv_energy') for m in random]))}"
            f" (median) for {_models(random, 'random-weight')} on SmolLM2's tokens against "
            f"{fmt(_median([_point(r, m, 'seq_cv_energy') for m in trained]))} for {_models(trained, 'trained')}"
            + (", every random interval below every trained one. " if hi_r < lo_t else
               "; the intervals overlap. "))
    text += ("Which factor carries E's spread in random models? CV(PPL) is below CV(K) (whole interval) for "
             f"{ppl_vs_k.count('yes')} of {len(random)} of them ({_count(ppl_vs_k)}); per window CV(PPL) is "
             + "; ".join(f"{m} {ci(r.get(m, 'seq_cv_ppl'))} against CV(K) {ci(r.get(m, 'seq_cv_kinetic'))}"
                         for m in random)
             + ". So the perplexity factor is "
             + ("the smaller part of E's spread, but not constant." if ppl_vs_k.count("yes") == len(random) else
                "not nearly constant: for the models where CV(PPL) is not below CV(K), it carries at least as much "
                "of E's spread as K does."))
    return text


def answer_paper(r: Run) -> str:
    head = ("figure", "paper", *[f"{k} (ours)" for k in ("trained", "random")], "inside the paper's range?")
    groups = {"trained": _group(r, True), "random": _group(r, False)}

    def span(models, fn):
        vals = [fn(m) for m in models]
        return (min(v[1] for v in vals), max(v[2] for v in vals)) if vals else (math.nan, math.nan)

    def inside(lohi, rng):
        lo, hi = lohi
        return "yes" if rng[0] <= lo and hi <= rng[1] else ("no" if hi < rng[0] or lo > rng[1] else "partly")

    rows = []
    lk = {k: span(v, lambda m: I.interval(r.get(m, "seq_mean_log_kinetic"))) for k, v in groups.items()}
    rows.append(["mean log K (trained)", f"≈ {fmt(PAPER_LOG_K)}", f"{fmt(lk['trained'][0])} – {fmt(lk['trained'][1])}",
                 f"{fmt(lk['random'][0])} – {fmt(lk['random'][1])}",
                 inside(lk["trained"], (PAPER_LOG_K - 1, PAPER_LOG_K + 1)) + " (trained, within ±1)"])
    candidates = [
        ("mean surprisal s, nats", lambda m, v=BASE: I.interval(r.get(m, "pooled_mean_surprisal", variant=v))),
        ("per-window log PPL (mean over windows)", lambda m, v=BASE: I.interval(r.get(m, "seq_mean_surprisal", variant=v))),
        (f"mean s without t ≤ {I.DROP_FIRST}", lambda m: I.interval(r.get(m, "pooled_mean_surprisal", variant=DROP))),
        ("mean s, bits", lambda m: tuple(x / math.log(2) for x in I.interval(r.get(m, "pooled_mean_surprisal")))),
        ("median s (pooled; range over corpora, no bootstrap)", lambda m: _median_s(r, m)),
    ]
    entropy = [m for m in r.models if r.get(m, "pooled_mean_entropy") is not None]
    if entropy:
        candidates.append(("predictive entropy H, nats (mean)",
                           lambda m: I.interval(r.get(m, "pooled_mean_entropy"))))
    matches = []
    for label, fn in candidates:
        sp = {k: span(v, fn) for k, v in groups.items()}
        ok = [inside(sp[k], PAPER_POTENTIAL[k]) for k in ("trained", "random") if groups[k]]
        above = all(sp[k][0] > PAPER_POTENTIAL[k][1] for k in ("trained", "random") if groups[k])
        matches.append((label, ok, above))
        rows.append([f"potential as {label}", "0.2 – 2.5 / 6 – 8", f"{fmt(sp['trained'][0])} – {fmt(sp['trained'][1])}",
                     f"{fmt(sp['random'][0])} – {fmt(sp['random'][1])}", " / ".join(ok)])
    fits = [label for label, ok, _ in matches if all(o == "yes" for o in ok)]
    text = _table(head, rows) + "\n"
    log_k_fits = inside(lk["trained"], (PAPER_LOG_K - 1, PAPER_LOG_K + 1)) == "yes"
    text += (f"log K {'matches' if log_k_fits else 'does not clearly match'} "
             "the paper's ≈ 7 for the trained models. "
             + (f"Of the readings of the potential tested here, {', '.join(fits)} falls inside the paper's ranges for "
                "both kinds of model." if fits else
                "None of the readings of the potential tested here falls inside the paper's ranges for both kinds "
                "of model" + (": every one is larger than the paper's potential, for trained and random models "
                              "alike." if all(a for _, _, a in matches) else "."))
             + (" " + _entropy_potential(r, entropy) if entropy else
                " The potential as the predictive entropy cannot be tested from this scan: it was written before "
                "scans kept the entropy."))
    return text


def _cpu_note(run: dict) -> str:
    """', C CPU-s on N cores, load average a / b / c at its end' where the run recorded them."""
    if "cpu_s" not in run:
        return ""
    one, five, fifteen = run["loadavg"]
    return (f", {run['cpu_s']:.0f} CPU-s on {run['cpus']} cores, load average {one:.1f} / {five:.1f} / "
            f"{fifteen:.1f} (1 / 5 / 15 min) at its end"
            + (" (other jobs shared the cores)" if five > run["cpus"] + 0.5 else ""))


def _entropy_potential(r: Run, models: Sequence[str]) -> str:
    """Whether the energy with the entropy as its potential, K·e^H, is conserved where K·PPL is not."""
    labels = [verdict(r.get(m, "seq_std_ratio_entropy") - FAR_BELOW) for m in models]
    lo = min(I.interval(r.get(m, "seq_std_ratio_entropy"))[1] for m in models)
    hi = max(I.interval(r.get(m, "seq_std_ratio_entropy"))[2] for m in models)
    below = [I.interval(r.get(m, "seq_std_ratio_entropy"))[0] < I.interval(r.get(m, "seq_std_ratio"))[0]
             for m in models]
    held = labels.count("yes")
    return (f"With the entropy as the potential (E_H = K·e^H), per window std(log K + H) / √(std²(log K) + "
            f"std²(H)) spans {fmt(lo)} – {fmt(hi)} over the {len(models)} models' intervals; it is far below 1 "
            f"(< {fmt(FAR_BELOW)}, whole interval) for {held} of them ({_count(labels)}), so this reading "
            + ("conserves the energy for every model" if held == len(models) else
               "conserves it for none" if held == 0 else f"conserves it for {held} of {len(models)} models")
            + f". Its point ratio is below the surprisal reading's for {sum(below)} of {len(models)} models.")


def _median_s(r: Run, m: str) -> tuple[float, float, float]:
    """(median over corpora, lowest, highest) of each corpus's pooled median surprisal (quantiles.csv)."""
    q = [float(x["value"]) for c in r.corpora for x in _quantiles(r, c, m) if x["quantity"] == "surprisal"
         and float(x["quantile"]) == 0.5]
    v = _median(q)
    return v, min(q) if q else math.nan, max(q) if q else math.nan


def _quantiles(r: Run, corpus: str, model: str) -> list[dict]:
    path = r.run.get("_root")
    if path is None:
        return []
    cache = r.run.setdefault("_quantiles", {})
    if corpus not in cache:
        cache[corpus] = read_csv(Path(path) / corpus / "quantiles.csv")
    return [x for x in cache[corpus] if x["model"] == model and x["variant"] == BASE and x["pairing"] == "same"]


def answer_robust(r: Run) -> str:
    rows = []
    for m in r.models:
        d = [r.dominance[(c, m)] for c in r.corpora if (c, m) in r.dominance]
        dm = [r.dominance[(c, m, "layer_mid")] for c in r.corpora if (c, m, "layer_mid") in r.dominance]
        rows.append([m, _cv_cell(r, m, "kinetic"), _cv_cell(r, m, "kinetic", variant=DROP),
                     ci(r.get(m, "seq_rcv_kinetic")), _cv_cell(r, m, "energy"), _cv_cell(r, m, "energy", variant=DROP),
                     ci(r.get(m, "seq_rcv_energy")), _conserved(r, m, variant=DROP),
                     fmt(_median([x["kinetic_share_t1"] for x in d])), fmt(_median([x["kinetic_share_top1pct"] for x in d])),
                     fmt(_median([x["kinetic_share_t1"] for x in dm])) if dm else "n/a",
                     ci(r.get(m, "pooled_cv_kinetic", variant="layer_mid")),
                     ci(r.get(m, "seq_cv_kinetic", variant="layer_mid"))])
    head = ("model", "CV(K)", f"CV(K), t ≤ {I.DROP_FIRST} dropped", "robust CV(K)", "CV(E)",
            f"CV(E), t ≤ {I.DROP_FIRST} dropped", "robust CV(E)", f"E conserved, t ≤ {I.DROP_FIRST} dropped?",
            "share of K's squared deviations at t = 1", "… at the top 1% of positions",
            "mid layer: share at t = 1", "mid layer pooled CV(K)", "mid layer CV(K) per window")
    flips = [m for m in r.models if _conserved(r, m, variant=DROP) != _conserved(r, m)]
    big = [m for m in r.models if r.get(m, "pooled_cv_kinetic", variant="layer_mid") is not None
           and _point(r, m, "pooled_cv_kinetic", variant="layer_mid") > LARGE_CV]
    text = ("Per-window CVs, with the first positions dropped and with the median/MAD spread (robust CV = "
            f"{I.MAD_SCALE}·MAD / |median| per window, averaged over windows). The dominance columns are pooled "
            "point figures per corpus (median over corpora).\n\n" + _table(head, rows) + "\n")
    text += (f"Dropping t ≤ {I.DROP_FIRST} changes the conservation verdict for {len(flips)} of {len(r.models)} models"
             + (f" ({', '.join(flips)})" if flips else "") + ". ")
    for m in big:
        dm = [r.dominance[(c, m, "layer_mid")] for c in r.corpora if (c, m, "layer_mid") in r.dominance]
        text += (f"At the middle layer {m} has pooled CV(K) {fmt(_point(r, m, 'pooled_cv_kinetic', variant='layer_mid'))} "
                 f"while its log K has median {fmt(_median([x['log_kinetic_median'] for x in dm]))} and 99th percentile "
                 f"{fmt(_median([x['log_kinetic_p99'] for x in dm]))} (medians over corpora): the step at t = 1 holds "
                 f"{fmt(100 * _median([x['kinetic_share_t1'] for x in dm]))}% of K's squared deviations, so that CV "
                 "measures the step out of the first (attention-sink) state, not the motion along the text. ")
    return text


def answer_tokenizer(r: Run) -> str:
    byte = _group(r, False, byte_level=True)
    pairs = [(b, f"{b}@{m.partition('@')[2]}") for b in byte for m in r.models if m.startswith(b + "@")]
    if not pairs:
        return "No byte-level control in this run."
    out = []
    for b, s in pairs:
        out.append(f"{b} on bytes: mean s {ci(r.get(b, 'seq_mean_surprisal'))}, mean log K "
                   f"{ci(r.get(b, 'seq_mean_log_kinetic'))}, CV(E) {_cv_cell(r, b, 'energy')}, CV(K) "
                   f"{_cv_cell(r, b, 'kinetic')}; {s}: mean s {ci(r.get(s, 'seq_mean_surprisal'))}, mean log K "
                   f"{ci(r.get(s, 'seq_mean_log_kinetic'))}, CV(E) {_cv_cell(r, s, 'energy')}, CV(K) "
                   f"{_cv_cell(r, s, 'kinetic')}; the conservation verdict is {_conserved(r, b)} on bytes and "
                   f"{_conserved(r, s)} on SmolLM2's tokens")
    return ("The random-weight families now read SmolLM2's tokens (its tokenizer, the vocabulary resized to "
            "match), so they differ from the trained model in their weights only; the byte-level model of the "
            "earlier runs stays as a control. " + "; ".join(out) + ".")


def answer_token_mean(r: Run) -> str:
    lines = {"trained": [], "random": []}
    flips = {"trained": 0, "random": 0}
    factors = {"trained": [], "random": []}
    for m in r.models:
        if r.get(m, "seq_cv_energy", variant=TOKEN_MEAN) is None:
            continue
        k = _kind(r, m)
        factor = math.exp(_point(r, m, "pooled_mean_log_kinetic", variant=TOKEN_MEAN)
                          - _point(r, m, "pooled_mean_log_kinetic"))
        seen_factor = math.exp(_point(r, m, "pooled_mean_log_kinetic", variant=TOKEN_MEAN_SEEN)
                               - _point(r, m, "pooled_mean_log_kinetic"))
        factors[k].append(factor)
        cov = _median([v for (c, mm), v in r.coverage.items() if mm == m])
        flip = _conserved(r, m, variant=TOKEN_MEAN) != _conserved(r, m)
        flips[k] += flip
        lines[k].append(f"{m}: CV(E) {_cv_cell(r, m, 'energy')} → {_cv_cell(r, m, 'energy', variant=TOKEN_MEAN)} "
                        f"(covered positions only: {_cv_cell(r, m, 'energy', variant=TOKEN_MEAN_SEEN)}), corr(log K, s) "
                        f"{ci(r.get(m, 'seq_corr'), 2)} → {ci(r.get(m, 'seq_corr', variant=TOKEN_MEAN), 2)}, typical K × "
                        f"{fmt(factor)} (covered positions: × {fmt(seen_factor)}), coverage {fmt(100 * cov)}%"
                        + (" (the verdict changes)" if flip else ""))
    if not any(lines.values()):
        return "**Not measured in this run** (the token-mean control was off)."
    text = ("The control subtracts b[x_t], the mean state of token x_t over the held-out windows, from h_t. A token "
            "that never occurs there has no mean and gets the overall mean state instead, so K at a position whose "
            "two tokens x_(t−1), x_t are not both covered mixes a token-identity-free step with a raw one. "
            "\"Coverage\" is the share of used positions whose two tokens both have a mean (median over corpora), and "
            "the \"covered positions only\" figures restrict the control to them, which makes it robust to the "
            "fallback. \"Typical K\" is exp(mean log K).\n\n")
    for k in ("trained", "random"):
        if lines[k]:
            text += (f"- {k.capitalize()} models: the verdict changes for {flips[k]} of {len(lines[k])}; typical K "
                     f"factors {fmt(min(factors[k]))} – {fmt(max(factors[k]))}. " + "; ".join(lines[k]) + ".\n")
    return text


def answer_other_controls(r: Run) -> str:
    out = []
    for variant, what in (("shuffled", "shuffling the tokens within each window"),
                          ("pre_norm", "the pre-norm state instead of the post-norm one"),
                          ("layer_mid", "the middle block's state")):
        for kind in ("trained", "random"):
            ms = [m for m in r.models if _kind(r, m) == kind and r.get(m, "seq_cv_energy", variant=variant) is not None]
            if not ms:
                continue
            each = "; ".join(f"{m} ×{fmt(_point(r, m, 'seq_cv_energy', variant=variant) / _point(r, m, 'seq_cv_energy'))}"
                             for m in ms)
            flips = sum(_conserved(r, m, variant=variant) != _conserved(r, m) for m in ms)
            out.append(f"- With {what}, {kind} models' per-window CV(E) changes by a factor of: {each}; the verdict "
                       f"changes for {flips} of {len(ms)}.")
    shifted = [_conserved_pairing(r, m) for m in r.models]
    out.append(f"- With the other pairing (K_t with s_(t−1)), CV(E) is below both parts' CVs (whole interval) for "
               f"{shifted.count('yes')} of {len(shifted)} models ({_count(shifted)}).")
    return "\n".join(out) + "\n"


def _conserved_pairing(r: Run, m: str) -> str:
    v = r.get(m, "seq_margin", pairing="shifted")
    return verdict(v) if v is not None else "n/a"


def timing_table(r: Run) -> str:
    rows = []
    for m in r.models:
        fw = [float(x["forward_ms_per_1k"]) for c in r.corpora for x in r.summary[c]
              if x["model"] == m and x["variant"] == BASE and x["pairing"] == "same"]
        en = [float(x["energy_ms_per_1k"]) for c in r.corpora for x in r.summary[c]
              if x["model"] == m and x["variant"] == BASE and x["pairing"] == "same"]
        wall = sum(float(x.get("wall_s", 0.0)) for c in r.corpora for x in r.meta[c]["models"] if x["label"] == m)
        f, e = _median(fw), _median(en)
        rows.append([m, fmt(f, 4), fmt(e, 4), f"{fmt(100 * e / (f + e), 2)}%", fmt(wall, 3)])
    return _table(("model", "forward ms / 1k tokens", "energy ms / 1k tokens", "energy share", "wall s (all corpora)"),
                  rows)


DEFINITIONS = (
    "K_t = ½‖h_t − h_(t−1)‖² (h: the hidden state, post-norm final layer unless a control says otherwise); "
    "s_t = −log p(x_(t+1) | x_≤t) (surprisal, nats); PPL = e^s; E = K·PPL; log E = log K + s; A = K + log p "
    "(additive); ℓ = log K − s = log K + log p (log-additive). Used positions: log p and K finite and K > 0. "
    "CV = std / |mean| (population std).")


def _identical(r: Run) -> list[tuple[str, str]]:
    """Pairs of models whose base statistics agree in every replicate (the same weights reading the same tokens)."""
    out = []
    for i, a in enumerate(r.models):
        for b in r.models[i + 1:]:
            sa, sb = r.stats[(ALL, a, BASE, "same")], r.stats[(ALL, b, BASE, "same")]
            if all(np.array_equal(sa[k], sb[k], equal_nan=True) for k in ("seq_cv_energy", "pooled_corr", "positions")):
                out.append((a, b))
    return out


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def write(scan_root: Path, report: Path, *, plots: Optional[Path] = None,
          replicates: int = I.REPLICATES) -> Path:
    """Compute the statistics of ``scan_root`` and write ``report`` (and the plots into ``plots``)."""
    r = load(scan_root, replicates)
    r.run["_root"] = str(scan_root)
    meta0 = r.meta[r.corpora[0]]
    args = meta0["args"]
    scanned = sorted({int(x["tokens"]) for c in r.corpora for x in r.summary[c]
                      if x["variant"] == BASE and x["pairing"] == "same"})
    lines = ["# Findings: is the momentum / point-perplexity energy conserved?", ""]
    missing = r.run.get("skipped", []) + r.run.get("missing_corpora", [])
    if missing:
        lines += ["**Not in this run** (not installed on the machine that ran it):", ""]
        lines += [f"- {x.get('model') or 'corpus ' + x['corpus']}: install with `{x['install']}`" for x in missing]
        lines += [""]
    definitions = Path.cwd() / "docs" / "definitions.md"
    link = (f" Definitions: [docs/definitions.md]({_rel(definitions, report.parent)})." if definitions.exists() else "")
    command = r.run.get("command") or "mppm findings"
    elapsed = r.run.get("elapsed_s")
    lines += [
        f"Generated by `{command}`; every number comes from that run's tables and every sentence and verdict is "
        "computed from them by mppm_ext/scan/findings_report.py." + link + " " + DEFINITIONS, "",
        f"**Intervals.** Each figure is followed by its 95% bootstrap interval [low, high]: {I.REPLICATES} replicates "
        "that redraw each corpus's windows with replacement (the window is the unit: positions inside one are not "
        f"independent). A verdict is *yes* when the whole interval of the tested difference is on the yes side, *no* "
        "when it is on the other side, *undecided* otherwise. The headline figures are per window (each window's "
        "CV, averaged over windows). Pooled figures (every position of every window as one sample) are kept, "
        "labelled, below: for heavy-tailed E and PPL they grow with the number of positions, so they describe the "
        f"sample rather than the model. A CV of a quantity that takes both signs (A, ℓ) is *undefined* when it would "
        f"exceed {fmt(I.UNDEFINED_CV)} (|mean| below half the std: the mean is then an offset inside the spread).", "",
        "## Setup", "",
        f"- Corpora: {', '.join(f'`{c}`' for c in r.corpora)}, each scanned separately in windows of {args['window']} "
        f"tokens, **{', '.join(map(str, scanned))} scanned tokens per model and corpus** (max_tokens = "
        f"{args['max_tokens']}), batch {args['batch_size']}, dtype {args['dtype']}, device {meta0['device']}. "
        f"The shuffle control forwards each window a second time, so a model forwards twice the scanned tokens "
        "(plus the held-out windows of the token-mean control).",
        f"- Controls: {', '.join(args['controls'])}; other layers: {', '.join(map(str, args['layers'])) or 'none'}. "
        f"Token-mean held-out split: {meta0['heldout_split'] or 'n/a'}.",
        "- Random-weight models `random:<arch>@smollm2-135m` read SmolLM2's tokens (its tokenizer; vocabulary "
        "resized to its 49,152 entries, so log V is the same); `random:<arch>` without `@` reads UTF-8 bytes "
        "(the earlier runs' set-up, kept as a control); the random twin has the trained model's config and "
        "tokenizer.",
        f"- mppm_ext {meta0['versions'].get('mppm_ext')}, torch {meta0['versions'].get('torch')}, transformers "
        f"{meta0['versions'].get('transformers', 'n/a')}, git {meta0.get('git_sha') or 'unknown'}"
        + (f"; the whole run took {elapsed:.0f} s ({elapsed / 60:.1f} min) wall" if elapsed is not None else "")
        + _cpu_note(r.run) + ".",
    ]
    twins = _identical(r)
    if twins:
        lines.append("- Identical weights: " + "; ".join(f"{a} and {b}" for a, b in twins) + " have the same "
                     "architecture, tokenizer and seed, so their per-token parts and every figure agree exactly; "
                     "both rows are kept.")
    for cp in r.run.get("checkpoints", []):
        if "checkpoint" in cp:
            lines.append(f"- Trained checkpoint {cp['model']}: {cp['checkpoint']}; file `{cp['file']}` from the "
                         f"package {cp['package']}, dequantised to {cp['dtype']}.")
    lines += ["", "## Per model, all corpora (per-window figures)", "",
              "K from the final post-norm state, pairing K_t with s_t. \"E conserved?\": CV(E) below both CV(K) and "
              "CV(PPL), i.e. the margin CV(E) − min(CV(K), CV(PPL)) below 0 over its whole interval. "
              "\"ratio\" = std(log E) / √(std²(log K) + std²(s)): 1 when log K and s are independent, 0 when "
              f"they cancel exactly; \"log E far below?\": ratio below {FAR_BELOW}.", "", main_table(r), "",
              "## Answers", "",
              "**1. Is E conserved (CV(E) below both CV(K) and CV(PPL))?** " + answer_conservation(r), "",
              "**2. Does the additive variant A = K + log p explain the claimed conservation?** " + answer_additive(r), "",
              "**3. The log-additive reading ℓ = log K + log p.** " + answer_log_additive(r), "",
              "**4. Do random models conserve more tightly?** " + answer_random(r), "",
              "**5. The paper's figures against ours.**", "", answer_paper(r), "",
              "**6. Robust variants: which positions dominate.** " + answer_robust(r), "",
              "**7. Random families on a trained tokenizer.** " + answer_tokenizer(r), "",
              "**8. Does subtracting the per-token mean state change the picture?** " + answer_token_mean(r), "",
              "**Other controls.**", "", answer_other_controls(r),
              "## Pooled positions (all corpora)", "",
              "Every used position of every window as one sample. CV(E) and CV(PPL) here depend on how many positions "
              "enter (heavy tails).", "", pooled_table(r), "", sample_size_note(r), ""]
    for c in r.corpora:
        lines += [f"## Corpus `{c}` (per-window figures)", "", corpus_table(r, c), ""]
    lines += ["## Speed: forward pass against the energy", "",
              "The forward pass stops before the unembedding; the energy includes it (energy_from_hidden forms the "
              "logits tile by tile). Medians over corpora.", "", timing_table(r), ""]
    if plots is not None:
        from .findings_plots import write_plots

        written = write_plots(r, Path(plots))
        lines += ["## Plots", ""]
        lines += [f"![{label}]({_rel(path, report.parent)})\n" for label, path in written]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return report
