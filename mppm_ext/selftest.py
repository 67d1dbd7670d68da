"""``mppm selftest``: every backend that can run on this machine against the float64 reference, on small
random inputs, for ``energy``, ``energy_from_hidden`` and ``steer_step`` in every input dtype.

The truth is the public API itself with ``impl="reference"`` on float64 copies of the inputs; the same
reference run on float32 copies of the same values sets the allowed error with the project's one rule
(:func:`compare`, also used by the test suite):

    |truth - ours| <= K * max|truth - float32 reference| + ATOL + RTOL * |truth|      (elementwise)

and the NaN/inf patterns must agree exactly. Every tensor of a result is compared (walked generically over
its dataclass fields, so outputs added later are covered without changes here). The reference's answers
go through the same compiled finish as the fused backends' twins do; the finish itself is checked against
the plain-PyTorch specification by the test suite.

    mppm selftest                  # table, exit status 1 on any disagreement
    mppm selftest --json out.json  # the rows as JSON too
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

import mppm_ext
from . import _dispatch

#: The tolerance rule (README, "Reliability"): K times the float32 reference's own worst error, plus a few
#: float32 ulps (ATOL, RTOL) for positions where the float32 reference happens to be exact.
K = 2.0
ATOL = 1e-6
RTOL = 2.5e-7

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("energy", "energy_from_hidden", "steer_step")
#: Disagreeing outputs printed per row (a wrong kernel usually breaks every output derived from it).
SHOWN = 4


@dataclass(frozen=True)
class Agreement:
    """One tensor of a backend's answer against the truth: the error at its worst element (the one
    closest to or furthest over its bound) and the bound there; ``problem`` says why it fails, or is None."""

    name: str
    error: float
    allowed: float
    problem: Optional[str] = None

    @property
    def ratio(self) -> float:
        return self.error / self.allowed if self.allowed > 0 else (0.0 if self.error == 0 else float("inf"))


def compare(ours: Tensor, ref: Tensor, truth: Tensor, name: str) -> Agreement:
    """``ours`` against ``truth`` (the float64 reference), ``ref`` (the float32 reference on the same input
    values) setting the bound. Floating tensors follow the rule of this module; others must be equal."""
    ours, ref, truth = ours.detach().cpu(), ref.detach().cpu(), truth.detach().cpu()
    if ours.shape != truth.shape:
        return Agreement(name, float("inf"), 0.0, f"shape {tuple(ours.shape)}, expected {tuple(truth.shape)}")
    if not truth.is_floating_point():
        if torch.equal(ours, truth):
            return Agreement(name, 0.0, 0.0)
        i = tuple((ours != truth).nonzero()[0].tolist())
        return Agreement(name, float("inf"), 0.0, f"{list(i)}: {ours[i].item()}, expected {truth[i].item()}")
    ours, ref, truth = ours.double(), ref.double(), truth.double()
    rounded = truth.float().double()
    # Where the float32 reference itself is not finite but the truth is, the value cannot be formed in
    # float32 (e.g. the CV of an entropy whose float32 terms all underflow to 0: 0 / 0): no bound exists
    # there, so those entries are not compared. Everywhere else the special values must agree exactly
    # (NaN where undefined, inf where float32 overflows) and the bound holds.
    ill = rounded.isfinite() & ~ref.isfinite()
    for what, pattern in (("NaN", Tensor.isnan), ("inf", Tensor.isinf)):
        if not torch.equal(pattern(ours) & ~ill, pattern(rounded)):
            i = tuple(((pattern(ours) & ~ill) != pattern(rounded)).nonzero()[0].tolist())
            return Agreement(name, float("inf"), 0.0, f"{what} pattern differs from the reference at {list(i)}: "
                                                     f"ours {ours[i].item():.9g}, truth {truth[i].item():.9g}")
    both_inf = ours.isinf() & rounded.isinf()
    if not torch.equal(ours[both_inf], rounded[both_inf]):
        return Agreement(name, float("inf"), 0.0, "infinities of different sign")
    finite = rounded.isfinite() & ~ill
    if not finite.any():
        return Agreement(name, 0.0, 0.0)
    ref_err = (ref - truth)[finite].abs().nan_to_num(float("inf")).max()
    bound = (K * ref_err + ATOL + RTOL * truth.abs())[finite]
    err = (ours - truth)[finite].abs()
    worst = int((err / bound).argmax())
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(finite.nonzero()[int(bad.nonzero()[0])].tolist())
        j = tuple(finite.nonzero()[worst].tolist())
        return Agreement(name, err[worst].item(), bound[worst].item(),
                         f"{list(i)}: ours {ours[i].item():.9g}, truth {truth[i].item():.9g}, error "
                         f"{(ours[i] - truth[i]).abs().item():.3g} > bound {bound[bad][0].item():.3g} (float32 "
                         f"reference error {ref_err.item():.3g}); {int(bad.sum())} elements fail, worst at {list(j)}")
    return Agreement(name, err[worst].item(), bound[worst].item())


def named_tensors(value, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside a result (dataclasses, mappings, tensors; None is skipped), with its path,
    e.g. ``stats.mean[log_energy]``."""
    if isinstance(value, Tensor):
        yield prefix, value
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from named_tensors(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from named_tensors(item, f"{prefix}[{key}]")


def compare_results(ours, ref, truth, *, skip: Sequence[str] = (), floating_only: bool = False) -> list[Agreement]:
    """:func:`compare` for every tensor of ``truth`` (a result dataclass) but those named in ``skip``;
    with ``floating_only`` the integer and bool tensors are left out."""
    ours_t, ref_t = dict(named_tensors(ours)), dict(named_tensors(ref))
    out = []
    for name, expected in named_tensors(truth):
        if name in skip or (floating_only and not expected.is_floating_point()):
            continue
        if name not in ours_t:
            out.append(Agreement(name, float("inf"), 0.0, "missing from the result"))
            continue
        out.append(compare(ours_t[name], ref_t.get(name, expected), expected, name))
    return out


@dataclass(frozen=True)
class Backend:
    """One backend to check: ``impl`` on ``device``, with the CPU kernels pinned to ``isa`` ("" for any)."""

    impl: str
    device: str
    isa: str = ""

    @property
    def label(self) -> str:
        return f"{self.impl} [{self.isa}]" if self.isa else self.impl


def backends() -> tuple[list[Backend], list[tuple[str, str]]]:
    """The backends this machine can run, and (backend, reason) for those it cannot."""
    runnable, skipped = [], []
    compiled = _dispatch.compiled_or_none()
    if compiled is None:
        skipped.append(("cpp", _dispatch.cpp_reason(torch.device("cpu"))))
    else:
        runnable += [Backend("cpp", "cpu", isa) for isa in mppm_ext.cpu_isas()]
    cuda = torch.device("cuda")
    if not torch.cuda.is_available():
        skipped.append(("cuda", "no CUDA device is visible to torch"))
        skipped.append(("triton", "CPU tensors run only in Triton's interpreter (no CUDA device is visible)"))
    else:
        for impl, why in (("cuda", _dispatch.cuda_reason(cuda)), ("triton", _dispatch.triton_reason(cuda, "triton"))):
            if why is None:
                runnable.append(Backend(impl, "cuda"))
            else:
                skipped.append((impl, why))
    runnable.append(Backend("reference", "cpu"))
    return runnable, skipped


# ---- the three ops: inputs (float32 values of the dtype), and one call of the public API ----------------

def _energy_inputs(g: torch.Generator, dtype: torch.dtype) -> tuple[dict, dict]:
    B, T, d, V = 2, 37, 19, 1003
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)  # spread like a trained model's logits
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0  # one left-padded sequence
    tokens = torch.randint(0, V, (B, T), generator=g)
    return {"hidden": hidden, "logits": logits}, {"tokens": tokens, "attention_mask": mask}


