"""The Python stages of bench/gpu_session.sh: the CUDA-graph capture check, the per-kernel profile, and the
summary that gathers every stage's results into the session's few files.

    python bench/session.py graph --impl cuda --out graph-cuda.json      # capture energy in a CUDA graph
    python bench/session.py profile --out profile.json                   # torch profiler, energy bf16
    python bench/session.py summary --work WORK --out OUT_DIR            # session.json, bench.csv, profile.csv

Without a CUDA device, ``graph`` and ``profile`` run the same code on the CPU as far as it goes (the
eager call; the profile of CPU ops), which is what the session's dry run does.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import mppm_ext
from mppm_ext.selftest import named_tensors
from ops_energy import token_stream

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(n: int, vocab: int, d: int, dtype: torch.dtype, device: str, seed: int = 0):
    """The bench's token stream (ops_energy) as one sequence: hidden [1, n, d], logits [1, n, vocab], ids [1, n]."""
    return tuple(x.unsqueeze(0) for x in token_stream(n, d, vocab, dtype, device, seed))


def _largest_difference(a, b) -> float:
    """The largest |a - b| over every floating tensor of two results (NaN where both are NaN counts 0)."""
    worst = 0.0
    other = dict(named_tensors(b))
    for name, x in named_tensors(a):
        if x.is_floating_point():
            diff = (x.double() - other[name].double()).abs()
            same = (x == other[name]) | (x.isnan() & other[name].isnan())
            worst = max(worst, float(torch.where(same, 0.0, diff).max()))
    return worst


def graph_check(impl: str, device: str, n: int, vocab: int, d: int, dtype: torch.dtype) -> dict:
    """Capture ``mppm_ext.energy(..., impl=impl, check=False)`` in a CUDA graph (check=False: nothing is read
    back to the host, which a capture forbids), replay it on new inputs written into the captured buffers,
    and compare with an eager, checked call on those inputs: the kernels are deterministic, so the replay
    must equal it bitwise. A capture that fails is recorded as the outcome, not raised."""
    record = {"impl": impl, "shape": {"N": n, "V": vocab, "d": d, "dtype": str(dtype)}, "captured": False}
    hidden, logits, tokens = _inputs(n, vocab, d, dtype, device)
    eager = mppm_ext.energy(hidden, logits, tokens, impl=impl)  # eager first: compiles, proves the call runs
    unchecked = mppm_ext.energy(hidden, logits, tokens, impl=impl, check=False)
    record["check_false_bitwise_equal_eager"] = _largest_difference(unchecked, eager) == 0.0
    if device != "cuda":
        record["outcome"] = "not run: CUDA graphs need a CUDA device (the eager calls ran)"
        return record
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graphs asks before a capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            mppm_ext.energy(hidden, logits, tokens, impl=impl, check=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = mppm_ext.energy(hidden, logits, tokens, impl=impl, check=False)
    except Exception as exc:
        message = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        record["outcome"] = f"capture failed: {type(exc).__name__}: {message}"
        return record
    record["captured"] = True
    fresh = _inputs(n, vocab, d, dtype, device, seed=1)
    for buffer, new in zip((hidden, logits, tokens), fresh):
        buffer.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = mppm_ext.energy(hidden, logits, tokens, impl=impl)
    record["max_abs_difference_vs_eager"] = _largest_difference(captured, expected)
    record["bitwise_equal_eager"] = record["max_abs_difference_vs_eager"] == 0.0
    graph.replay()  # a second replay on the same inputs: the same bits again
    torch.cuda.synchronize()
    record["replays_bitwise_equal"] = _largest_difference(captured, expected) == 0.0
    record["outcome"] = (f"captured and replayed on new inputs; largest difference from eager "
                         f"{record['max_abs_difference_vs_eager']:.3g}"
                         f"{' (bitwise equal)' if record['bitwise_equal_eager'] else ''}, replays "
                         f"{'bitwise equal' if record['replays_bitwise_equal'] else 'DIFFER'}")
    return record


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)))


