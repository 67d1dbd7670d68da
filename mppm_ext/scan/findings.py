"""The reproduction report: one command scans the trained models and their random twins, random-weight
models of five families at their real sizes, with every control, and writes ``docs/findings.md`` whose
numbers and answers are all computed from that run.

    python -m mppm_ext.scan.findings                  # or: mppm findings
    python -m mppm_ext.scan.findings --from-scan docs/findings/scan   # rewrite the report only

Defaults take about 9 minutes on a 2-core CPU (8,192 scanned tokens per model; see DEFAULT_*); the
report states the token count and the time the run took."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

#: Trained models, scanned with their random twins when installed (``mppm setup``).
DEFAULT_TRAINED = ("smollm2-135m", "gemma3-270m")
#: Random-weight models of six of the paper's families at real sizes (Llama/SmolLM2, GPT-2, GPT-NeoX/Pythia,
#: OPT, Gemma 3, Qwen2). Phi-1.5 (1.3B) is left out by default: on 2 CPU cores it alone would take about
#: as long as the rest together; add it with --models random:phi-1.3b.
#: Each reads SmolLM2's tokens (``@smollm2-135m``: its tokenizer, the vocabulary resized to 49,152), so that
#: every random-weight model sees the token sequences the trained one sees; one byte-level model stays as
#: the control of the earlier runs' set-up (the text the families read then differed, not only the weights).
READER = "smollm2-135m"
DEFAULT_RANDOM = tuple(f"random:{m}@{READER}" for m in ("llama-135m", "gpt2-124m", "pythia-160m", "opt-125m",
                                                        "gemma3-270m", "qwen2-0.5b")) + ("random:llama-135m",)
#: Scanned separately; "tiny" ships with the package, the others come with ``mppm setup``.
DEFAULT_CORPORA = ("tiny", "sotu", "moby-dick", "lee")
DEFAULT_WINDOW = 256
# Budget: 9 models x 4 corpora x (1 scan + 1 shuffled + 0.25 held-out) passes x 2,048 tokens ~ 170k forward
# tokens of 125M-500M-parameter models, about the 8,192 tokens on one corpus of the earlier runs (447 s on
# 2 quiet cores); the measured time of the committed run is in the report and the README.
DEFAULT_MAX_TOKENS = 2048
LARGE_MAX_TOKENS = 8192
# Small batches keep the activations of the widest model (Qwen2-0.5B: 24 blocks, d = 896) small; the
# logits are never formed (the energy is computed from the final state, tile by tile).
DEFAULT_BATCH = 2
from .engine import CONTROLS
LAYERS = ("mid",)
#: Two CVs are "about equal" when they differ by less than this fraction.
CLOSE = 0.10


def _f(row: dict, key: str) -> float:
    v = row.get(key, "")
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _is_trained(row: dict) -> bool:
    return str(row["trained"]) == "True"


def _fmt(x: float, digits: int = 3) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _rows(summary: list[dict], variant: str = "base", pairing: str = "same") -> list[dict]:
    return [r for r in summary if r["variant"] == variant and r["pairing"] == pairing]


def _std(row: dict, name: str) -> float:
    return _f(row, f"pooled_cv_{name}") * abs(_f(row, f"pooled_mean_{name}"))


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def conserved(row: dict) -> bool:
    """The product energy is conserved in the reviewers' sense: CV(E) below both CV(K) and CV(PPL)."""
    e = _f(row, "pooled_cv_energy")
    return e < _f(row, "pooled_cv_kinetic") and e < _f(row, "pooled_cv_ppl")


def log_conserved(row: dict) -> bool:
    """The same test on the log scale: std(log E) below std(log K) and std(s), i.e. log K and s cancel."""
    return _std(row, "log_energy") < min(_std(row, "log_kinetic"), _std(row, "surprisal"))


