"""Cases for the backward of ``mppm_ext.energy_from_hidden``: one forward and backward of log p and the
entropy (the loss sum(log_prob) + sum(entropy) over the defined positions) with respect to the hidden states
and the unembedding, against the eager reference's autograd on the same inputs. The ceiling is the three
bare GEMMs any such backward needs (the logits h·Wᵀ, the gradients G·W and Gᵀ·h); the streaming path forms
the logits twice (forward and backward), so four GEMMs bound it."""

from __future__ import annotations

import torch

import mppm_ext
from harness import Case
from mppm_ext import reference
from ops_energy import backends, with_isa
from ops_linear import each_case


def _loss(result):
    return result.log_prob.nansum() + result.entropy.nansum()


def cases(args):
    device = args.device
    n, d = args.linear_n, args.linear_hidden
    for dtype_name, dtype, vocab, hidden, weight, tokens in each_case(args):
        hidden.requires_grad_()
        weight.requires_grad_()

        def step(forward):
            def call():
                hidden.grad = weight.grad = None
                _loss(forward()).backward()
                return hidden.grad
            return call

        providers = {"reference (eager)": lambda: step(lambda: reference.energy_from_hidden(hidden, weight, tokens))}
        for name, impl, isa in backends(device, args.all_isas):
            call = step(lambda impl=impl: mppm_ext.energy_from_hidden(hidden, weight, tokens, impl=impl))
            providers[name] = (lambda call=call, isa=isa: with_isa(isa, call) if isa else call)
        h2, w2 = hidden.detach()[0], weight.detach()
        z = torch.empty(n, vocab, device=device, dtype=dtype)
        g_h, g_w = torch.empty(n, d, device=device, dtype=dtype), torch.empty(vocab, d, device=device, dtype=dtype)

        def three_gemms():
            torch.mm(h2, w2.t(), out=z)
            torch.mm(z, w2, out=g_h)
            return torch.mm(z.t(), h2, out=g_w)

        yield Case(
            name=f"energy_from_hidden backward N={n} V={vocab} d={d} {dtype_name}",
            bytes_moved=2 * (n * d + vocab * d) * hidden.element_size(),
            flops=3 * 2 * n * vocab * d,
            ceiling=("three GEMMs h W^T, G W, G^T h (ceiling)", three_gemms),
            providers=providers,
        )
