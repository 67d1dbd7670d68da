"""The files of ``mppm steer-bench``: report.json, report.csv, report.md (every sentence computed from the
numbers) and one PNG of similarity–fluency curves per decoding."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .bench import FIGURES
from .cases import pick

LABELS = {"natural": "natural", "logit_bias": "logit bias", "jacobian_final": "Jacobian (final state)",
          "jacobian_mid": "Jacobian (middle layer)", "actadd": "ActAdd", "caa": "CAA (mean difference)"}
COLORS = {"logit_bias": "tab:orange", "jacobian_final": "tab:blue", "jacobian_mid": "tab:purple",
          "actadd": "tab:green", "caa": "tab:red"}
SHORT_UNITS = {"logit_bias": "b, nats", "jacobian_final": "g, nats", "jacobian_mid": "g, nats",
               "actadd": "s = ||δ||/||h||", "caa": "s = ||δ||/||h||"}
WORDS = {"dominates": "dominates", "loses": "loses to", "matches": "matches", "mixed": "neither dominates nor loses to"}


def strict(x):
    """``x`` with NaN/inf floats as null (strict JSON); NaN marks a figure that does not apply."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    return x


def write(report: dict, out: Path, *, json_too: bool = True) -> list[Path]:
    """Write every file of the report into ``out`` (report.json only with ``json_too``); returns their paths.
    A report read back from report.json (nulls for NaN) renders the same."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.csv", out / "report.md"]
    if json_too:
        paths[0].write_text(json.dumps(strict(report), indent=1, allow_nan=False))
    else:
        paths = paths[1:]
    columns = ["case", "prompt_index", "concept", "decoding", "method", "strength", *FIGURES, "continuation"]
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(report["rows"])
    for decoding in report["analysis"]:
        paths.append(out / f"curves_{decoding}.png")
        plot(report, decoding, paths[-1])
    (out / "report.md").write_text(markdown(report))
    return paths


def _f(x, digits=3) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _signed(x) -> str:
    # round first: -1e-17 (a difference of equal frontiers) prints as +0.000, not -0.000
    return "—" if x is None or not math.isfinite(x) else f"{round(x, 3) + 0.0:+.3f}"


def _ci(x: dict) -> str:
    return f"{_signed(x['difference'])} [{_signed(x['low'])}, {_signed(x['high'])}]"


def _mean(rows, key):
    vals = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
    return sum(vals) / len(vals) if vals else math.nan


def _group(rows, decoding, method, strength, cases=None):
    return [r for r in rows if r["decoding"] == decoding and r["method"] == method and r["strength"] == strength
            and (cases is None or r["case"] in cases)]


def reach(curve: dict) -> float:
    """How far a method's grid goes: the largest mean cost of its strengths above the natural cost (nats)."""
    return max(curve["cost"][1:]) - curve["cost"][0]


def _beyond(c: dict, curves: dict) -> str:
    """Which budgets lie beyond the cost the grids of A or B reach (there the frontier is flat because the
    grid stops, not because the method could not go further)."""
    notes = []
    for name in (c["a"], c["b"]):
        r = reach(curves[name])
        over = [f"+{x['extra_cost']:g}" for x in c["budgets"] if x["extra_cost"] > r]
        if over:
            notes.append(f"{', '.join(over)} nats lie beyond {LABELS[name]}'s grid (its strongest strength costs "
                         f"{_signed(r)} nats)")
    return (" Budgets where the grid, not the method, sets the frontier: " + "; ".join(notes) + ".") if notes else ""


def _comparison_sentence(c: dict, curves: dict) -> str:
    a, b = LABELS[c["a"]], LABELS[c["b"]]
    parts = []
    for x in c["budgets"]:
        parts.append(f"+{x['extra_cost']:g} nats: {x['call']} ({_ci(x)})")
    return (f"**{a} {WORDS[c['verdict']]} {b}** on {c['cases']} cases: frontier similarity difference "
            f"(A − B) at each fluency budget above the natural cost — " + "; ".join(parts) + "." + _beyond(c, curves))


