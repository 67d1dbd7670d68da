"""report.md and the ROC plots of ``mppm anomaly-bench``, computed from results.json: every number and
every verdict below comes from the run's rows."""

from __future__ import annotations

import math
from pathlib import Path

from . import features as F
from . import tasks as T

TASK_TEXT = {
    "splice": "a span spliced in from another corpus",
    "splice_matched": "spliced spans against natural passages of its own, the two paired by nearest surprisal "
                      "text scores under the task model",
    "sampled": "the model's own continuation at matched perplexity against the human one",
    "repetition": "a repetition loop",
    "injection": "a templated instruction injection (test templates unseen in calibration)",
    "shuffle": "a token-shuffled span (sanity check)",
}


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _ci(row: dict, key: str) -> str:
    return f"{_f(row[key])} [{_f(row[key + '_low'])}, {_f(row[key + '_high'])}]"


def _row(results: dict, model: str, task: str, feature: str) -> dict:
    return next(r for r in results["rows"] if r["model"] == model and r["task"] == task and r["feature"] == feature)


def _delta(results: dict, model: str, task: str) -> dict:
    return next(d for d in results["deltas"] if d["model"] == model and d["task"] == task)


def _best_candidate(results: dict, model: str, task: str) -> dict:
    """The energy feature with the best *calibration* AUROC (chosen without looking at the test split)."""
    rows = [_row(results, model, task, f) for f in F.CANDIDATES]
    return max(rows, key=lambda r: r["calibration_auroc"])


def _covers_half(row: dict) -> bool:
    return row["auroc_low"] <= 0.5 <= row["auroc_high"]


def overall(results: dict) -> str:
    trained = [m for m in results["config"]["models"] if any(d["model"] == m and d["trained"] for d in results["deltas"])]
    if not trained:
        trained = results["config"]["models"][:1]
    parts = []
    for model in trained:
        verdicts = {t: _delta(results, model, t)["verdict"] for t in T.TASKS}
        helps = [t for t, v in verdicts.items() if v == "helps"]
        hurts = [t for t, v in verdicts.items() if v == "hurts"]
        text = (f"For {model}, adding the energy features to surprisal + entropy **helps on {len(helps)} of "
                f"{len(T.TASKS)} tasks**" + (f" ({', '.join(helps)})" if helps else "")
                + f", hurts on {len(hurts)}" + (f" ({', '.join(hurts)})" if hurts else "")
                + f" and makes no detectable difference on {len(T.TASKS) - len(helps) - len(hurts)} "
                "(ΔAUROC's 95% interval covers 0).")
        twin = next((d["model"] for d in results["deltas"] if d.get("control_of") == model), None)
        if twin is not None and helps:
            twin_helps = [t for t in helps if _delta(results, twin, t)["verdict"] == "helps"]
            text += (f" The random-weight twin ({twin}) gains from the energy features on {len(twin_helps)} of those "
                     f"{len(helps)} tasks" + (f" ({', '.join(twin_helps)}): there the gain is not evidence of "
                                              "trained mechanics" if twin_helps else "") + ".")
        if twin is not None:
            twin_all = [t for t in T.TASKS if _delta(results, twin, t)["verdict"] == "helps"]
            text += (f" On its own, the twin gains from the energy features on {len(twin_all)} of {len(T.TASKS)} tasks"
                     + (f" ({', '.join(twin_all)}): with random weights the state steps still follow the tokens "
                        "(repeated or shuffled tokens give repeated or unusual steps), so such gains measure the "
                        "text, not trained mechanics" if twin_all else "") + ".")
        specific = [t for t in helps if twin is None or _delta(results, twin, t)["verdict"] != "helps"]
        if not helps:
            answer = "**Overall: the energy adds nothing detectable to perplexity as an anomaly detector here.**"
        elif not specific:
            answer = (f"**Overall: the energy adds to surprisal + entropy only on {', '.join(helps)}, where the random "
                      "twin gains as well, so the gain is not specific to trained mechanics; on the other tasks it "
                      "adds nothing detectable.**")
        else:
            answer = (f"**Overall: the energy is a second signal next to perplexity on {', '.join(specific)}, where "
                      "the random twin does not gain; on the other tasks it adds nothing detectable.**")
        parts.append(text + " " + answer)
    return "\n\n".join(parts)