def profile(device: str, impls: list[str], n: int, vocab: int, d: int, dtype: torch.dtype, calls: int) -> dict:
    """Per-kernel device times of ``energy`` (torch profiler) for each backend in ``impls``: kernel name,
    launches and microseconds per energy call, largest first. On the CPU, the CPU ops instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    hidden, logits, tokens = _inputs(n, vocab, d, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    out = {"shape": {"N": n, "V": vocab, "d": d, "dtype": str(dtype), "device": device}, "calls": calls, "impls": {}}
    for impl in impls:
        try:
            for _ in range(3):  # warm-up: compilation and allocator growth stay out of the profile
                mppm_ext.energy(hidden, logits, tokens, impl=impl)
        except Exception as exc:  # a backend missing here (say, no triton) is recorded, the others still run
            out["impls"][impl] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        sync()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(calls):
                mppm_ext.energy(hidden, logits, tokens, impl=impl)
            sync()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
        events = prof.key_averages()
        if device == "cuda":
            kernels = [e for e in events if e.device_type == DeviceType.CUDA and _device_us(e) > 0]
            kernels = kernels or [e for e in events if _device_us(e) > 0 and e.self_cpu_time_total == 0]
            rows = [{"kernel": e.key, "launches_per_call": e.count / calls, "us_per_call": _device_us(e) / calls}
                    for e in kernels]
        else:
            rows = [{"kernel": e.key, "launches_per_call": e.count / calls, "us_per_call": e.self_cpu_time_total / calls}
                    for e in events if e.self_cpu_time_total > 0]
        rows.sort(key=lambda r: -r["us_per_call"])
        total = sum(r["us_per_call"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["us_per_call"] / total
        out["impls"][impl] = {"wall_ms_per_call": wall_ms, "kernels": rows[:30]}
    return out


# ---- summary ----------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stages(work: Path) -> list[dict]:
    rows = []
    path = work / "stages.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            name, status, seconds, limit, note = (line.split("\t") + [""] * 5)[:5]
            rows.append({"stage": name, "status": status, "seconds": int(seconds or 0), "limit": int(limit or 0),
                         "note": note})
    return rows


def _environment(bench_env) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "mppm_ext": mppm_ext.__version__}
    try:
        env["build_info"] = mppm_ext.build_info()
    except Exception as exc:  # the build stage failed: say so, the rest still counts
        env["build_info"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    if bench_env:
        env["bench"] = bench_env
    return env


def summary(work: Path, out: Path, dry_run: bool) -> str:
    """Writes ``session.json`` (everything), ``bench.csv`` and ``profile.csv`` into ``out``; returns the short
    table the session prints last."""
    out.mkdir(parents=True, exist_ok=True)
    stages = _stages(work)
    bench_rows, bench_env = [], None
    for path in sorted(work.glob("bench-*/*.json")):
        data = _read_json(path) or {}
        bench_env = bench_env or data.get("environment")
        bench_rows += data.get("rows", [])
    selftest = _read_json(work / "selftest.json")
    graphs = [g for g in (_read_json(p) for p in sorted(work.glob("graph-*.json"))) if g]
    prof = _read_json(work / "profile.json")
    session = {"dry_run": dry_run, "environment": _environment(bench_env), "stages": stages, "selftest": selftest,
               "bench": bench_rows, "graph_capture": graphs, "profile": prof}
    (out / "session.json").write_text(json.dumps(session, indent=2) + "\n")
    if bench_rows:
        with (out / "bench.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(bench_rows[0]))
            writer.writeheader()
            writer.writerows(bench_rows)
    if prof:
        with (out / "profile.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["impl", "kernel", "launches_per_call", "us_per_call", "share"])
            for impl, data in prof["impls"].items():
                for r in data.get("kernels", []):
                    writer.writerow([impl, r["kernel"], r["launches_per_call"], f"{r['us_per_call']:.2f}", f"{r['share']:.3f}"])
    return _table(stages, selftest, bench_rows, graphs, prof)


def _table(stages, selftest, bench_rows, graphs, prof) -> str:
    lines = [f"{'stage':<14} {'status':<10} {'s':>5} {'limit':>5}  note", "-" * 72]
    lines += [f"{s['stage']:<14} {s['status']:<10} {s['seconds']:>5} {s['limit']:>5}  {s['note'][:100]}" for s in stages]
    if selftest:
        rows = selftest["rows"]
        bad = [r for r in rows if not r["ok"]]
        worst = max((r for r in rows if r["worst"]), key=lambda r: r["worst"]["ratio"], default=None)
        text = f"selftest: {len(rows)} checks, {len(bad)} disagree"
        if worst:
            text += (f"; largest error / allowed: {worst['backend']} {worst['op']} {worst['dtype']} "
                     f"{worst['worst']['name']} {worst['worst']['ratio']:.2f}")
        lines += ["", text] + [f"  DISAGREES: {r['backend']} {r['op']} {r['dtype']}: {r['failures'][0][:120]}" for r in bad]
    if bench_rows:
        lines += ["", f"{'bench case':<48} {'provider':<30} {'ms':>9} {'rate':>14} {'of ceiling':>10}"]
        for r in bench_rows:
            if r["provider"].startswith("mppm_ext") or r["provider"] == r["ceiling"]:
                rate = f"{r['tflop_per_s']:.1f} TFLOP/s" if r["flops"] else f"{r['gb_per_s']:.0f} GB/s"
                lines.append(f"{r['case'][:48]:<48} {r['provider'][:30]:<30} {r['median_ms']:>9.3f} {rate:>14} "
                             f"{r['fraction_of_ceiling']:>10.0%}")
    for g in graphs:
        lines.append(f"CUDA graph, energy impl={g['impl']}: {g['outcome'][:140]}")
    if prof:
        for impl, data in prof["impls"].items():
            if "error" in data:
                lines.append(f"profile {impl}: {data['error'][:140]}")
                continue
            top = data["kernels"][:3]
            kernels = "; ".join(f"{k['kernel'][:50]} {k['us_per_call']:.0f} us" for k in top)
            lines.append(f"profile {impl}: {data['wall_ms_per_call']:.2f} ms a call; top: {kernels}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("graph", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--n", type=int, default=4096 if name == "graph" else 32768, help="tokens")
        p.add_argument("--vocab", type=int, default=50257 if name == "graph" else 128256)
        p.add_argument("--hidden", type=int, default=768)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
        p.add_argument("--out", type=Path, required=True)
    sub.choices["graph"].add_argument("--impl", required=True, choices=["cuda", "triton", "cpp", "reference"])
    sub.choices["profile"].add_argument("--impls", nargs="+", default=None,
                                        help="default: cuda and triton on CUDA, cpp on the CPU")
    sub.choices["profile"].add_argument("--calls", type=int, default=5)
    p = sub.add_parser("summary")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "summary":
        print(summary(args.work, args.out, args.dry_run))
        return 0
    dtype = DTYPES[args.dtype]
    if args.command == "graph":
        try:
            result = graph_check(args.impl, args.device, args.n, args.vocab, args.hidden, dtype)
        except mppm_ext.BackendUnavailableError as exc:  # e.g. no triton on this machine: nothing to capture
            result = {"impl": args.impl, "captured": False, "outcome": f"not run: {exc}"}
    else:
        impls = args.impls or (["cuda", "triton"] if args.device == "cuda" else ["cpp"])
        result = profile(args.device, impls, args.n, args.vocab, args.hidden, dtype, args.calls)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
