"""Cases for ``mppm_ext.energy_from_hidden``: compute-bound (the W·h products), compared with a bare
GEMM of the same shape into a preallocated [N, V] buffer (the compute ceiling; the fused path never
stores that buffer)."""

from __future__ import annotations

import torch

import mppm_ext
from harness import Case
from mppm_ext import reference
from ops_energy import backends, compiled, with_isa
from peers import cut_cross_entropy, liger_fused_linear_cross_entropy, torch_linear_cross_entropy_chunked


def each_case(args):
    """Per dtype and vocabulary size: ``(dtype_name, dtype, vocab, hidden [1, n, d], weight [V, d],
    tokens [1, n])``, seeded."""
    n, d = args.linear_n, args.linear_hidden
    for dtype_name in args.dtypes:
        for vocab in args.vocab:
            dtype = args.dtype_map[dtype_name]
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = torch.randn(1, n, d, generator=g).to(device=args.device, dtype=dtype)
            weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(device=args.device, dtype=dtype)
            tokens = torch.randint(0, vocab, (1, n), generator=g).to(args.device)
            yield dtype_name, dtype, vocab, hidden, weight, tokens


def cases(args):
    device = args.device
    n, d = args.linear_n, args.linear_hidden
    for dtype_name, dtype, vocab, hidden, weight, tokens in each_case(args):
        gemm_out = torch.empty(n, vocab, device=device, dtype=dtype)
        h2, targets = hidden[0], tokens[0]
        notes: dict = {}

        def reference_call():
            return reference.energy_from_hidden(hidden, weight, tokens)

        providers = {
            "reference (eager)": lambda: reference_call,
            "torch.compile(reference)": lambda: compiled(reference_call, notes, "torch.compile(reference)"),
        }
        ours = backends(device, args.all_isas)
        for name, impl, isa in ours:
            call = (lambda impl=impl: mppm_ext.energy_from_hidden(hidden, weight, tokens, impl=impl))
            providers[name] = (lambda call=call, isa=isa: with_isa(isa, call) if isa else call)
            if dtype != torch.float32 and impl != "triton":
                # The opt-in 16-bit logits: the precision of the eager reference, at the 16-bit GEMM's speed.
                rounded = (lambda impl=impl: mppm_ext.energy_from_hidden(hidden, weight, tokens, impl=impl,
                                                                         logits_dtype=dtype))
                providers[f"{name}, logits_dtype={dtype_name}"] = (
                    lambda call=rounded, isa=isa: with_isa(isa, call) if isa else call)
        if device == "cuda" and dtype != torch.float32 and any(impl == "triton" for _, impl, _ in ours):
            # The fused kernel alone in each 16-bit tile shape (mppm_ext.triton.linear.TILES): whether two programs
            # a SM, each one's softmax under the other's HGMMAs, beat one wide program is measured here.
            from mppm_ext.triton import linear

            for tiles in linear.TILES:
                providers[f"triton kernel alone, {tiles} tiles"] = (
                    lambda tiles=tiles: lambda: linear.token_log_prob_from_hidden(h2, weight, None, targets, 1.0,
                                                                                 tiles))
        peers = {"torch linear_cross_entropy chunked (NLL only)": torch_linear_cross_entropy_chunked()}
        if device == "cuda":
            peers["Liger fused linear CE (NLL only)"] = liger_fused_linear_cross_entropy()
            peers["cut-cross-entropy (NLL only)"] = cut_cross_entropy()
        for name, peer in peers.items():
            if peer is not None:
                providers[name] = (lambda peer=peer: lambda: peer(h2, weight, targets))
        element = hidden.element_size()
        yield Case(
            name=f"energy_from_hidden N={n} V={vocab} d={d} {dtype_name}",
            bytes_moved=(n * d + vocab * d) * element + n * 8,
            flops=2 * n * vocab * d,
            ceiling=("GEMM h @ W.T (ceiling)", lambda: torch.mm(h2, weight.t(), out=gemm_out)),
            providers=providers, notes=notes,
        )