def verdict_table(results: dict) -> str:
    head = ("task", "model", "AUROC surprisal", "AUROC logistic(s, H)", "AUROC logistic(s, H + energy)", "ΔAUROC",
            "verdict", "best energy feature (by calibration)", "its AUROC")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in T.TASKS:
        for model in results["config"]["models"]:
            d = _delta(results, model, task)
            best = _best_candidate(results, model, task)
            lines.append("| " + " | ".join([
                task, model, _ci(_row(results, model, task, "surprisal"), "auroc"),
                _ci(_row(results, model, task, F.BASE_MODEL), "auroc"),
                _ci(_row(results, model, task, F.COMBINED_MODEL), "auroc"),
                f"{_f(d['delta_auroc'])} [{_f(d['delta_auroc_low'])}, {_f(d['delta_auroc_high'])}]",
                f"energy {d['verdict']}", f"{F.LABELS[best['feature']]} ({best['direction']})",
                _ci(best, "auroc")]) + " |")
    return "\n".join(lines) + "\n"


def feature_table(results: dict, model: str, task: str) -> str:
    head = ("feature", "kind", "anomalies score", "AUROC", "AUPRC", "TPR at 1% FPR", "test FPR")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in (r for r in results["rows"] if r["model"] == model and r["task"] == task):
        lines.append("| " + " | ".join([F.LABELS[r["feature"]], r["kind"], r["direction"], _ci(r, "auroc"),
                                         _ci(r, "auprc"), _ci(r, "tpr_at_1pct_fpr"), _f(r["test_fpr"])]) + " |")
    return "\n".join(lines) + "\n"


def construction_checks(results: dict, model: str) -> list[str]:
    out = []
    m = _row(results, model, "splice_matched", "surprisal")
    out.append(f"Matched splice: surprisal alone reaches AUROC {_ci(m, 'auroc')} on {model}, "
               + ("so it does not detectably separate the matched classes on the test split (the interval covers "
                  "0.5)." if _covers_half(m) else
                  "so the pairing did not make it chance-level (the interval excludes 0.5)"
                  + (": this model is not the task model that the pairs were matched under."
                     if model != results["config"]["task_model"] else
                     ": the kept pairs still differ in surprisal (pair distances below).")))
    sh = _row(results, model, "shuffle", "surprisal")
    out.append(f"Shuffled spans (the sanity check): surprisal reaches AUROC {_ci(sh, 'auroc')}"
               + (", as expected." if sh["auroc_low"] > 0.9 else ", lower than expected for the sanity check."))
    lk = _row(results, model, "splice", "log_kinetic")
    out.append(f"Spliced spans score **{lk['direction']}** log K than natural text (direction fixed on calibration; "
               f"test AUROC {_ci(lk, 'auroc')}).")
    cfg = results["config"]
    match = cfg.get("splice_match") or {}
    if match:
        def scores(key: str) -> str:
            return " and ".join(f"{split} {' / '.join(_f(v, 2) for v in m[key])}" for split, m in match.items())

        pool = next(iter(match.values()))["pool"]
        out.append(f"The matched splice's construction spliced {pool} host passages per split as `splice` does, took "
                   f"{pool} further natural passages from the same stretch of the host corpus, and kept the "
                   f"{cfg['n']} (spliced, natural) pairs nearest in {cfg['task_model']}'s text surprisal scores (highest window mean / "
                   "lowest window mean / text mean, each divided by its spread over the natural passages), greedily "
                   f"by distance; its negatives are these natural passages, not the shared ones. Means in "
                   f"nats/token (calibration and test): kept spliced texts {scores('kept_positives')}; kept natural "
                   f"passages {scores('kept_negatives')}; all spliced {scores('spliced')}; all natural "
                   f"{scores('natural')}; pair distance (in spreads) median "
                   + " and ".join(f"{split} {_f(m['median_gap'], 2)}" for split, m in match.items())
                   + ", largest " + " and ".join(f"{split} {_f(m['max_gap'], 2)}" for split, m in match.items())
                   + "." + (" The pairs come from where the two pools overlap: the kept splices are less surprising "
                            "on average (text mean) than all splices, the kept natural passages more than all natural "
                            "ones." if all(m["kept_positives"][2] < m["spliced"][2] and
                                           m["kept_negatives"][2] > m["natural"][2] for m in match.values()) else ""))
    out.append(f"Sampled continuations: temperature {cfg['temperature']} (top-p 0.95), interpolated from the search "
               + ", ".join(f"τ = {r['temperature']}: {_f(r['mean_surprisal'], 2)}" for r in cfg["temperature_search"])
               + " nats/token on the pilot prompts, to match the human continuations' "
               + _f(cfg["human_mean_surprisal"], 2) + " nats/token.")
    tm = cfg.get("text_mean_surprisal") or {}
    if tm:
        out.append("Mean surprisal per text under " + cfg["task_model"] + " (anomalous / natural): "
                   + ", ".join(f"{t} {_f(v['positives'], 2)} / {_f(v['negatives'], 2)}" for t, v in tm.items()) + ".")
    return out


