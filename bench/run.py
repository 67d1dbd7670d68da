"""Speed of mppm_ext against the plain-PyTorch reference, torch.compile of it, and the memory floor.

    python bench/run.py                       # CPU, N=4096, V=50257, d=768, fp32 and bf16 logits
    python bench/run.py --device cuda --n 32768 --vocab 50257 128256

Prints a table last and writes JSON + CSV (device, versions, git SHA) to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

import mppm_ext
from mppm_ext import reference

sys.path.insert(0, str(Path(__file__).parent))
from harness import Report, measure  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def energy_providers(args, device: str) -> dict:
    """name -> (make_callable(hidden, logits, tokens), note). The first is the speed-up baseline."""
    providers = {
        "reference (eager)": (lambda h, z, x: lambda: reference.energy(h, z, x), ""),
        "torch.compile(reference)": (lambda h, z, x: _compiled(lambda: reference.energy(h, z, x)), ""),
    }
    if device == "cpu":
        for isa in (mppm_ext.cpu_isas() if args.all_isas else mppm_ext.cpu_isas()[:1]):
            providers[f"mppm_ext cpp [{isa}]"] = (_with_isa(isa), "")
    else:
        providers["mppm_ext cuda"] = (lambda h, z, x: lambda: mppm_ext.energy(h, z, x, impl="cuda"), "")
    return providers


def _with_isa(isa: str):
    def make(h, z, x):
        def call():
            mppm_ext.set_cpu_isa(isa)
            return mppm_ext.energy(h, z, x, impl="cpp")
        return call
    return make


def _compiled(fn):
    compiled = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    compiled()  # compile outside the timed region; its cost is reported in the note
    _compiled.last_compile_s = time.perf_counter() - t0
    return compiled


def bench_energy(args, report: Report) -> None:
    device = args.device
    default_isa = mppm_ext.build_info()["cpu_isa"]
    for dtype_name in args.dtypes:
        for vocab in args.vocab:
            dtype = DTYPES[dtype_name]
            g = torch.Generator(device="cpu").manual_seed(0)
            hidden = torch.randn(1, args.n, args.hidden, generator=g).to(device=device, dtype=dtype)
            logits = (3 * torch.randn(1, args.n, vocab, generator=g)).to(device=device, dtype=dtype)
            tokens = torch.randint(0, vocab, (1, args.n), generator=g).to(device)
            case = f"energy N={args.n} V={vocab} d={args.hidden} {dtype_name}"
            logits_bytes = logits.numel() * logits.element_size()
            needed = logits_bytes + hidden.numel() * hidden.element_size() + tokens.numel() * 8
            run = dict(device=device, warmup=args.warmup, repeats=args.repeats)
            print(f"[{case}]", flush=True)
            # Into a buffer that exists already: a fresh one would time page faults, not bandwidth.
            copy_dst = torch.empty_like(logits)
            copy = measure(case, "copy logits (ceiling)", lambda: copy_dst.copy_(logits), 2 * logits_bytes, **run)
            rows = [copy, measure(case, "read logits: sum() (floor)", lambda: logits.sum(), logits_bytes, **run)]
            for name, (make, note) in energy_providers(args, device).items():
                if name not in args.skip:
                    fn = make(hidden, logits, tokens)
                    if name.startswith("torch.compile"):
                        note = f"compile {_compiled.last_compile_s:.1f} s, not timed"
                    rows.append(measure(case, name, fn, needed, note=note, **run))
                    print(f"  {name}: {rows[-1].median_ms:.1f} ms", flush=True)
            ref = next((r for r in rows if r.provider == "reference (eager)"), None)
            for r in rows:
                r.fraction_of_copy = r.gb_per_s / copy.gb_per_s
                if ref is not None:
                    r.speedup_vs_reference = ref.median_ms / r.median_ms
            report.rows.extend(rows)
    if device == "cpu":
        mppm_ext.set_cpu_isa(default_isa)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--n", type=int, default=4096, help="tokens (one sequence)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="dtype of logits and hidden states")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--all-isas", action="store_true", help="time every CPU instruction set, not just the best")
    parser.add_argument("--skip", nargs="*", default=[], help="provider names to leave out")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    report = Report(device=args.device)
    bench_energy(args, report)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path, csv_path = report.write(args.out, f"energy-{args.device}-{stamp}")
    env = report.environment()
    print(f"\n{env['device']} | torch {env['torch']} | mppm_ext {env['mppm_ext']} @ {env['git_sha'][:12]}")
    print(f"results: {json_path} and {csv_path.name}\n")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
