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


def token_stream(n: int, d: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    """One stream of ``n`` tokens: hidden ``[n, d]``, logits ``[n, vocab]`` (std 3, like a trained model's)
    and ids ``[n]``, seeded. On CUDA they are drawn on the device: at N = 32768, V = 128256 the logits are
    4.2 G values, about a minute of the CPU's generator plus a 17 GB copy."""
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    logits = (3 * torch.randn(n, vocab, generator=g, device=device)).to(dtype)
    tokens = torch.randint(0, vocab, (n,), generator=g, device=device)
    return hidden, logits, tokens


def cases(args):
    device = args.device
    for dtype_name in args.dtypes:
        for vocab in args.vocab:
            dtype = args.dtype_map[dtype_name]
            flat_hidden, flat_logits, flat_tokens = token_stream(args.n, args.hidden, vocab, dtype, device)
            logits_bytes = flat_logits.numel() * flat_logits.element_size()
            needed = logits_bytes + flat_hidden.numel() * flat_hidden.element_size() + flat_tokens.numel() * 8
            # Into a buffer that exists already: a fresh one would time page faults, not bandwidth.
            copy_dst = torch.empty_like(flat_logits)
            for batch in args.batch:
                # The same tokens as `batch` sequences of n / batch (views: the bytes, and so the ceiling, stay).
                shape = (batch, args.n // batch)
                hidden, logits = flat_hidden.view(*shape, -1), flat_logits.view(*shape, -1)
                tokens = flat_tokens.view(shape)
                notes: dict = {}
                providers = {
                    "reference (eager)": lambda: lambda: reference.energy(hidden, logits, tokens),
                    "torch.compile(reference)": lambda: compiled(lambda: reference.energy(hidden, logits, tokens),
                                                                 notes, "torch.compile(reference)"),
                }
                for name, impl, isa in backends(device, args.all_isas):
                    call = (lambda impl=impl, hidden=hidden, logits=logits, tokens=tokens:
                            mppm_ext.energy(hidden, logits, tokens, impl=impl))
                    providers[name] = (lambda call=call, isa=isa: with_isa(isa, call) if isa else call)
                liger = liger_cross_entropy() if device == "cuda" else None
                if liger is not None:
                    rows, targets = flat_logits[:-1], flat_tokens[1:]
                    providers["Liger cross-entropy (NLL only)"] = lambda: lambda: liger(rows, targets)
                yield Case(
                    name=f"energy N={args.n} B={batch} V={vocab} d={args.hidden} {dtype_name}",
                    bytes_moved=needed, flops=0,
                    # The copy reads and writes the logits: its bytes are twice the logits.
                    ceiling=("copy logits (ceiling)", lambda: copy_dst.copy_(flat_logits)),
                    baselines={"read logits: sum() (floor)": lambda: flat_logits.sum()},
                    providers=providers, notes=notes,
                    bytes_of={"copy logits (ceiling)": 2 * logits_bytes, "read logits: sum() (floor)": logits_bytes},
                )