def _from_hidden_inputs(g: torch.Generator, dtype: torch.dtype) -> tuple[dict, dict]:
    B, T, d, V = 2, 23, 40, 517
    hidden = torch.randn(B, T, d, generator=g).to(dtype)
    weight = (2 * torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g)).to(dtype)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -4:] = 0  # one right-padded sequence
    tokens = torch.randint(0, V, (B, T), generator=g)
    return {"hidden": hidden, "weight": weight, "bias": bias}, {"tokens": tokens, "attention_mask": mask}


def _steer_inputs(g: torch.Generator, dtype: torch.dtype) -> tuple[dict, dict]:
    B, m, d, V = 3, 4, 33, 997
    hidden = torch.randn(B, d, generator=g).to(dtype)
    weight = (2 * torch.randn(V, d, generator=g) / d**0.5).to(dtype)
    targets = torch.stack([torch.randperm(V, generator=g)[:m] for _ in range(B)])
    # One linear Gauss-Newton step solved to rounding, no trust region: the answer is the float64 J^T u.
    options = {"targets": targets, "delta": torch.full((B, m), 0.3), "newton_steps": 1, "tol": 1e-12,
               "max_iter": 200, "max_step": 1e6}
    return {"hidden": hidden, "weight": weight}, options


def _call(op: str) -> Callable:
    # Looked up at call time, so that a patched public function is the one checked.
    if op == "energy":
        return lambda x, o, impl: mppm_ext.energy(x["hidden"], x["logits"], o["tokens"], impl=impl,
                                                  attention_mask=o["attention_mask"])
    if op == "energy_from_hidden":
        return lambda x, o, impl: mppm_ext.energy_from_hidden(x["hidden"], x["weight"], o["tokens"], bias=x["bias"],
                                                              attention_mask=o["attention_mask"], impl=impl)
    return lambda x, o, impl: mppm_ext.steer_step(x["hidden"], x["weight"], o["targets"], o["delta"], impl=impl,
                                                  **{k: v for k, v in o.items() if k not in ("targets", "delta")})


INPUTS = {"energy": _energy_inputs, "energy_from_hidden": _from_hidden_inputs, "steer_step": _steer_inputs}
#: steer_step: only the floating outputs are compared (iteration counts and flags depend on the CG's own
#: rounding), and not the CG's residual, which is rounding noise by construction at tol = 1e-12.
COMPARE = {"steer_step": {"skip": ("cg_residual",), "floating_only": True}}


