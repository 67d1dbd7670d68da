"""Where the parts the energy needs sit inside a Hugging Face causal LM: the unembedding, the modules between
the last block and the unembedding ("final norm"), and the blocks. Found through the generic accessors
(``get_output_embeddings``, ``get_decoder``) plus the few attribute names the supported families use."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

# Names of the final norm in the decoders of the supported families (Llama/Qwen2/Gemma3: norm, GPT-2: ln_f,
# GPT-NeoX: final_layer_norm, OPT: final_layer_norm, Phi: final_layernorm).
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
# Module lists of blocks (Llama & co: layers, GPT-2: h).
_BLOCK_NAMES = ("layers", "h")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module) or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"model must be a Hugging Face causal LM (nn.Module with get_output_embeddings), "
                        f"got {type(model).__name__}")


def _decoder(model) -> nn.Module:
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    # A module that is no Hugging Face model has no base_model: look for its blocks on itself (blocks() then
    # raises its clear error instead of an AttributeError).
    return decoder if decoder is not None else getattr(model, "base_model", model)


def unembedding(model) -> tuple[Tensor, Optional[Tensor]]:
    """(weight [V, d], bias [V] or None) of the model's output layer, so that
    ``logits = hidden @ weight.T + bias`` for the hidden state that feeds it (see :func:`capture`).

    The tensors are the model's own parameters (no copy; same dtype and device). Models that transform
    the logits further (Gemma-2's final soft-capping) raise ValueError: their logits are not this product.
    """
    _check_model(model)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ValueError(f"{type(model).__name__} has no output embedding (unembedding) layer")
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping={cap}); "
                         "they are not hidden @ weight.T + bias")
    return head.weight, getattr(head, "bias", None)


def final_chain(model) -> list[nn.Module]:
    """The modules applied between the last block's output and the unembedding, in order: the final
    norm and, for OPT-350m-style models, the projection ``project_out``. Empty when there are none."""
    _check_model(model)
    decoder = _decoder(model)
    # OPT nests its blocks and norm one level down (OPTModel.decoder).
    inner = getattr(decoder, "decoder", decoder)
    chain = [m for m in (getattr(inner, name, None) for name in _NORM_NAMES) if isinstance(m, nn.Module)][:1]
    project_out = getattr(inner, "project_out", None)
    if isinstance(project_out, nn.Module):
        chain.append(project_out)
    return chain


def final_norm(model) -> Optional[nn.Module]:
    """The module that maps the last block's output (the pre-norm state) to the state that feeds the
    unembedding: the final RMSNorm/LayerNorm, composed with OPT's ``project_out`` where present. None when
    the model has neither (post-LN OPT without a projection), in which case pre- and post-norm states agree."""
    chain = final_chain(model)
    if not chain:
        return None
    return chain[0] if len(chain) == 1 else nn.Sequential(*chain)


def blocks(model) -> nn.ModuleList:
    """The model's transformer blocks, in order."""
    _check_model(model)
    decoder = _decoder(model)
    inner = getattr(decoder, "decoder", decoder)
    for name in _BLOCK_NAMES:
        found = getattr(inner, name, None)
        if isinstance(found, nn.ModuleList):
            return found
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
