"""Where fetched models and corpora live: ``$MPPM_EXT_CACHE``, default ``~/.cache/mppm_ext``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache directory (or a path inside it); created on first use. An OSError of the same kind says
    which directory could not be made and how to choose another."""
    root = Path(os.environ.get("MPPM_EXT_CACHE") or Path.home() / ".cache" / "mppm_ext").expanduser()
    path = root.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise type(err)(f"cache directory {str(path)!r} cannot be created ({err.strerror or err}); set "
                        "MPPM_EXT_CACHE to a writable directory") from err
    return path
