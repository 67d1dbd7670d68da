"""``mppm scan`` and ``mppm report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

_DTYPES = ("float32", "bfloat16", "float16")


def _user_errors(command: str):
    """Run a command so that an error in the user's input (bad value, missing file or package) ends with
    one line on stderr and exit status 2 instead of a traceback."""

    def wrap(fn):
        def run(args: argparse.Namespace) -> int:
            from ._optional import MissingDependencyError

            try:
                return fn(args)
            except (ValueError, TypeError, FileNotFoundError, MissingDependencyError) as exc:
                print(f"mppm {command}: error: {exc}", file=sys.stderr)
                return 2

        run.__doc__ = fn.__doc__
        return run

    return wrap


def _layers(text: str) -> tuple:
    try:
        return tuple(x.strip() if x.strip() in ("mid", "final") else int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, 'final' or 'mid', "
                                         f"got {text!r}") from None


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    from .engine import CONTROLS

    p.add_argument("--model", action="append", required=True, metavar="NAME",
                   help="model to scan (repeatable): smollm2-135m, gemma3-270m, random:<family>-<size>, "
                        "a local Hugging Face directory or a .gguf path")
    p.add_argument("--corpus", required=True, help="corpus name (tiny, lee, sotu, moby-dick) or a text file")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--window", type=_at_least(3), default=256, help="tokens per window (default 256, at least 3)")
    p.add_argument("--max-tokens", type=_at_least(3), default=None,
                   help="scan at most this many tokens per model (default: the whole corpus)")
    p.add_argument("--batch-size", type=_at_least(1), default=8, help="windows per forward pass (default 8)")
    p.add_argument("--controls", nargs="*", choices=CONTROLS, default=[], metavar="CONTROL",
                   help=f"controls to add, any of: {', '.join(CONTROLS)}")
    p.add_argument("--layers", type=_layers, default=(),
                   help="other layers to scan as well, comma-separated, numbered as mppm_ext.models.layers (0 = "
                        "embeddings, i = after block i, -1 = last block before the final norm, 'final' = after it, "
                        "the base state) or 'mid' (state L // 2 of each model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default; per rank under torchrun)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="model weights dtype (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle control and of random twins")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@_user_errors("scan")
def run_scan_command(args: argparse.Namespace) -> int:
    import torch

    from .engine import ScanConfig, run_scan

    cfg = ScanConfig(models=tuple(args.model), corpus=args.corpus, window=args.window, max_tokens=args.max_tokens,
                     batch_size=args.batch_size, controls=tuple(dict.fromkeys(args.controls)),
                     layers=tuple(args.layers), device=args.device, dtype=getattr(torch, args.dtype), seed=args.seed,
                     progress=not args.no_progress)
    result = run_scan(cfg, args.out)
    if result is not None:
        print(f"scanned {len(result.models)} model(s) on {result.world} process(es); wrote {args.out}/summary.md")
    return 0


@_user_errors("findings")
def run_findings_command(args: argparse.Namespace) -> int:
    from .findings import run_command

    return run_command(args)


@_user_errors("report")
def run_report_command(args: argparse.Namespace) -> int:
    from .report import write_report

    paths = write_report(args.dir, args.out)
    print(f"wrote {len(paths)} files; summary: {paths['report']}")
    return 0


def register(subparsers) -> None:
    """Add ``scan``, ``report`` and ``findings`` to the ``mppm`` command."""
    from . import findings

    scan = subparsers.add_parser("scan", help="scan a corpus with one or more models",
                                 description="Stream a corpus through models in fixed windows and write per-token "
                                             "tables, a per-model summary and run metadata. Under torchrun "
                                             "(torchrun --nproc_per_node=N -m mppm_ext.scan ...) the windows are "
                                             "sharded across the processes.")
    add_scan_arguments(scan)
    scan.set_defaults(run=run_scan_command)
    report = subparsers.add_parser("report", help="plots and a Markdown summary of a scan directory")
    report.add_argument("dir", type=Path, help="directory written by `mppm scan`")
    report.add_argument("--out", type=Path, default=None, help="where to write (default: DIR)")
    report.set_defaults(run=run_report_command)
    found = subparsers.add_parser("findings", help="the reproduction report (docs/findings.md) from one scan",
                                  description=findings.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    findings.add_arguments(found)
    found.set_defaults(run=run_findings_command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The scan commands on their own, without the other packages' subcommands (``python -m mppm_ext.scan``
    runs ``scan``)."""
    parser = argparse.ArgumentParser(prog="mppm")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)
