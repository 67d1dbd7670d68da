"""Corpora: the shipped "tiny" corpus, user paths, fetched corpora (when fetched), and bad files."""

import json

import pytest

from mppm_ext import data
from mppm_ext.data import fetching


def test_tiny_ships_with_the_package():
    docs = data.load_corpus("tiny")
    assert len(docs) == 8
    assert docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert all(len(d) > 8000 for d in docs)
    assert data.load_corpus("tiny") == docs
    assert data.fetch("tiny").is_dir()


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("Call me Ishmael.\n\nSome years ago—never mind how long precisely.\n", encoding="utf-8")
    assert data.load_corpus(path) == [path.read_text(encoding="utf-8")]
    assert data.load_corpus(str(path)) == data.load_corpus(path)


def test_jsonl_one_document_per_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps("second") + "\n")
    assert data.load_corpus(path) == ["first", "second"]


def test_directory_of_text_files_in_name_order(tmp_path):
    for name, text in (("b.txt", "two"), ("a.txt", "one"), ("notes.md", "ignored")):
        (tmp_path / name).write_text(text)
    assert data.load_corpus(tmp_path) == ["one", "two"]


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b" \n\t\n", "empty"),
    (b"text\x00more", "NUL byte at offset 4"),
    (b"caf\xe9 latin-1", "not UTF-8 text"),
    (bytes(range(256)), "NUL byte"),
], ids=["empty", "whitespace", "nul", "latin1", "binary"])
def test_empty_or_binary_file_raises(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        data.load_corpus(path)
    assert str(path) in str(err.value)


def test_missing_path_names_the_path(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_corpus(path)


@pytest.mark.parametrize("lines, match", [("not json\n", "line 1 is not JSON"), ('{"title": 1}\n', "line 1"),
                                          ("\n\n", "empty")])
def test_bad_jsonl_raises(tmp_path, lines, match):
    path = tmp_path / "c.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=match):
        data.load_corpus(path)


def test_directory_without_text_files_raises(tmp_path):
    with pytest.raises(ValueError, match="no .txt files"):
        data.load_corpus(tmp_path)


def test_bad_names_and_types():
    with pytest.raises(ValueError, match="unknown corpus 'wikipedia'"):
        data.fetch("wikipedia")
    with pytest.raises(TypeError, match="name_or_path"):
        data.load_corpus(3)


def test_unfetched_corpus_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("MPPM_EXT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mppm setup sotu"):
        data.load_corpus("sotu")


def test_failing_package_client_raises_with_its_output():
    with pytest.raises(RuntimeError, match="is not installed"):
        fetching._run(["mppm-no-such-client"], what="test")
    with pytest.raises(RuntimeError, match=r"failed \(exit 3\): boom"):
        fetching._run(["sh", "-c", "echo boom >&2; exit 3"], what="test")


@pytest.mark.parametrize("name, count, first", [
    ("sotu", 233, "Fellow-Citizens of the Senate and House of Representatives"),
    ("moby-dick", 138, "ETYMOLOGY."),
    ("lee", 300, "Hundreds of people have been forced"),
])
def test_fetched_corpora(name, count, first):
    """Runs where `mppm setup` fetched the corpus (CI does); skipped otherwise."""
    if (fetching._folder(name) / ".complete").is_file() is False:
        pytest.skip(f"corpus {name!r} is not fetched (mppm setup {name})")
    docs = data.load_corpus(name)
    assert len(docs) == count
    assert docs[0].startswith(first)


def test_unusable_cache_directory_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MPPM_EXT_CACHE", str(blocker))
    with pytest.raises(OSError, match="a-file.*MPPM_EXT_CACHE to a writable directory"):
        data.fetch("lee")
