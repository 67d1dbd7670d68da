"""The package's one layer convention: which residual-stream state a ``layer`` names, and hooks that read
that state or edit it during a forward pass. ``models.capture``, ``mppm scan --layers``,
``steering.steer_layer`` and ``steering.steered_generate`` all resolve their ``layer`` here.

A model with L transformer blocks has L + 1 residual-stream states, numbered as Hugging Face numbers
``output_hidden_states``:

- ``0``: the embeddings, i.e. the input of the first block (read with a forward pre-hook on it);
- ``i`` in ``1 .. L``: the output of the i-th block (block ``i - 1`` of the module list); ``L`` is the last
  block's output, *before* the final norm;
- negative ``i`` counts from the end over these L + 1 states: ``-1`` = ``L``, ``-2`` = ``L - 1``, ...,
  ``-(L + 1)`` = ``0``;
- ``"final"``: the state that feeds the unembedding, the output of :func:`anatomy.final_chain` (the final
  norm and OPT's ``project_out``), so ``logits = h_final @ W.T + b`` with :func:`anatomy.unembedding`. With
  no final chain (post-LN OPT without a projection) it is the state ``L``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import anatomy

FINAL = "final"

#: What a ``layer`` argument may be: an int (see the module docstring) or ``"final"``.
LayerSpec = Union[int, str]


@dataclass(frozen=True)
class LayerRef:
    """A validated layer of one model: ``index`` is the state number in ``0 .. num_blocks``, or None for
    ``"final"``. ``name`` is the canonical spelling (``"final"`` or the non-negative index as a string)."""

    index: Optional[int]
    num_blocks: int

    @property
    def is_final(self) -> bool:
        return self.index is None

    @property
    def name(self) -> str:
        return FINAL if self.index is None else str(self.index)


def valid_range(num_blocks: int) -> str:
    """The accepted values, in words, for a model of ``num_blocks`` blocks (for error messages and help)."""
    return f"an int in [{-num_blocks - 1}, {num_blocks}] (this model has {num_blocks} blocks) or {FINAL!r}"


def resolve(model: nn.Module, layer: Union[LayerSpec, "LayerRef"], *, name: str = "layer") -> LayerRef:
    """``layer`` (int or ``"final"``, see :mod:`mppm_ext.models.layers`) -> :class:`LayerRef` for ``model``
    (a LayerRef of a model with as many blocks passes through).

    Raises ValueError naming ``name`` and the valid range for bools, non-integers, other strings and
    out-of-range ints; TypeError when ``model`` is not a Hugging Face causal LM.
    """
    n = len(anatomy.blocks(model))
    if isinstance(layer, LayerRef):  # already resolved, possibly for another model
        if layer.num_blocks != n:
            raise ValueError(f"{name} was resolved for a model of {layer.num_blocks} blocks; this one has {n}")
        return layer
    if isinstance(layer, str) and layer == FINAL:
        return LayerRef(None, n)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -n - 1 <= layer <= n:
        raise ValueError(f"{name} must be {valid_range(n)}, got {layer!r}")
    return LayerRef(int(layer) % (n + 1), n)


def _site(model: nn.Module, ref: LayerRef) -> tuple[nn.Module, bool]:
    """(module, is_input): the state is the first input of ``module`` (state 0) or its output."""
    block_list = anatomy.blocks(model)
    if ref.index == 0:
        return block_list[0], True
    if ref.index is None:
        chain = anatomy.final_chain(model)
        if chain:
            return chain[-1], False
        return block_list[-1], False
    return block_list[ref.index - 1], False


def edit_hook(model: nn.Module, layer: Union[LayerRef, LayerSpec],
              fn: Callable[[Tensor], Optional[Tensor]]) -> RemovableHandle:
    """Register a hook that calls ``fn(state)`` with ``layer``'s state ``[B, T, d]`` (model dtype) at every
    forward pass; when ``fn`` returns a tensor, it replaces the state for the rest of the pass. Remove it
    with the returned handle's ``remove()``.

    Blocks return either a tensor or a tuple whose first element is the state; both are handled, and the
    other elements pass through unchanged. An out-of-place ``fn`` (e.g. :func:`add_at`) keeps the forward
    traceable by ``torch.func``.
    """
    module, is_input = _site(model, resolve(model, layer))
    if is_input:
        def pre_hook(mod, args, kwargs):
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def post_hook(mod, args, output):
        is_tuple = isinstance(output, (tuple, list))
        new = fn(output[0] if is_tuple else output)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if is_tuple else new

    return module.register_forward_hook(post_hook)


def read_hook(model: nn.Module, layer: Union[LayerRef, LayerSpec], fn: Callable[[Tensor], None]) -> RemovableHandle:
    """Register a hook that calls ``fn(state)`` with ``layer``'s state ``[B, T, d]`` at every forward pass
    and leaves the state as it is (``fn``'s return value is ignored)."""
    def observe(state: Tensor) -> None:
        fn(state)

    return edit_hook(model, layer, observe)


def add_at(state: Tensor, position: int, delta: Tensor) -> Tensor:
    """``state`` ``[B, T, d]`` with ``delta`` ``[B, d]`` added at ``position`` (in ``0 .. T-1``), out of place
    so that ``torch.func`` can differentiate through it; the result is in ``state``'s dtype."""
    at = torch.zeros(state.shape[1], 1, dtype=state.dtype, device=state.device)
    at[position] = 1.0
    return state + at * delta.to(state.dtype)[:, None, :]


__all__ = ["FINAL", "LayerSpec", "LayerRef", "resolve", "valid_range", "edit_hook", "read_hook", "add_at"]