def main_table(rows: list[dict]) -> str:
    head = ("model", "trained", "params", "log V", "tokens", "mean s", "CV(s)", "CV(PPL)", "mean log K", "CV(K)",
            "CV(E)", "CV(log E)", "CV(A)", "CV(ℓ)", "corr(log K, s)", "seq CV(E)", "seq CV(K)", "seq CV(PPL)",
            "seq corr")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], "yes" if _is_trained(r) else "no", f"{float(r['params']) / 1e6:.3g}M",
                 _fmt(_f(r, "log_vocab")), str(r["tokens"]), _fmt(_f(r, "pooled_mean_surprisal")),
                 _fmt(_f(r, "pooled_cv_surprisal")), _fmt(_f(r, "pooled_cv_ppl")),
                 _fmt(_f(r, "pooled_mean_log_kinetic")), _fmt(_f(r, "pooled_cv_kinetic")),
                 _fmt(_f(r, "pooled_cv_energy")), _fmt(_f(r, "pooled_cv_log_energy")),
                 _fmt(_f(r, "pooled_cv_additive_energy")), _fmt(_f(r, "pooled_cv_log_lagrangian")),
                 _fmt(_f(r, "pooled_corr"), 2), _fmt(_f(r, "seq_cv_energy")), _fmt(_f(r, "seq_cv_kinetic")),
                 _fmt(_f(r, "seq_cv_ppl")), _fmt(_f(r, "seq_corr"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def control_table(summary: list[dict], variants: Sequence[str]) -> str:
    head = ("model", "variant", "pairing", "mean log K", "CV(K)", "CV(E)", "CV(log E)", "CV(PPL)", "corr(log K, s)",
            "E conserved?")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        if r["variant"] not in variants:
            continue
        lines.append("| " + " | ".join([
            r["model"], r["variant"], r["pairing"], _fmt(_f(r, "pooled_mean_log_kinetic")),
            _fmt(_f(r, "pooled_cv_kinetic")), _fmt(_f(r, "pooled_cv_energy")), _fmt(_f(r, "pooled_cv_log_energy")),
            _fmt(_f(r, "pooled_cv_ppl")), _fmt(_f(r, "pooled_corr"), 2), "yes" if conserved(r) else "no"]) + " |")
    return "\n".join(lines) + "\n"


def answer_conservation(rows: list[dict]) -> str:
    yes = [r["model"] for r in rows if conserved(r)]
    log_yes = [r["model"] for r in rows if log_conserved(r)]
    corr = [_f(r, "pooled_corr") for r in rows]
    verdict = "Yes" if len(yes) == len(rows) else ("No" if not yes else "Only for some models")
    text = (f"**{verdict}.** CV(E) is below both CV(K) and CV(PPL) for {len(yes)} of {len(rows)} models"
            + (f" ({', '.join(yes)})" if yes else "") + ". ")
    text += (f"On the log scale, std(log E) is below both std(log K) and std(s) for {len(log_yes)} of {len(rows)} "
             f"models; that needs log K and s to be anti-correlated, and corr(log K, s) ranges from "
             f"{_fmt(min(corr), 2)} to {_fmt(max(corr), 2)} (median {_fmt(_median(corr), 2)}).")
    return text


def answer_additive(rows: list[dict]) -> str:
    parts = []
    explained = below_e = 0
    for r in rows:
        a, k, e = _f(r, "pooled_cv_additive_energy"), _f(r, "pooled_cv_kinetic"), _f(r, "pooled_cv_energy")
        share = abs(_f(r, "pooled_mean_log_prob")) / _f(r, "pooled_mean_kinetic")
        explained += abs(a - k) <= CLOSE * k
        below_e += a < e
        parts.append(f"{r['model']}: CV(A) = {_fmt(a)}, CV(K) = {_fmt(k)}, CV(E) = {_fmt(e)}, |mean log p| / mean K "
                     f"= {_fmt(share)}")
    verdict = "Yes" if explained == len(rows) else ("No" if not explained else "Partly")
    return (f"**{verdict}.** CV(A) is within {int(CLOSE * 100)}% of CV(K) for {explained} of {len(rows)} models: "
            "where |log p| is small next to K, A = K + log p is K plus a near-constant, so its CV is K's own and says "
            "nothing about K and the perplexity trading off. CV(A) is below CV(E) (the additive definition looks "
            f"more conserved than the product one) for {below_e} of {len(rows)} models. Per model: "
            + "; ".join(parts) + ".")


def answer_random(rows: list[dict]) -> str:
    trained = [r for r in rows if _is_trained(r)]
    random = [r for r in rows if not _is_trained(r)]
    if not trained or not random:
        return ("**Cannot say from this run:** it needs both trained and random-weight models "
                f"(trained: {len(trained)}, random: {len(random)}; install the trained ones with `mppm setup`).")
    t_e, r_e = _median([_f(r, "pooled_cv_energy") for r in trained]), _median([_f(r, "pooled_cv_energy") for r in random])
    t_k, r_k = _median([_f(r, "pooled_cv_kinetic") for r in trained]), _median([_f(r, "pooled_cv_kinetic") for r in random])
    t_s, r_s = (_median([_f(r, "pooled_cv_surprisal") for r in trained]),
                _median([_f(r, "pooled_cv_surprisal") for r in random]))
    pinned = _median([_f(r, "pooled_mean_surprisal") / _f(r, "log_vocab") for r in random])
    e_over_k = _median([_f(r, "pooled_cv_energy") / _f(r, "pooled_cv_kinetic") for r in random])
    tighter = r_e < t_e
    text = (f"**{'Yes' if tighter else 'No'}**, median CV(E) is {_fmt(r_e)} for the {len(random)} random-weight models "
            f"against {_fmt(t_e)} for the {len(trained)} trained ones. ")
    text += (f"Their surprisal is pinned near log V: its mean is {_fmt(100 * pinned)}% of log V (median) with "
             f"CV(s) {_fmt(r_s)} against {_fmt(t_s)} for trained models, and CV(E) / CV(K) is {_fmt(e_over_k)} "
             "(E varies as K does: the perplexity factor is nearly constant). ")
    if not tighter:
        text += "So there is no tighter conservation to explain."
    elif r_k < t_k * (1 - CLOSE):
        text += (f"**Not only that:** their kinetic energy is also steadier (median CV(K) {_fmt(r_k)} against "
                 f"{_fmt(t_k)}), so part of the gap comes from K, which no perplexity argument explains.")
    else:
        text += (f"**Yes, that is the whole story here:** CV(K) is not lower for random models ({_fmt(r_k)} against "
                 f"{_fmt(t_k)}), so their lower CV(E) comes from the flat perplexity.")
    return text


def answer_token_mean(summary: list[dict]) -> str:
    base = {r["model"]: r for r in _rows(summary)}
    sub = {r["model"]: r for r in _rows(summary, "token_mean")}
    if not sub:
        return "**Not measured in this run** (the token-mean control was off)."
    lines, flips = [], 0
    for model, r in sub.items():
        b = base[model]
        ratio = math.exp(_f(r, "pooled_mean_log_kinetic") - _f(b, "pooled_mean_log_kinetic"))
        flip = conserved(r) != conserved(b)
        flips += flip
        lines.append(f"{model}: CV(E) {_fmt(_f(b, 'pooled_cv_energy'))} → {_fmt(_f(r, 'pooled_cv_energy'))}, "
                     f"CV(K) {_fmt(_f(b, 'pooled_cv_kinetic'))} → {_fmt(_f(r, 'pooled_cv_kinetic'))}, corr(log K, s) "
                     f"{_fmt(_f(b, 'pooled_corr'), 2)} → {_fmt(_f(r, 'pooled_corr'), 2)}, typical K × {_fmt(ratio)}"
                     f"{' (the conservation verdict flips)' if flip else ''}")
    verdict = "Yes" if flips else "It changes the numbers, not the verdict"
    coverage = [_f(r, "token_mean_coverage") for r in sub.values()]
    return (f"**{verdict}:** the verdict of the first question flips for {flips} of {len(sub)} models. "
            f"The held-out split gave a mean for the tokens at {_fmt(100 * min(coverage))}–"
            f"{_fmt(100 * max(coverage))}% of the scanned positions (the others get the overall mean state). "
            "Per model (base → token mean subtracted; \"typical K\" is exp(mean log K)): " + "; ".join(lines) + ".")


def answer_other_controls(summary: list[dict]) -> str:
    out = []
    for variant, what in (("shuffled", "shuffling the tokens within each window"),
                          ("pre_norm", "the pre-norm state instead of the post-norm one"),
                          ("layer_mid", "the middle block's state")):
        rows = _rows(summary, variant)
        if not rows:
            continue
        base = {r["model"]: r for r in _rows(summary)}
        flips = sum(conserved(r) != conserved(base[r["model"]]) for r in rows)
        change = _median([_f(r, "pooled_cv_energy") / _f(base[r["model"]], "pooled_cv_energy") for r in rows])
        out.append(f"- With {what}, CV(E) changes by a median factor of {_fmt(change)}; the verdict flips for "
                   f"{flips} of {len(rows)} models.")
    shifted = _rows(summary, "base", "shifted")
    if shifted:
        yes = sum(conserved(r) for r in shifted)
        out.append(f"- With the other pairing (K_t with s_(t-1)), CV(E) is below both parts' CVs for {yes} of "
                   f"{len(shifted)} models.")
    return "\n".join(out) + "\n"


def timing_table(rows: list[dict], meta: dict) -> str:
    wall = {m["label"]: m.get("wall_s", math.nan) for m in meta.get("models", [])}
    lines = ["| model | forward ms / 1k tokens | energy ms / 1k tokens | energy share | wall s |",
             "|---|---|---|---|---|"]
    for r in rows:
        f, e = _f(r, "forward_ms_per_1k"), _f(r, "energy_ms_per_1k")
        lines.append(f"| {r['model']} | {_fmt(f, 4)} | {_fmt(e, 4)} | {_fmt(100 * e / (f + e), 2)}% | "
                     f"{_fmt(wall.get(r['model'], math.nan), 3)} |")
    return "\n".join(lines) + "\n"


#: What the findings run adds to its scan directory, so that --from-scan rewrites the same report.
RUN_FILE = "findings_run.json"


def write_findings(scan_dir: Path, report: Path, *, plots: Optional[Path] = None) -> Path:
    """Write the findings Markdown from a scan directory's summary.csv, metadata.json and findings_run.json."""
    from .output import read_csv

    summary = read_csv(Path(scan_dir) / "summary.csv")
    meta = json.loads((Path(scan_dir) / "metadata.json").read_text())
    run_file = Path(scan_dir) / RUN_FILE
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    skipped, elapsed = run.get("skipped", []), run.get("elapsed_s")
    rows = _rows(summary)
    args = meta["args"]
    tokens = sorted({int(r["tokens"]) for r in rows})
    rel = (lambda p: Path(p).resolve().relative_to(report.parent.resolve()).as_posix()) if plots else None
    lines = [
        "# Findings: is the momentum / point-perplexity energy conserved?",
        "",
        "Generated by `python -m mppm_ext.scan.findings` (see README, \"Findings\"); every number below comes "
        "from that run's tables, and the answers are computed from them by mppm_ext/scan/findings.py. "
        "Definitions: shared/design/science.md. E = K·PPL (product), A = K + log p (additive, what the paper's "
        "code computed), ℓ = log K − s. CVs are pooled over every used position of every window unless marked "
        "\"seq\" (the mean over windows of the per-window CV).",
        "",
        "## Setup",
        "",
        f"- Corpus `{args['corpus']}`, windows of {args['window']} tokens, **{', '.join(map(str, tokens))} scanned "
        f"tokens per model** (max_tokens = {args['max_tokens']}), batch {args['batch_size']}, dtype {args['dtype']}, "
        f"device {meta['device']}, {meta['world_size']} process(es).",
        f"- Controls: {', '.join(args['controls']) or 'none'}; other layers: {', '.join(map(str, args['layers'])) or 'none'}. "
        f"Token-mean held-out split: {meta['heldout_split'] or 'n/a'}.",
        "- Random-weight models built from a config use a byte-level tokenizer (the trained models' tokenizers "
        "need their files); the random twins of trained models use the trained model's tokenizer, so the "
        "trained-vs-twin pairs compare the same tokens.",
        f"- mppm_ext {meta['versions'].get('mppm_ext')}, torch {meta['versions'].get('torch')}, transformers "
        f"{meta['versions'].get('transformers', 'n/a')}, git {meta.get('git_sha') or 'unknown'}"
        + (f"; the whole run took {elapsed:.0f} s." if elapsed is not None else "."),
    ]
    if skipped:
        lines.append(f"- Not scanned (not installed; `mppm setup` installs them): {', '.join(skipped)}.")
    lines += ["", "## Per model (final post-norm state, pairing K_t with s_t)", "", main_table(rows),
              "The paper reports trained models at log-kinetic ≈ 7 and potential 0.2–2.5, untrained ones at potential "
              "6–8; compare \"mean log K\" and \"mean s\" above.", "",
              "## Answers", "",
              "**1. Is CV(E) below both CV(K) and CV(PPL)?** " + answer_conservation(rows), "",
              "**2. Does the additive variant explain the claimed conservation?** " + answer_additive(rows), "",
              "**3. Do random models conserve more tightly, and is that only because their surprisal is pinned near "
              "log V?** " + answer_random(rows), "",
              "**4. Does subtracting the per-token mean hidden state change the picture?** "
              + answer_token_mean(summary), "",
              "**Other controls.**", "", answer_other_controls(summary),
              "## Controls in full", "", control_table(summary, [v for v in dict.fromkeys(r["variant"] for r in summary)]),
              "## Speed: forward pass against the energy", "",
              "The forward pass stops before the unembedding; the energy includes it (energy_from_hidden forms "
              "the logits tile by tile), so with a large vocabulary it weighs more than the forward.", "",
              timing_table(rows, meta)]
    if plots:
        lines += ["## Plots", "", f"![CV bars]({rel(plots / 'cv_bars.png')})", "",
                  f"![log K against surprisal]({rel(plots / 'logk_vs_surprisal.png')})", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return report


def _available(names: Sequence[str]) -> tuple[list[str], list[dict]]:
    """(names that load, [{"model", "install"}] for those that need a trained model that is not installed:
    the model itself, or the one whose tokenizer a ``random:...@<trained>`` model reads)."""
    from mppm_ext.models.loading import TRAINED, install_command, installed_gguf

    ok, skipped = [], []
    for name in names:
        needs = name.partition("@")[2] if name.startswith("random:") else name
        if needs in TRAINED and installed_gguf(needs) is None:
            skipped.append({"model": name, "install": install_command(needs)})
        else:
            ok.append(name)
    return ok, skipped


def _corpora(names: Sequence[str]) -> tuple[dict[str, list[str]], list[dict]]:
    """({corpus: documents} for the fetched ones, [{"corpus", "install"}] for the others)."""
    from mppm_ext import data

    ok, missing = {}, []
    for name in names:
        try:
            ok[name] = data.load_corpus(name)
        except FileNotFoundError:
            missing.append({"corpus": name, "install": f"mppm setup {name}"})
    return ok, missing


def _checkpoint(loaded, dtype) -> dict:
    """What a reader needs to name the weights: the published checkpoint, file, package and dtype."""
    from mppm_ext.models.loading import TRAINED

    spec = TRAINED.get(loaded.name)
    if spec is None:
        return {"model": loaded.name, "weights": loaded.source, "dtype": str(dtype).replace("torch.", "")}
    return {"model": loaded.name, "checkpoint": spec.checkpoint, "file": spec.gguf, "package": spec.requirement,
            "dtype": str(dtype).replace("torch.", "")}


def _merge_results(results: list, cfg) -> object:
    """One ScanResult (one scan directory) from the per-model results of one corpus."""
    from dataclasses import replace

    from .engine import ScanResult

    merged = ScanResult(config=replace(cfg, models=tuple(m.label for r in results for m in r.models),
                                       controls=CONTROLS),
                        world=results[0].world, device=results[0].device, heldout=results[0].heldout)
    for r in results:
        merged.models += r.models
        merged.summary += r.summary
        merged.quantiles += r.quantiles
        merged.histograms += r.histograms
    return merged


def run_findings(out: Path, report: Path, *, models: Sequence[str], corpora: Sequence[str], window: int,
                 max_tokens: int, batch_size: int, progress: bool = True) -> Path:
    """Scan ``models`` on each fetched corpus of ``corpora`` with every control into ``out/scan/<corpus>``,
    then write the plots into ``out`` and the report to ``report``.

    Each model loads once and scans every corpus (loading a random 0.5B model takes about 8 s); a trained
    model's random twin is scanned right after it."""
    import torch

    from mppm_ext import models as M

    from .engine import ScanConfig, check_writable, run_scan
    from .output import write_outputs
    from .windows import split_windows

    names, skipped = _available(models)
    documents, missing = _corpora(corpora)
    if not names:
        raise ValueError(f"none of the models {list(models)} is installed")
    if not documents:
        raise ValueError(f"none of the corpora {list(corpora)} is fetched")
    started = time.perf_counter()
    scan_root = out / "scan"
    for corpus in documents:
        check_writable(scan_root / corpus)
    per_corpus: dict[str, list] = {c: [] for c in documents}
    heldout: dict[str, dict[str, list[int]]] = {c: {} for c in documents}
    checkpoints, configs = [], {}
    for name in names:
        loaded = M.load(name)
        group = [loaded] + ([M.random_twin(loaded)] if loaded.trained else [])
        checkpoints += [_checkpoint(m, torch.float32) for m in group]
        for corpus, docs in documents.items():
            cfg = ScanConfig(models=tuple(group), corpus=docs, window=window, max_tokens=max_tokens,
                             batch_size=batch_size, controls=tuple(c for c in CONTROLS if c != "random-twin"),
                             layers=LAYERS, progress=progress)
            configs[corpus] = cfg
            result = run_scan(cfg, scan_root / corpus, write=False)
            if result is None:  # a non-zero torchrun rank
                return report
            per_corpus[corpus].append(result)
            # The held-out tokens (the token-mean control's coverage), from the split the scan used.
            split = split_windows(loaded.tokenizer, docs, window, max_tokens=max_tokens, holdout=True)
            ids = sorted({t for w in split.heldout for t in w.tokens})
            for m in group:
                heldout[corpus][m.name] = ids
        del loaded, group
    for corpus, results in per_corpus.items():
        merged = _merge_results(results, configs[corpus])
        write_outputs(merged, scan_root / corpus)
        meta_path = scan_root / corpus / "metadata.json"
        meta = json.loads(meta_path.read_text())
        meta["args"]["corpus"] = corpus
        meta_path.write_text(json.dumps(meta, indent=2, default=str))
    run = {"corpora": list(documents), "missing_corpora": missing, "skipped": skipped, "checkpoints": checkpoints,
           "heldout_tokens": heldout, "elapsed_s": time.perf_counter() - started,
           "command": " ".join(["mppm", "findings", *sys.argv[2:]]) if sys.argv[1:2] == ["findings"] else None}
    (scan_root / RUN_FILE).write_text(json.dumps(run))
    return write_findings(scan_root, report, plots=out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("docs/findings"), help="tables and plots (default docs/findings)")
    p.add_argument("--report", type=Path, default=Path("docs/findings.md"), help="the report (default docs/findings.md)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_TRAINED + DEFAULT_RANDOM),
                   help="models to scan (default: the trained models that are installed, their twins, and "
                        f"{', '.join(DEFAULT_RANDOM)})")
    p.add_argument("--corpora", nargs="+", default=list(DEFAULT_CORPORA),
                   help=f"corpora, each scanned separately (default: those of {', '.join(DEFAULT_CORPORA)} that "
                        "are fetched)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per window (default {DEFAULT_WINDOW})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"scanned tokens per model and corpus (default {DEFAULT_MAX_TOKENS}; "
                        f"{LARGE_MAX_TOKENS} is the larger setting, about four times as long)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"windows per batch (default {DEFAULT_BATCH})")
    p.add_argument("--from-scan", type=Path, default=None,
                   help="only rewrite the report and plots from an existing findings scan directory "
                        "(OUT/scan; no model runs)")
    p.add_argument("--no-progress", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    if args.from_scan is not None:
        path = write_findings(args.from_scan, args.report, plots=args.out)
    else:
        path = run_findings(args.out, args.report, models=args.models, corpora=args.corpora, window=args.window,
                            max_tokens=args.max_tokens, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mppm_ext.scan.findings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