def _example_strength(curve: dict, budget: float) -> float:
    """The strongest strength whose mean cost is within ``budget`` (else the weakest): the examples' strength."""
    ok = [s for s, c in zip(curve["strengths"][1:], curve["cost"][1:]) if c <= budget]
    return ok[-1] if ok else curve["strengths"][1]


def markdown(report: dict) -> str:
    c = report["config"]
    rows = report["rows"]
    lines = [f"# steer-bench: {c['model']}", ""]
    for line in c.get("notes", []):
        lines.append(f"- {line}")
    lines += [f"- {c['cases']} cases ({c['prompts']} prompts × {c['concepts']} concepts), {c['max_new_tokens']} new "
              f"tokens, decodings: {', '.join(c['decodings'])} (sampling at temperature {c['temperature']:g}, seed "
              f"{c['seed']}); middle layer = state {c['mid_layer']} of {c['num_blocks']} blocks (L // 2); "
              f"{c['resamples']} bootstrap resamples; run time {c['seconds'] / 60:.1f} min wall, "
              f"{c['cpu_seconds'] / 60:.1f} CPU-min over {c['threads']} torch thread(s)"
              + (f"; the machine's 1-minute load average was {c['load_average'][0]:.1f} at the start and "
                 f"{c['load_average'][1]:.1f} at the end, on {c['cpu_count']} cores (a load above the run's own threads is other jobs)."
                 if "load_average" in c else "."),
              f"- Command: `{c['command']}`.", "", "## Headline", ""]
    lines += _headline(report)
    lines += ["", "## Methods", "", "| method | acts on | strengths | unit | cases | decodings |", "|---|---|---|---|---|---|"]
    for m in report["methods"]:
        cases = f"{len(m['cases'])} (subset)" if isinstance(m["cases"], list) else f"all {c['cases']}"
        lines.append(f"| {LABELS[m['name']]} | {m['layer']} | {', '.join(f'{s:g}' for s in m['strengths'])} | "
                     f"{m['unit']} | {cases} | {', '.join(m['decodings'])} |")
    mid = next((m for m in report["methods"] if m["name"] == "jacobian_mid"), None)
    if mid is not None:
        where = (f"ran on cases {mid['cases']} only; its comparisons are paired on those cases alone"
                 if isinstance(mid["cases"], list) else "ran on every case")
        lines += ["", f"Jacobian (middle layer) {where}. Its solver: {c['mid_solver']['newton_steps']} Gauss-Newton "
                      f"steps at most per generated token (a row stops early once every target's gain is within "
                      f"{c['mid_solver']['gain_tol']:g} nats of the asked one), the Jacobian through the remaining "
                      "blocks at the steered position against the KV cache of the earlier positions; the converged "
                      "column says how often the asked gain was reached."]
    for decoding, entry in report["analysis"].items():
        lines += ["", f"## {decoding.capitalize()} decoding", "",
                  f"![curves](curves_{decoding}.png)", "", "### Verdicts (Jacobian steering against each baseline)", ""]
        lines += [f"- {_comparison_sentence(x, entry['curves'])}" for x in entry["comparisons"]]
        lines += ["", "### Gain over the natural continuation at each fluency budget", "",
                  "| method | cases | " + " | ".join(f"+{e:g} nats" for e in c["extra_costs"]) + " |",
                  "|---|---:|" + "---:|" * len(c["extra_costs"])]
        for g in entry["gains"]:
            lines.append(f"| {LABELS[g['method']]} | {g['cases']} | " + " | ".join(_ci(x) for x in g["budgets"]) + " |")
        lines += ["", "### Per strength (means over the method's cases)", "",
                  "| method | strength | similarity | cost (nats/token) | distinct-2 | feasible | converged | "
                  "‖δ‖/‖h‖ | CV log E | CV log K | CV s |", "|---|---:|" + "---:|" * 9]
        for name, curve in entry["curves"].items():
            subset = None if curve["cases"] == c["cases"] else set(mid["cases"])
            for k, s in enumerate(curve["strengths"]):
                g = _group(rows, decoding, "natural" if k == 0 else name, s, subset)
                lines.append(f"| {LABELS['natural' if k == 0 else name]} | {s:g} | {_f(curve['similarity'][k])} | "
                             f"{_f(curve['cost'][k])} | {_f(_mean(g, 'distinct_2'))} | {_f(_mean(g, 'feasible_steps'), 2)} | "
                             f"{_f(_mean(g, 'converged_steps'), 2)} | {_f(_mean(g, 'relative_delta_norm'))} | "
                             f"{_f(_mean(g, 'cv_log_energy'))} | {_f(_mean(g, 'cv_log_kinetic'))} | "
                             f"{_f(_mean(g, 'cv_surprisal'))} |")
        lines += ["", _energy_sentence(rows, decoding)]
    lines += _examples(report)
    lines += ["", "## How to read this", "", *_reading(report)]
    return "\n".join(lines) + "\n"


