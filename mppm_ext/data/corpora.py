"""Reading corpora into documents (``list[str]``), with clear errors for files that are not text."""

from __future__ import annotations

import json
from pathlib import Path


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``. FileNotFoundError names a missing path; ValueError a binary file (NUL
    bytes or invalid UTF-8) or an empty one (nothing but whitespace)."""
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {str(path)!r} does not exist")
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"corpus file {str(path)!r} holds a NUL byte at offset {nul}: "
                         "expected UTF-8 text, not a binary file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (invalid byte at offset {err.start})") from err
    if not text.strip():
        raise ValueError(f"corpus file {str(path)!r} is empty: expected text")
    return text


def documents_from_path(path: Path) -> list[str]:
    """Documents of a user corpus: a ``.txt`` (or any text) file is one document; a ``.jsonl`` file holds one
    per line (a JSON string or an object with a "text" field); a directory holds one per ``*.txt`` file,
    in name order."""
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"corpus directory {str(path)!r} holds no .txt files")
        return [read_text(f) for f in files]
    text = read_text(path)
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise ValueError(f"corpus file {str(path)!r} line {number} is not JSON: {err}") from err
        doc = item.get("text") if isinstance(item, dict) else item
        if not isinstance(doc, str):
            raise ValueError(f"corpus file {str(path)!r} line {number}: expected a JSON string or an object "
                             "with a string 'text' field")
        docs.append(doc)
    return _non_empty(docs, path)


def lines(path: Path) -> list[str]:
    """One document per non-blank line (the Lee corpus' layout)."""
    return _non_empty([line.strip() for line in read_text(path).splitlines()], path)


def _non_empty(docs: list[str], where: Path) -> list[str]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {str(where)!r} holds no non-empty document")
    return docs
