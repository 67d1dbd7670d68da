"""Cases for ``mppm_ext.energy`` (from logits): memory-bound, compared with a measured copy."""

from __future__ import annotations

import time

import torch

import mppm_ext
from harness import Case
from mppm_ext import reference
from peers import liger_cross_entropy


def compiled(fn, notes: dict, name: str):
    """``torch.compile(fn)``, compiled (and its first call made) outside the timed region."""
    fn = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    notes[name] = lambda: f"compile {seconds:.1f} s, not timed"
    return fn


def with_isa(isa: str, fn):
    def call():
        mppm_ext.set_cpu_isa(isa)
        return fn()
    return call


def backends(device: str, all_isas: bool) -> list[tuple[str, str, str]]:
    """(provider name, impl, CPU ISA or "") for every mppm_ext backend that can run on ``device``."""
    if device == "cpu":
        isas = mppm_ext.cpu_isas() if all_isas else mppm_ext.cpu_isas()[:1]
        rows = [(f"mppm_ext cpp [{isa}]", "cpp", isa) for isa in isas]
    else:
        rows = [("mppm_ext cuda", "cuda", "")]
    try:
        from mppm_ext.triton import unavailable_reason
    except ImportError:
        return rows
    if unavailable_reason(torch.device(device)) is None:
        rows.append(("mppm_ext triton", "triton", ""))
    return rows


def cases(args):
    device = args.device
    for dtype_name in args.dtypes:
        for vocab in args.vocab:
            dtype = args.dtype_map[dtype_name]
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = torch.randn(1, args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
            logits = (3 * torch.randn(1, args.n, vocab, generator=g)).to(device=device, dtype=dtype)
            tokens = torch.randint(0, vocab, (1, args.n), generator=g).to(device)
            logits_bytes = logits.numel() * logits.element_size()
            needed = logits_bytes + hidden.numel() * hidden.element_size() + tokens.numel() * 8
            # Into a buffer that exists already: a fresh one would time page faults, not bandwidth.
            copy_dst = torch.empty_like(logits)
            notes: dict = {}
            providers = {
                "reference (eager)": lambda: lambda: reference.energy(hidden, logits, tokens),
                "torch.compile(reference)": lambda: compiled(lambda: reference.energy(hidden, logits, tokens),
                                                             notes, "torch.compile(reference)"),
            }
            for name, impl, isa in backends(device, args.all_isas):
                call = (lambda impl=impl: mppm_ext.energy(hidden, logits, tokens, impl=impl))
                providers[name] = (lambda call=call, isa=isa: with_isa(isa, call) if isa else call)
            liger = liger_cross_entropy() if device == "cuda" else None
            if liger is not None:
                rows, targets = logits[0, :-1], tokens[0, 1:]
                providers["Liger cross-entropy (NLL only)"] = lambda: lambda: liger(rows, targets)
            yield Case(
                name=f"energy N={args.n} V={vocab} d={args.hidden} {dtype_name}",
                bytes_moved=needed, flops=0,
                # The copy reads and writes the logits: its bytes are twice the logits.
                ceiling=("copy logits (ceiling)", lambda: copy_dst.copy_(logits)),
                baselines={"read logits: sum() (floor)": lambda: logits.sum()},
                providers=providers, notes=notes,
                bytes_of={"copy logits (ceiling)": 2 * logits_bytes, "read logits: sum() (floor)": logits_bytes},
            )
