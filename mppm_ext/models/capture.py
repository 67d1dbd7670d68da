"""Capture hidden states during one forward pass with hooks, keeping only the layers asked for (the
forward runs with ``output_hidden_states=False`` and no KV cache, so no per-layer list is ever built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import anatomy
from . import layers as layer_mod


@dataclass
class Captured:
    """hidden: layer -> [B, T, d] in the model's dtype, keyed by the layers as they were asked for (an int
    or ``"final"``); logits: [B, T, V] (the model's own output, model dtype) or None when not asked for."""

    hidden: dict
    logits: Optional[Tensor]


def capture(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *,
            layers: Sequence[layer_mod.LayerSpec] = (layer_mod.FINAL,), logits: bool = True) -> Captured:
    """Run ``model`` once (no grad) on ``input_ids`` [B, T] (int64; ``attention_mask`` [B, T], 1 = real token)
    and return the hidden states of ``layers``.

    Layers follow the package convention (:mod:`mppm_ext.models.layers`): ``0`` the embeddings, ``i`` the
    output of the i-th block, ``-1`` the last block's output (before the final norm), ``"final"`` the state
    that feeds the unembedding, so ``logits == hidden["final"] @ W.T + b`` with :func:`unembedding`.

    Why hooks and not ``output_hidden_states``: Hugging Face's last ``hidden_states`` entry is post-norm for
    some families and pre-norm for others, depending on the transformers version; the hooks read the state
    at a fixed place in every family. With ``logits=False`` only the decoder runs (no [B, T, V] tensor is
    made).
    """
    anatomy._check_model(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64 tensor [B, T], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                        f"{list(getattr(input_ids, 'shape', []))}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}")
    if isinstance(layers, (str, int)):
        raise TypeError(f"layers must be a sequence of layers such as ({layers!r},), got {layers!r}")
    refs = {layer: layer_mod.resolve(model, layer, name=f"layers[{i}]") for i, layer in enumerate(layers)}
    by_state: dict[layer_mod.LayerRef, Tensor] = {}
    hooks = []
    try:
        for ref in dict.fromkeys(refs.values()):  # one hook per distinct state (-1 and L are one)
            hooks.append(layer_mod.read_hook(model, ref, lambda state, ref=ref: by_state.__setitem__(ref, state)))
        with torch.no_grad():
            kwargs = dict(attention_mask=attention_mask, use_cache=False, output_hidden_states=False)
            if logits:
                out = model(input_ids, **kwargs).logits
            else:
                anatomy._decoder(model)(input_ids, **kwargs)
                out = None
    finally:
        for h in hooks:
            h.remove()
    return Captured(hidden={layer: by_state[ref] for layer, ref in refs.items()}, logits=out)
