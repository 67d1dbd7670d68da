"""Registers, spills, shared memory and SASS of every Triton kernel, compiled ahead of time for sm_90.

    python bench/triton_aot.py                                      # every kernel, every specialisation
    python bench/triton_aot.py --out bench/results/triton-sm_90.txt # the report into a file as well
    python bench/triton_aot.py --only energy cg                     # kernels whose label starts so

No GPU is needed: ``triton.compile`` takes an ``ASTSource`` and a ``GPUTarget("cuda", 90, 32)`` and runs
Triton's own ptxas (the wheel ships it, with cuobjdump, under ``triton/backends/nvidia/bin``). Each
specialisation is the one the package's launcher picks at a stated shape: the constexprs and launch options
are read from the launchers' own tables and functions (``energy._BLOCK_V``, ``linear._config``, ...), not
copied, and an integer argument is marked 16-divisible exactly when its value at that shape is, as
Triton's JIT marks it at a launch. Per specialisation the report gives ptxas's registers, stack frame and
spill bytes, Triton's shared memory, the programs a SM holds at once (from those two), the instruction
count of the SASS with its tensor-core (HGMMA / HMMA), local-memory (LDL / STL: spills) and fp64
instructions, and for the energy kernel the instructions of its body loop per element (the loop found as
bench/sass_loop.py finds the CUDA kernel's: the backward branch whose body holds four 128-bit loads).

A developer tool, not part of the tests (python_tests/test_triton_compiles.py is the CI check that every
kernel compiles).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import sass_loop  # noqa: E402

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass
class Spec:
    """One specialisation: a kernel, its argument types, the integer arguments' values at the stated shape
    (for Triton's divisibility-by-16 marks), its constexprs and launch options."""

    label: str
    kernel: object
    types: dict
    values: dict
    constexprs: dict
    options: dict
    loop_elements: int = 0  # elements per thread per iteration of a body loop to count (0: none)
    notes: list = field(default_factory=list)


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def energy_specs(T: int = 32768, V: int = 50257, d: int = 2048) -> list[Spec]:
    from mppm_ext.triton import energy

    out = []
    for dt in ("bf16", "fp16", "fp32"):
        block_v = energy._BLOCK_V[_torch_dtype(dt)]
        vec = energy._VEC[_torch_dtype(dt)]
        types = dict(hidden_ptr=PTR[dt], logits_ptr=PTR[dt], labels_ptr="*i64", real_ptr="*u8", scored_ptr="*u8",
                     out_ptr="*fp64", T="i32", V="i32", D="i32", plane="i32", inv_temperature="fp64", h_sb="i64",
                     h_st="i32", l_sb="i64", l_st="i32", lab_sb="i32", lab_st="i32", real_sb="i32", real_st="i32",
                     sc_sb="i32", sc_st="i32")
        values = dict(T=T, V=V, D=d, plane=8 * T, h_sb=T * d, h_st=d, l_sb=T * V, l_st=V, lab_sb=T, lab_st=1,
                      real_sb=T, real_st=1, sc_sb=T, sc_st=1)
        out.append(Spec(f"energy {dt} logits (B=8, T={T}, V={V}, d={d})", energy._energy_kernel, types, values,
                        dict(VEC=vec, LANES=block_v // (energy._ROWS * vec), ROWS=energy._ROWS,
                             BLOCK_D=energy._BLOCK_D, FTZ=True),
                        dict(num_warps=energy._NUM_WARPS),
                        loop_elements=block_v // (32 * energy._NUM_WARPS)))
    return out


def _linear_constexprs(linear, cfg: dict, compute, has_bias: bool) -> dict:
    from mppm_ext.triton._dot import dot_precision, tl_dtype

    return dict(HAS_BIAS=has_bias, COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"])


def linear_specs(V: int = 50257, d: int = 2048) -> list[Spec]:
    from mppm_ext.triton import linear

    out = []
    # energy_from_hidden at the target shape (N = 8192 rows), each operand dtype, no bias (lm_head).
    n = 8192
    for dt in ("bf16", "fp16", "fp32"):
        compute = _torch_dtype(dt)
        types = dict(hidden_ptr=PTR[dt], weight_ptr=PTR[dt], bias_ptr=PTR[dt], targets_ptr="*i64", m_ptr="*fp32",
                     s_ptr="*fp64", u_ptr="*fp64", picked_ptr="*fp32", N="i32", V="i32", D="i32", h_sn="i32",
                     w_sv="i32", tiles_per_split="i32", inv_temperature="fp64")
        for tiles in linear.TILES if dt != "fp32" else ("wide",):  # fp32 has one tile shape
            cfg = linear._config(n, V, compute, tiles=tiles)
            values = dict(N=n, V=V, D=d, h_sn=d, w_sv=d, tiles_per_split=cfg["tiles_per_split"])
            label = f"{tiles} tiles, " if dt != "fp32" else ""
            out.append(Spec(f"token_log_prob {dt} (N={n}, V={V}, d={d}; {label}{cfg['splits']} splits)",
                            linear._token_log_prob_kernel, types, values,
                            _linear_constexprs(linear, cfg, compute, False),
                            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    cfg = linear._config(n, V, _torch_dtype("bf16"))
    out.append(Spec(f"token_log_prob_combine ({cfg['splits']} splits)", linear._token_log_prob_combine_kernel,
                    dict(m_ptr="*fp32", s_ptr="*fp64", u_ptr="*fp64", picked_ptr="*fp32", out_ptr="*fp64", N="i32",
                         inv_temperature="fp64"), dict(N=n), dict(SPLITS=cfg["splits"], BLOCK=256),
                    dict(num_warps=4)))
    # The steering solver's moments pass: a few rows, float32 states (fp32 products) or 16-bit states.
    b = 8
    for h_dt, w_dt in (("fp32", "bf16"), ("bf16", "bf16")):
        compute = _torch_dtype("fp32" if h_dt != w_dt else h_dt)
        cfg = linear._config(b, V, compute, moments=True)
        types = dict(hidden_ptr=PTR[h_dt], weight_ptr=PTR[w_dt], bias_ptr=PTR[w_dt], m_ptr="*fp32", s_ptr="*fp64",
                     acc_ptr="*fp32", B="i32", V="i32", D="i32", h_sb="i32", w_sv="i32", tiles_per_split="i32",
                     inv_temperature="fp64")
        values = dict(B=b, V=V, D=d, h_sb=d, w_sv=d, tiles_per_split=cfg["tiles_per_split"])
        out.append(Spec(f"softmax_moments h {h_dt}, W {w_dt} (B={b}, V={V}, d={d}; {cfg['splits']} splits)",
                        linear._softmax_moments_kernel, types, values, _linear_constexprs(linear, cfg, compute, False),
                        dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    cfg = linear._config(b, V, _torch_dtype("fp32"), moments=True)
    out.append(Spec(f"softmax_moments_combine ({cfg['splits']} splits)", linear._softmax_moments_combine_kernel,
                    dict(m_ptr="*fp32", s_ptr="*fp64", acc_ptr="*fp32", lse_ptr="*fp64", wbar_ptr="*fp32", B="i32",
                         D="i32", inv_temperature="fp64"), dict(B=b, D=d), dict(SPLITS=cfg["splits"], BLOCK_D=256),
                    dict(num_warps=4)))
    return out


def cg_specs(d: int = 2048) -> list[Spec]:
    from mppm_ext.triton import cg
    from mppm_ext.triton._dot import dot_precision, tl_dtype

    out = []
    compute = _torch_dtype("fp32")  # the steering solver hands the CG float32 rows (steering/cg.py)
    for m in (16, 32, 64, cg.MAX_TARGETS):
        m_pad, options = cg.launch_config(m)
        types = dict(g_ptr="*fp32", rhs_ptr="*fp64", u_ptr="*fp32", iters_ptr="*i32", residual_ptr="*fp32", m="i32",
                     D="i32", g_sb="i32", g_sm="i32", rhs_sb="i32", lam="fp64", tol2="fp64", max_iter="i32")
        values = dict(m=m, D=d, g_sb=m * d, g_sm=d, rhs_sb=m, max_iter=m)
        out.append(Spec(f"cg fp32 G (m={m}, d={d})", cg._cg_kernel, types, values,
                        dict(COMPUTE=tl_dtype(compute), PRECISION=dot_precision(compute), M_PAD=m_pad,
                             BLOCK_D=cg.BLOCK_D), options))
    return out


def compile_spec(spec: Spec):
    """(compiled kernel, ptxas log) of one specialisation for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.types)
    aligned = [k for k, t in spec.types.items() if t.startswith("*") or spec.values.get(k, 1) % 16 == 0]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's log with dump_ptxas_log
        kernel = triton.compile(ASTSource(fn=spec.kernel, signature=spec.types, constexprs=spec.constexprs,
                                          attrs=attrs), target=GPUTarget("cuda", 90, 32), options=spec.options)
    return kernel, log.getvalue()


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """Programs an sm_90 SM holds at once: 64 K registers, allotted a warp at a time in multiples of 8 a
    thread; 228 KiB of shared memory, 1 KiB of it reserved a program; 64 warps; 32 programs."""
    by_registers = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    by_shared = 228 * 1024 // (shared + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def report(spec: Spec, kernel, ptxas_log: str, workdir: Path) -> dict:
    regs = PTXAS_REGS.search(ptxas_log)
    frame = PTXAS_FRAME.search(ptxas_log)
    cubin = workdir / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([sass_loop.cuobjdump(), "--dump-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    instructions = next(iter(sass_loop.functions(sass).values()))
    ops = collections.Counter(sass_loop.opcode(t) for _, t in instructions)
    row = dict(label=spec.label, registers=int(regs.group(1)) if regs else None,
               stack=int(frame.group(1)) if frame else None, spill_stores=int(frame.group(2)) if frame else None,
               spill_loads=int(frame.group(3)) if frame else None, shared=kernel.metadata.shared,
               warps=spec.options.get("num_warps", 4), stages=spec.options.get("num_stages"),
               maxnreg=spec.options.get("maxnreg"),
               constexprs={k: getattr(v, "name", v) for k, v in spec.constexprs.items()},
               sass=len(instructions), mma=ops["HGMMA"] + ops["HMMA"], mma_kind="HGMMA" if ops["HGMMA"] else
               ("HMMA" if ops["HMMA"] else "-"), local=ops["LDL"] + ops["STL"],
               fp64=sum(n for op, n in ops.items() if op in ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX")))
    if row["registers"] is not None:
        row["per_sm"] = programs_per_sm(row["registers"], row["warps"], row["shared"])
    if spec.loop_elements:
        body = sass_loop.main_loop(instructions)
        loop_ops = collections.Counter(sass_loop.opcode(t) for _, t in body)
        row.update(loop=len(body), loop_per_element=len(body) / spec.loop_elements,
                   loop_opcodes=dict(loop_ops.most_common(10)))
    return row


def lines_of(row: dict) -> list[str]:
    stages = (f", {row['stages']} stages" if row["stages"] else "") + (
        f", at most {row['maxnreg']} registers" if row.get("maxnreg") else "")
    out = [f"{row['label']}",
           f"    {row['constexprs']}, {row['warps']} warps{stages}",
           f"    ptxas: {row['registers']} registers, {row['stack']} B stack, {row['spill_stores']} B spill stores, "
           f"{row['spill_loads']} B spill loads; shared {row['shared']} B; {row.get('per_sm', '?')} a SM",
           f"    SASS: {row['sass']} instructions, {row['mma']} {row['mma_kind']}, {row['local']} LDL/STL, "
           f"{row['fp64']} fp64"]
    if "loop" in row:
        out.append(f"    body loop: {row['loop']} instructions = {row['loop_per_element']:.2f} per element; "
                   f"{row['loop_opcodes']}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="kernels whose label starts with one of these")
    parser.add_argument("--out", type=Path, help="also write the report into this file")
    args = parser.parse_args(argv)
    import triton

    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    triton.knobs.nvidia.dump_ptxas_log = True
    specs = energy_specs() + linear_specs() + cg_specs()
    if args.only:
        specs = [s for s in specs if any(s.label.startswith(p) for p in args.only)]
    ptxas = subprocess.run([str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"), "--version"],
                           capture_output=True, text=True).stdout.strip().splitlines()
    lines = [f"mppm_ext/triton kernels for sm_90 (Triton {triton.__version__}, ptxas "
             f"{ptxas[-1] if ptxas else '?'}), compiled by bench/triton_aot.py"]
    print(lines[0])
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            kernel, log = compile_spec(spec)
            block = lines_of(report(spec, kernel, log, Path(tmp)))
            print("\n".join(block), flush=True)
            lines += block
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    # The kernels must be defined for the compiler, not the interpreter; FP fusion is Triton 3.9's default
    # (set, to keep its deprecation warning out of the report).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
