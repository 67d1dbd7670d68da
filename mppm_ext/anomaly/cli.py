"""``mppm anomaly-bench``: the anomaly-detection benchmark (see :mod:`mppm_ext.anomaly.bench`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("anomaly-bench", help="does the energy add to perplexity as an anomaly detector?",
                              description="Build six anomaly tasks offline (spliced spans, surprisal-matched "
                                          "splices, model samples at matched perplexity, repetition loops, "
                                          "instruction injections, shuffled spans), score them with the energy "
                                          "monitor's features and baselines on each model and its random twin, "
                                          "and write tasks.jsonl, results.json, results.csv, roc_<task>.png and "
                                          "report.md.")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="a model to score (repeatable; trained models get their random twin as a control); "
                        "default: the installed ones of smollm2-135m and gemma3-270m")
    p.add_argument("--quick", action="store_true", help="small sizes (20 per class and split, 48-token texts): "
                                                        "a first look in a few minutes")
    p.add_argument("--host", default=None, help="host corpus (default: sotu)")
    p.add_argument("--donor", action="append", default=None, metavar="CORPUS",
                   help="donor corpus (repeatable; default: moby-dick and lee)")
    p.add_argument("--n", type=int, default=None, help="positives (and negatives) per task and split")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..steering.cli import _check_out
    from .bench import DEFAULT, QUICK, run as run_bench

    settings = QUICK if args.quick else DEFAULT
    if args.n is not None:
        if args.n < 2:
            print(f"mppm anomaly-bench: --n must be >= 2, got {args.n}", file=sys.stderr)
            return 2
        settings = replace(settings, n=args.n)
    if args.host:
        settings = replace(settings, host=args.host)
    if args.donor:
        settings = replace(settings, donors=tuple(args.donor))
    try:
        _check_out(args.out)
        results = run_bench(args.out, args.model, settings, quick=args.quick, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"mppm anomaly-bench: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'report.md'}, results.json, results.csv, tasks.jsonl, roc_*.png "
          f"in {results['wall_s']:.0f} s")
    return 0
