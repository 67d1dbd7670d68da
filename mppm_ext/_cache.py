"""Where fetched models and corpora live: ``$MPPM_EXT_CACHE``, default ``~/.cache/mppm_ext``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache directory (or a path inside it); created on first use."""
    root = Path(os.environ.get("MPPM_EXT_CACHE") or Path.home() / ".cache" / "mppm_ext").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
