"""Cases for ``mppm_ext.steer_step``: one Gauss–Newton linearisation (one streaming pass over W and
the CG solve) against the reference, which forms J with autograd and solves with a float64
pseudo-inverse. Flops count the pass's two products (z = H W^T and P W), the ceiling is those two
GEMMs done bare."""

from __future__ import annotations

import torch

import mppm_ext
from harness import Case
from mppm_ext import reference
from ops_energy import backends, with_isa


def cases(args):
    device = args.device
    B, d, vocab = args.steer_batch, args.steer_hidden, args.steer_vocab
    for dtype_name in args.dtypes:
        dtype = args.dtype_map[dtype_name]
        g = torch.Generator(device="cpu").manual_seed(0)
        hidden = torch.randn(B, d, generator=g).to(device=device, dtype=dtype)
        weight = (torch.randn(vocab, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
        logits_buf = torch.empty(B, vocab, device=device, dtype=dtype)
        moments_buf = torch.empty(B, d, device=device, dtype=dtype)

        def two_gemms():
            torch.mm(hidden, weight.t(), out=logits_buf)
            return torch.mm(logits_buf, weight, out=moments_buf)

        for m in args.steer_targets:
            targets = torch.randint(0, vocab, (B, m), generator=g).to(device)
            gain = torch.full((B, m), 0.1, device=device)
            providers = {}
            # J by autograd costs m backward products with W per row: at m = 256, d = 2048 that is
            # about 3.4 TFLOP a call, minutes per call on a CPU; past the cap the reference is left out.
            if m <= args.steer_reference_max_targets:
                providers["reference (eager)"] = (lambda targets=targets, gain=gain: (
                    lambda: reference.steer_direction(hidden, weight, targets, gain)))
            for name, impl, isa in backends(device, args.all_isas):
                call = (lambda impl=impl, targets=targets, gain=gain:
                        mppm_ext.steer_step(hidden, weight, targets, gain, newton_steps=1, impl=impl))
                providers[name] = (lambda call=call, isa=isa: with_isa(isa, call) if isa else call)
            yield Case(
                name=f"steer_step B={B} m={m} V={vocab} d={d} {dtype_name}",
                bytes_moved=(B * d + vocab * d) * hidden.element_size(),
                flops=4 * B * vocab * d,
                ceiling=("two GEMMs H W^T, P W (ceiling)", two_gemms),
                providers=providers,
            )
