"""Optional dependencies of the scan (extras ``scan``: tqdm, pyarrow; ``plots``: matplotlib)."""

from __future__ import annotations

import importlib
import sys
from typing import Iterable


class MissingDependencyError(ImportError):
    """An optional package a command needs is not installed; the message says which extra holds it."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the optional package {module!r}, which is not importable ({exc}); "
            f"install it with: pip install 'mppm_ext[{extra}]'") from exc


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


_warned_tqdm = False


def progress(items: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """``items`` wrapped in a tqdm bar when ``enabled`` and tqdm is installed; without tqdm the scan runs
    without a bar and says once, on stderr, how to get one."""
    global _warned_tqdm
    if not enabled:
        return items
    if not available("tqdm"):
        if not _warned_tqdm:
            print("mppm scan: no progress bar (tqdm is not installed: pip install 'mppm_ext[scan]')", file=sys.stderr)
            _warned_tqdm = True
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit="batch", leave=False)
