"""The ``mppm`` command. Each feature package adds its own subcommands through a ``register(subparsers)``
function in its ``cli`` module, so this file only assembles them."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from . import selftest


#: Commands of the core install (torch alone), each module's ``register(subparsers)``.
CORE = {"selftest": selftest.register}
#: Feature packages with subcommands: (package, its commands, the extra that brings its dependencies).
FEATURES = (
    ("models", ("setup",), "models"),
    ("scan", ("scan", "report", "findings"), "scan,plots"),
    ("steering", ("steer-eval", "steer-bench"), "steer"),
    ("anomaly", ("anomaly-bench",), "scan,plots"),
)


def version_text() -> str:
    """One line: the package version and what its compiled module was built with (``build_info``)."""
    import mppm_ext

    try:
        info = mppm_ext.build_info()
    except Exception as exc:  # a source tree without its compiled module still answers --version
        return f"mppm_ext {mppm_ext.__version__} (compiled module unavailable: {exc})"
    cuda = (f"CUDA {info['cuda_runtime_version']} for architectures {info['cuda_architectures']}, "
            f"{info['cuda_device_count']} device(s) visible" if info["cuda"] else "built without CUDA")
    return (f"mppm_ext {info['version']} ({info['compiler']}; CPU instruction sets {'/'.join(info['cpu_isas_compiled'])}"
            f", using {info['cpu_isa']}; OpenMP {info['openmp'] or 'off'}; {cuda})")


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (build_info loads the compiled module)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mppm", description="Momentum / point-perplexity mechanics of language models.")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the package version and its build (compiler, CPU instruction sets, CUDA) and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in CORE.values():
        register(sub)
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