def _headline(report: dict) -> list[str]:
    """One line per comparison and decoding: the verdict, and the budgets where A is higher or lower."""
    out = []
    for decoding, entry in report["analysis"].items():
        for x in entry["comparisons"]:
            where = {k: [f"+{b['extra_cost']:g}" for b in x["budgets"] if b["call"] == k] for k in ("higher", "lower")}
            detail = "; ".join(f"{k} at {', '.join(v)} nats" for k, v in where.items() if v) or \
                "no budget separates them"
            few = f" (only {x['cases']} cases: a first look, not a test)" if x["cases"] < 10 else ""
            inside = [b for b in x["budgets"] if b["extra_cost"] <= min(reach(entry["curves"][x["a"]]),
                                                                           reach(entry["curves"][x["b"]]))]
            within = ("; within both grids: " + ", ".join(f"+{b['extra_cost']:g} nats {b['call']} ({_ci(b)})"
                                                          for b in inside)) if inside else \
                "; no budget lies within both grids"
            out.append(f"- {decoding}: {LABELS[x['a']]} {WORDS[x['verdict']]} {LABELS[x['b']]} — {detail}{within}{few}.")
    return out


def _energy_sentence(rows, decoding) -> str:
    nat = [r for r in rows if r["decoding"] == decoding and r["method"] == "natural"]
    e, k, s = (_mean(nat, f) for f in ("cv_log_energy", "cv_log_kinetic", "cv_surprisal"))
    rel = "above" if e > k else "below" if e < k else "equal to"
    return (f"Energy along the natural continuations ({decoding}): mean CV(log E) = {_f(e)} is {rel} mean CV(log K) = "
            f"{_f(k)}; mean CV(s) = {_f(s)}. A steered CV(log E) is read against these and against its own CV(log K) "
            "and CV(s) in the table above.")


def _examples(report: dict) -> list[str]:
    c, rows = report["config"], report["rows"]
    decoding = c["decodings"][0]
    entry = report["analysis"][decoding]
    mid = next((m for m in report["methods"] if m["name"] == "jacobian_mid"), None)
    pool = mid["cases"] if mid is not None and isinstance(mid["cases"], list) else [p["case"] for p in report["prompts"]]
    shown = [pool[i] for i in pick(len(pool), 3)]  # first, middle and last: different prompts and concepts
    nat_cost = next(iter(entry["curves"].values()))["cost"][0]
    budget = nat_cost + 0.5
    lines = ["", f"## Examples ({decoding}; each method at its strongest strength whose mean cost is within "
                 f"+0.5 nats of natural, else its weakest)"]
    for case in shown:
        p = report["prompts"][case]
        lines += ["", f"Case {case}: prompt “{p['prompt']}”, concept {p['concept']} (“{p['concept_sentence']}”)", ""]
        nat = _group(rows, decoding, "natural", 0.0, {case})[0]
        lines.append(f"- natural (similarity {_f(nat['similarity'], 2)}): “{nat['continuation'].strip()}”")
        for name, curve in entry["curves"].items():
            s = _example_strength(curve, budget)
            r = _group(rows, decoding, name, s, {case})
            if r:
                lines.append(f"- {LABELS[name]} at {s:g} (similarity {_f(r[0]['similarity'], 2)}, cost "
                             f"{_f(r[0]['cost'], 2)}): “{r[0]['continuation'].strip()}”")
    return lines


