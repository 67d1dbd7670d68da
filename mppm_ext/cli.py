"""The ``mppm`` command. Each feature package adds its own subcommands through a ``register(subparsers)``
function, so this file only assembles them."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mppm", description="Momentum / point-perplexity mechanics of language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrations():
        register(sub)
    return parser


def _registrations():
    """The ``register`` function of every package that has subcommands (imported lazily: the heavy
    optional dependencies load only when a command runs)."""
    from .models import cli as models_cli
    from .scan import cli as scan_cli
    from .steering import cli as steering_cli

    return (models_cli.register, scan_cli.register, steering_cli.register)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
