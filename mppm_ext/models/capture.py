"""Capture hidden states during one forward pass with hooks, keeping only the layers asked for (the
forward runs with ``output_hidden_states=False`` and no KV cache, so no per-layer list is ever built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import anatomy


@dataclass
class Captured:
    """hidden: layer -> [B, T, d] in the model's dtype, keyed by the indices asked for; logits: [B, T, V]
    (the model's own output, model dtype) or None when not asked for."""

    hidden: dict[int, Tensor]
    logits: Optional[Tensor]


def _first_arg(args, kwargs) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, layers: Sequence[int] = (-1,),
            pre_norm: bool = False, logits: bool = True) -> Captured:
    """Run ``model`` once (no grad) on ``input_ids`` [B, T] (int64; ``attention_mask`` [B, T], 1 = real token)
    and return the hidden states of ``layers``.

    Layer indices: ``0`` is the input of the first block (the embeddings), ``i`` in ``1..L`` the residual
    stream after block ``i`` (before any final norm), negative ``i != -1`` counts from the end (``-2`` is
    block ``L-1``'s output). ``-1`` is special: the state that feeds the unembedding, i.e. after the final
    norm (and OPT's ``project_out``), so ``logits == hidden[-1] @ W.T + b`` with :func:`unembedding`; with
    ``pre_norm=True`` it is the input of :func:`final_norm` instead (= layer ``L``).

    Why hooks and not ``output_hidden_states``: Hugging Face's last ``hidden_states`` entry is post-norm for
    some families (GPT-2, Llama, Qwen2, Gemma3, GPT-NeoX, Phi) and pre-norm for others (OPT); the hooks
    read the state at a fixed place in every family. With ``logits=False`` only the decoder runs (no
    [B, T, V] tensor is made).
    """
    anatomy._check_model(model)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an int64 tensor [B, T], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                        f"{list(getattr(input_ids, 'shape', []))}")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {list(input_ids.shape)}, got "
                         f"{list(getattr(attention_mask, 'shape', [])) or type(attention_mask).__name__}")
    block_list = anatomy.blocks(model)
    n_blocks = len(block_list)
    hidden: dict[int, Tensor] = {}
    hooks = []
    wanted = list(dict.fromkeys(int(i) for i in layers))
    try:
        for layer in wanted:
            hooks.append(_hook(model, block_list, n_blocks, layer, pre_norm, hidden))
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
    return Captured(hidden={layer: hidden[layer] for layer in wanted}, logits=out)


def _hook(model, block_list, n_blocks: int, layer: int, pre_norm: bool, store: dict):
    if not -n_blocks - 1 <= layer <= n_blocks:
        raise ValueError(f"layers holds {layer}; this model has {n_blocks} blocks, so layers lie in "
                         f"[{-n_blocks - 1}, {n_blocks}]")
    if layer == -1:
        chain = anatomy.final_chain(model)
        if pre_norm and chain:
            return chain[0].register_forward_pre_hook(
                lambda m, args, kwargs: store.__setitem__(layer, _first_arg(args, kwargs)), with_kwargs=True)
        if chain:
            return chain[-1].register_forward_hook(lambda m, args, out: store.__setitem__(layer, out))
        layer_index = n_blocks
    else:
        layer_index = layer if layer >= 0 else n_blocks + 1 + layer
    if layer_index == 0:
        return block_list[0].register_forward_pre_hook(
            lambda m, args, kwargs: store.__setitem__(layer, _first_arg(args, kwargs)), with_kwargs=True)
    return block_list[layer_index - 1].register_forward_hook(
        lambda m, args, out: store.__setitem__(layer, _tensor(out)))