def write_report(results: dict, path: Path) -> None:
    cfg, ov = results["config"], results["overhead"]
    lines = ["# Anomaly detection: does the energy add to perplexity?", ""]
    for m in cfg["missing_trained"]:
        lines.append(f"**Trained model {m['name']} is not installed, so this run has "
                     f"{sum(1 for d in results['deltas'] if d['trained']) // len(T.TASKS)} trained model(s) and their "
                     f"random twins instead of two trained models.** Install it with `{m['install']}` and rerun "
                     "to add it.")
        lines.append("")
    lines += [f"Generated by `mppm anomaly-bench{' --quick' if cfg['quick'] else ''}` (mppm_ext/anomaly); every "
              "number, sentence and verdict below is computed from that run's results.json. A verdict compares, on "
              "the test split, the logistic model on surprisal + entropy + energy features with the one on "
              "surprisal + entropy alone: ΔAUROC with a 95% bootstrap interval over test documents; **helps** "
              "when the interval lies above 0, **hurts** when below, **does not help** when it covers 0.", "",
              "## Answer", "", overall(results), "", "## Verdict per task", "", verdict_table(results)]
    lines += ["## Setup", ""]
    n = cfg["n"]
    lines.append(f"- Models: {', '.join(cfg['models'])}; tasks built with {cfg['task_model']} (its tokeniser cuts "
                 "the passages, its samples make the `sampled` task); each random twin scores the same texts.")
    lines.append(f"- Host corpus `{cfg['host']}`, donor corpora {', '.join('`' + d + '`' for d in cfg['donors'])}; "
                 f"texts of {cfg['length']} tokens, anomalous spans of {cfg['span']} tokens (sampled continuations "
                 f"{cfg['continuation']}); {n} positives and {n} negatives per task in each of the calibration and "
                 f"test splits ({2 * n} + {2 * n} per task), the negatives natural passages shared by every task but "
                 "`splice_matched`, which has its own (below); host and donor documents split in half, none in both; "
                 f"{cfg['n_texts']} distinct texts.")
    lines.append(f"- Text scores: per-token features averaged over windows of {cfg['window']} tokens, the text's "
                 "highest and lowest window (rolling features: their own extremes) and mean; a single feature's "
                 "direction, every threshold (TPR at 1% FPR: the calibration negatives' 99th percentile) and the "
                 "logistic models (L2, λ = 1, standardised inputs: high, low, mean of each feature) are fixed on "
                 f"the calibration split; intervals: {cfg['reps']} bootstrap resamples of test documents.")
    load, threads = results.get("load_average_end"), results["versions"]["torch_threads"]
    load_text = "" if load is None else (
        ", load average " + " / ".join(f"{x:.1f}" for x in load) + " over the last 1 / 5 / 15 minutes at the end"
        + (f" (above the {threads} torch threads: the machine was shared)" if load[2] > threads else ""))
    lines.append(f"- Run time {results['wall_s']:.0f} s wall clock ("
                 + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in results["timing"].items())
                 + f"), {results['cpu_s']:.0f} s process CPU time{load_text}; torch {results['versions']['torch']}, "
                 f"transformers {results['versions']['transformers']}, {threads} torch threads.")
    load = "" if ov.get("load_average") is None else f", 1-minute load average {ov['load_average']:.1f} at the end"
    lines += ["", "## Monitor overhead", "",
              f"Greedy generation of {ov['new_tokens']} tokens with {ov['model']}: {_f(ov['plain_ms_per_token'], 1)} ms "
              f"per token without the monitor, {_f(ov['monitored_ms_per_token'], 1)} ms with it attached "
              f"({ov['overhead_ms_per_token']:+.1f} ms, {100 * ov['overhead_fraction']:+.1f}%); process CPU time "
              f"{_f(ov['plain_cpu_ms_per_token'], 1)} → {_f(ov['monitored_cpu_ms_per_token'], 1)} ms per token "
              f"({ov['overhead_cpu_ms_per_token']:+.1f} ms, {100 * ov['overhead_cpu_fraction']:+.1f}%); medians of "
              f"{ov['repeats']} interleaved runs, {ov['torch_threads']} threads{load}. The monitor scored "
              f"{ov['computed_from']['logits']} of the {sum(ov['computed_from'].values())} forward calls of a "
              "monitored run from the model's own logits and the rest (the prefill, whose logits the model forms "
              "for its last position only) from the states.", "",
              "## Checks on the construction", ""]
    first = cfg["models"][0]
    lines += [f"- {c}" for c in construction_checks(results, first)]
    lines += ["", "## Every feature, per task and model", ""]
    for task in T.TASKS:
        d = _delta(results, first, task)
        lines += [f"### {task}: {TASK_TEXT[task]}", "",
                  f"Test split: {d['n_pos_test']} positives, {d['n_neg_test']} negatives from {d['n_docs_test']} "
                  f"documents (calibration: {d['n_pos_calibration']} and {d['n_neg_calibration']}). "
                  f"![ROC curves](roc_{task}.png)", ""]
        for model in cfg["models"]:
            lines += [f"**{model}**", "", feature_table(results, model, task)]
    path.write_text("\n".join(lines) + "\n")


