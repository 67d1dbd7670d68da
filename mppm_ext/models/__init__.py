"""Models for the scans, offline: trained models that PyPI packages ship as GGUF, random-weight models of
the paper's families built from configs in code, and the parts of a model the energy needs.

Public API:
    load(name, *, dtype=torch.float32, device="cpu", seed=0) -> LoadedModel
    random_twin(loaded, seed=0) -> LoadedModel
    unembedding(model) -> (weight [V, d], bias [V] | None)
    final_norm(model) -> nn.Module | None
    capture(model, input_ids, attention_mask=None, *, layers=("final",), logits=True) -> Captured
    layers.resolve(model, layer) -> LayerRef   (the layer convention every ``layer`` argument follows)
    setup(names=None, *, accept_gemma_terms=False) -> list[str]   (install models and corpora)

Needs the ``models`` extra (transformers, gguf, accelerate, safetensors).
"""

from .anatomy import final_norm, unembedding
from .capture import Captured, capture
from .install import setup
from .loading import TRAINED, LoadedModel, load, random_twin
from .registry import FAMILIES, random_names

__all__ = ["load", "random_twin", "unembedding", "final_norm", "capture", "Captured", "LoadedModel", "setup",
           "TRAINED", "FAMILIES", "random_names"]
