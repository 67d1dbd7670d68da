"""The ``mppm`` command. Each feature package adds its own subcommands through a ``register(subparsers)``
function in its ``cli`` module, so this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence


#: Feature packages with subcommands: (package, its commands, the extra that brings its dependencies).
FEATURES = (
    ("models", ("setup",), "models"),
    ("scan", ("scan", "report", "findings"), "scan,plots"),
    ("steering", ("steer-eval",), "steer"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mppm", description="Momentum / point-perplexity mechanics of language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for package, commands, _ in FEATURES:
        # Imported only here, so that the heavy optional dependencies load when the command line is built;
        # a package whose dependencies are missing still lists its commands, which then say what to install.
        try:
            module = importlib.import_module(f"{__package__}.{package}.cli")
        except ImportError as exc:
            for command in commands:
                _register_missing(sub, command, exc)
        else:
            module.register(sub)
    return parser


def _hint(command: str, exc: ImportError) -> str:
    extra = next(extra for _, commands, extra in FEATURES if command in commands)
    return f"needs the optional dependencies of mppm_ext[{extra}] (pip install 'mppm_ext[{extra}]'): {exc}"


def _register_missing(sub, command: str, exc: ImportError) -> None:
    parser = sub.add_parser(command, help=f"(unavailable: {_hint(command, exc)})", add_help=False)

    def run(args) -> int:
        raise exc

    parser.set_defaults(run=run, takes_any_arguments=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.run(args) or 0)
    except ImportError as exc:  # an optional dependency of this command is not installed
        print(f"mppm {args.command}: {_hint(args.command, exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