def plot_rocs(curves: dict, results: dict, out: Path) -> None:
    """roc_<task>.png: test-split ROC curves of the first model (solid) and its twin (dashed) for surprisal,
    the two logistic models and the best energy feature by calibration AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["config"]["models"]
    for task in T.TASKS:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for model, style in zip(models[:2], ("-", "--")):
            best = _best_candidate(results, model, task)["feature"]
            for feature, color in (("surprisal", "tab:gray"), (F.BASE_MODEL, "tab:blue"),
                                   (F.COMBINED_MODEL, "tab:red"), (best, "tab:green")):
                fpr, tpr = curves[(model, task)][feature]
                auc = _row(results, model, task, feature)["auroc"]
                ax.plot(fpr, tpr, style, color=color, label=f"{model}: {F.LABELS[feature]} ({auc:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="black", linewidth=0.8, label="chance")
        ax.set_xlabel("false-positive rate (fraction of natural texts flagged)")
        ax.set_ylabel("true-positive rate (fraction of anomalous texts flagged)")
        ax.set_title(f"{task}: test split (AUROC in parentheses)")
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"roc_{task}.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> int:
    """``python -m mppm_ext.anomaly.report DIR``: rewrite DIR/report.md from DIR/results.json (the PNGs
    are left as they are)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m mppm_ext.anomaly.report", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="an anomaly-bench output directory")
    args = parser.parse_args(argv)
    results = json.loads((args.dir / "results.json").read_text())
    write_report(_nan(results), args.dir / "report.md")
    print(f"wrote {args.dir / 'report.md'}")
    return 0


def _nan(x):
    """results.json's None (JSON has no NaN) back to NaN."""
    if x is None:
        return float("nan")
    if isinstance(x, dict):
        return {k: _nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan(v) for v in x]
    return x


if __name__ == "__main__":
    raise SystemExit(main())