@dataclass
class Row:
    """One (backend, op, dtype) check."""

    backend: str
    op: str
    dtype: str
    seconds: float
    agreements: list[Agreement]
    error: Optional[str] = None  # the backend raised

    @property
    def worst(self) -> Optional[Agreement]:
        return max(self.agreements, key=lambda a: a.ratio, default=None)

    @property
    def failures(self) -> list[str]:
        if self.error is not None:
            return [f"raised {self.error}"]
        return [f"{a.name}: {a.problem}" for a in self.agreements if a.problem is not None]

    def as_dict(self) -> dict:
        worst = self.worst
        return {"backend": self.backend, "op": self.op, "dtype": self.dtype, "seconds": self.seconds,
                "ok": not self.failures, "failures": self.failures,
                "worst": None if worst is None else {"name": worst.name, "error": worst.error,
                                                     "allowed": worst.allowed, "ratio": worst.ratio}}


def _on(device: str, values: dict) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()}


def check(op: str, dtype_name: str, backend_list: Sequence[Backend], seed: int) -> list[Row]:
    """Every backend of ``backend_list`` on one op and dtype, against the float64 truth."""
    g = torch.Generator().manual_seed(seed + 101 * OPS.index(op) + 7 * list(DTYPES).index(dtype_name))
    values, options = INPUTS[op](g, DTYPES[dtype_name])
    call = _call(op)
    truth = call({k: v.double() for k, v in values.items()}, options, "reference")
    ref = call({k: v.float() for k, v in values.items()}, options, "reference")
    rows = []
    default_isa = mppm_ext.build_info()["cpu_isa"] if any(b.isa for b in backend_list) else ""
    for backend in backend_list:
        inputs, opts = _on(backend.device, values), _on(backend.device, options)
        try:
            if backend.isa:
                mppm_ext.set_cpu_isa(backend.isa)
            t0 = time.perf_counter()
            ours = call(inputs, opts, backend.impl)
            if backend.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        except Exception as exc:  # a backend that raises on valid inputs is a disagreement, reported
            rows.append(Row(backend.label, op, dtype_name, 0.0, [], f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            if backend.isa:
                mppm_ext.set_cpu_isa(default_isa)
        rows.append(Row(backend.label, op, dtype_name, seconds, compare_results(ours, ref, truth, **COMPARE.get(op, {}))))
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width table: backend, op, dtype, the worst tensor's error / allowed, time."""
    head = f"{'backend':<20} {'op':<19} {'dtype':<5} {'worst error / allowed':>21} {'ratio':>6} {'of':<34} {'ms':>8}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        w = r.worst
        err = "-" if w is None else f"{w.error:.2e} / {w.allowed:.2e}"
        ratio = "-" if w is None else f"{w.ratio:.2f}"
        lines.append(f"{r.backend:<20} {r.op:<19} {r.dtype:<5} {err:>21} {ratio:>6} {('' if w is None else w.name):<34} "
                     f"{r.seconds * 1e3:>8.1f}  {'ok' if not r.failures else 'DISAGREES'}")
    return "\n".join(lines)


def run(ops: Sequence[str] = OPS, dtypes: Sequence[str] = tuple(DTYPES), seed: int = 0,
        out=sys.stdout) -> list[Row]:
    """Check every runnable backend; prints the skipped backends, then each op's rows as they finish."""
    runnable, skipped = backends()
    for impl, why in skipped:
        print(f"{impl}: skipped: {why}", file=out)
    rows = []
    for op in ops:
        for dtype_name in dtypes:
            rows += check(op, dtype_name, runnable, seed)
    return rows


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "selftest", help="check every backend on this machine against the float64 reference (run this first)",
        description="Runs energy, energy_from_hidden and steer_step on small random inputs with every backend "
                    "this machine has (cpp on each CPU instruction set, cuda and triton on a GPU, reference) in "
                    "each dtype, compares every output with the float64 reference, prints a table and exits "
                    "with status 1 if any backend disagrees.")
    add_arguments(p)
    p.set_defaults(run=execute)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="draws other random inputs")
    p.add_argument("--json", type=Path, help="also write the rows to this file")


def execute(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rows = run(args.ops, args.dtypes, args.seed)
    print(table(rows))
    failed = [r for r in rows if r.failures]
    for r in failed:
        for why in r.failures[:SHOWN]:
            print(f"DISAGREES: {r.backend} {r.op} {r.dtype}: {why}")
        if len(r.failures) > SHOWN:
            print(f"DISAGREES: {r.backend} {r.op} {r.dtype}: ... and {len(r.failures) - SHOWN} more outputs (--json lists all)")
    print(f"{len(rows)} checks, {len(failed)} disagree, {time.perf_counter() - t0:.1f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [r.as_dict() for r in rows], "rule": {"K": K, "atol": ATOL, "rtol": RTOL},
                                         "build_info": mppm_ext.build_info()}, indent=2) + "\n")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``mppm selftest`` as a function (``argv`` without the command name)."""
    parser = argparse.ArgumentParser(prog="mppm selftest")
    add_arguments(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
