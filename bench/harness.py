"""Timing, memory and reporting shared by every benchmark in bench/: one provider = one callable."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass
class Row:
    """One provider's measurement of one case. ``ceiling`` names the row of the same case whose rate
    this provider is compared with: a measured copy for memory-bound ops (GB/s), a bare GEMM for
    compute-bound ones (TFLOP/s)."""

    case: str
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes_moved: int
    gb_per_s: float
    flops: int = 0
    tflop_per_s: Optional[float] = None
    ceiling: str = ""
    fraction_of_ceiling: Optional[float] = None
    speedup_vs_reference: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    note: str = ""

    def rate(self) -> float:
        """The rate compared with the ceiling: TFLOP/s when the case counts flops, else GB/s."""
        return self.tflop_per_s if self.flops else self.gb_per_s


@dataclass
class Case:
    """One benchmark case: the providers to time on the same inputs.

    ``ceiling`` and ``baselines`` are timed first; every provider's rate is divided by the ceiling's
    and its time compared with the provider named ``reference`` (when it ran)."""

    name: str
    bytes_moved: int
    flops: int
    ceiling: tuple[str, Callable[[], object]]
    providers: dict[str, Callable[[], Callable[[], object]]]
    baselines: dict[str, Callable[[], object]] = field(default_factory=dict)
    reference: str = "reference (eager)"
    notes: dict[str, Callable[[], str]] = field(default_factory=dict)
    # Bytes that a ceiling or baseline moves when they differ from the providers' (a copy reads and writes).
    bytes_of: dict[str, int] = field(default_factory=dict)


def run_case(case: Case, device: str, warmup: int, repeats: int, skip: list[str]) -> list[Row]:
    """Time every provider of ``case``. A provider is a factory (setup outside the timed region, e.g.
    torch.compile) returning the callable to time; one that raises is reported, not fatal."""
    run = dict(device=device, warmup=warmup, repeats=repeats)
    ceiling_name, ceiling_fn = case.ceiling
    ceiling = measure(case.name, ceiling_name, ceiling_fn, case.bytes_of.get(ceiling_name, case.bytes_moved),
                      flops=case.flops, **run)
    rows = [ceiling] + [measure(case.name, name, fn, case.bytes_of.get(name, case.bytes_moved), flops=case.flops,
                                **run) for name, fn in case.baselines.items()]
    for name, make in case.providers.items():
        if any(pattern in name for pattern in skip):
            continue
        try:
            fn = make()
            rows.append(measure(case.name, name, fn, case.bytes_moved, flops=case.flops, **run))
        except Exception as exc:  # a peer that cannot run these inputs is a finding, not a crash
            print(f"  {name}: failed ({type(exc).__name__}: {exc})", flush=True)
            continue
        rows[-1].note = case.notes[name]() if name in case.notes else ""
        print(f"  {name}: {rows[-1].median_ms:.2f} ms", flush=True)
    ref = next((r for r in rows if r.provider == case.reference), None)
    for r in rows:
        r.ceiling = ceiling_name
        r.fraction_of_ceiling = r.rate() / ceiling.rate()
        if ref is not None:
            r.speedup_vs_reference = ref.median_ms / r.median_ms
    return rows


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_call(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> list[float]:
    """Seconds per call. CUDA work is timed with events after warm-up; CPU with perf_counter."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn: Callable[[], object], device: str) -> Optional[float]:
    """Memory a call needs beyond what exists before it: exact on CUDA (allocator statistics);
    on CPU the resident set is sampled every 0.5 ms, which can miss short spikes (Linux only)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return None
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(5e-4)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    fn()
    done.set()
    sampler.join()
    return max(0, peak[0] - base) / 2**20


def measure(case: str, provider: str, fn: Callable[[], object], bytes_moved: int, device: str,
            warmup: int, repeats: int, flops: int = 0, note: str = "") -> Row:
    times = time_call(fn, device, warmup, repeats)
    median = statistics.median(times)
    return Row(case=case, provider=provider, median_ms=median * 1e3, p20_ms=_quantile(times, 0.2) * 1e3,
               p80_ms=_quantile(times, 0.8) * 1e3, bytes_moved=bytes_moved, gb_per_s=bytes_moved / median / 1e9,
               flops=flops, tflop_per_s=flops / median / 1e12 if flops else None,
               peak_extra_mb=peak_extra_mb(fn, device), note=note)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass
class Report:
    device: str
    rows: list[Row] = field(default_factory=list)

    def environment(self) -> dict:
        import mppm_ext

        env = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(self.device),
            "git_sha": git_sha(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mppm_ext": mppm_ext.__version__,
            "build_info": mppm_ext.build_info(),
        }
        if self.device == "cuda":
            env["cuda"] = torch.version.cuda
            env["driver"] = _nvidia_driver()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        return env

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
        json_path.write_text(json.dumps({"environment": self.environment(),
                                         "rows": [asdict(r) for r in self.rows]}, indent=2) + "\n")
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(self.rows[0]).keys()))
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.rows)
        return json_path, csv_path

    def table(self) -> str:
        head = (f"{'case':<44} {'provider':<46} {'median ms':>10} {'p20':>9} {'p80':>9} {'rate':>13} "
                f"{'of ceiling':>10} {'vs ref':>8} {'extra MB':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            rate = f"{r.tflop_per_s:.2f} TFLOP/s" if r.flops else f"{r.gb_per_s:.1f} GB/s"
            frac = f"{r.fraction_of_ceiling:.0%}" if r.fraction_of_ceiling is not None else "-"
            speed = f"{r.speedup_vs_reference:.2f}x" if r.speedup_vs_reference is not None else "-"
            mem = f"{r.peak_extra_mb:.0f}" if r.peak_extra_mb is not None else "-"
            lines.append(f"{r.case:<44} {r.provider:<46} {r.median_ms:>10.2f} {r.p20_ms:>9.2f} {r.p80_ms:>9.2f} "
                         f"{rate:>13} {frac:>10} {speed:>8} {mem:>9}")
        return "\n".join(lines)


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