def _reading(report: dict) -> list[str]:
    c = report["config"]
    return [
        "- Similarity: cosine of all-MiniLM-L6-v2 embeddings of the continuation and the concept sentence.",
        f"- Fluency cost: mean surprisal of the continuation under {c['judge']}, given its prompt (nats per token; "
        "perplexity = exp(cost)). Lower is more fluent; a repetitive text can be cheap, so read distinct-2 next to it.",
        "- Frontier at a budget: the best mean similarity a method's curve (natural point, then its strengths in "
        "order, joined by straight lines) reaches with mean cost at most natural cost + budget. Differences are "
        f"paired over cases; the interval is the 2.5–97.5 percentile of {c['resamples']} bootstrap resamples of the "
        "cases (numpy PCG64, seed {0}), each recomputing both mean curves and the natural cost.".format(c["seed"]),
        "- A call is 'higher' or 'lower' when that interval excludes 0, else 'indistinguishable'; a verdict is "
        "'dominates' / 'loses' when every budget says higher / lower, 'matches' when every budget is "
        "indistinguishable, and 'neither dominates nor loses' otherwise.",
        f"- Cases share prompts ({c['prompts']}) and concepts ({c['concepts']}); the bootstrap treats them as "
        "independent, so the intervals are if anything too narrow.",
        "- Every case is counted at every strength: a Jacobian request the solver cannot meet is still generated "
        "with the step it found, and its shares of feasible and converged steps are in the table.",
    ]


def plot(report: dict, decoding: str, path: Path) -> None:
    """Left: every method's mean curve on all cases; right: the same on the Jacobian-middle subset (when run).
    Points are labelled with their strengths; dotted lines mark the fluency budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench import curves

    entry = report["analysis"][decoding]
    mid = next((m for m in report["methods"] if m["name"] == "jacobian_mid"), None)
    on_subset = mid is not None and isinstance(mid["cases"], list) and "jacobian_mid" in entry["curves"]
    panels = [("all cases", None)] + ([("middle-layer subset", mid["cases"])] if on_subset else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (title, subset) in zip(axes[0], panels):
        cases = subset if subset is not None else [p["case"] for p in report["prompts"]]
        for m in report["methods"]:
            if m["name"] not in entry["curves"] or (subset is None and on_subset and m["name"] == "jacobian_mid"):
                continue
            cost, sim = curves(report["rows"], m["name"], m["strengths"], decoding, cases)
            x, y = cost.mean(0), sim.mean(0)
            ax.plot(x, y, "o-", color=COLORS[m["name"]], label=f"{LABELS[m['name']]} ({SHORT_UNITS[m['name']]})")
            for s, xi, yi in zip(m["strengths"], x[1:], y[1:]):
                ax.annotate(f"{s:g}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7,
                            color=COLORS[m["name"]])
        ax.plot([x[0]], [y[0]], "k*", ms=14, label="natural")
        for k, extra in enumerate(report["config"]["extra_costs"]):  # the budgets of the matched comparisons
            ax.axvline(x[0] + extra, color="0.6", ls=":", lw=1, label="fluency budgets (natural + 0.25 ... nats)"
                       if k == 0 else None)
        ax.set(xlabel="fluency cost: mean surprisal under the judge (nats/token)",
               ylabel="similarity to the concept (MiniLM cosine)",
               title=f"{report['config']['model']}, {decoding}: {title} ({len(cases)} cases)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["write", "markdown", "plot", "strict"]
