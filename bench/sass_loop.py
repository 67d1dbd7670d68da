"""SASS instructions per element of the CUDA energy kernel's main loop, counted from the disassembly.

    python bench/sass_loop.py                       # build energy_cuda.cu for sm_90, count every logits dtype
    python bench/sass_loop.py --arch sm_80 --kernel energy_rows_kernel --dtype bf16
    python bench/sass_loop.py --out bench/results/sass-energy-sm_90.txt   # the report into a file as well

The main loop is the loop of softmax_part (csrc/cuda/energy_cuda.cu) that issues kUnroll = 4 LDG.E.128
per iteration: 4 x 16 bytes = 32 bf16 / fp16 or 16 fp32 elements per thread. It is found in
``cuobjdump --dump-sass`` output as the backward branch whose body holds exactly four 128-bit loads, and cut
into basic blocks at every branch and branch target. Two of its blocks are rare: the rescale (taken when a
chunk raises the thread's running max, O(log n) times per thread and row) and the block of a chunk met
before any finite logit (only -inf and NaN so far). The hot path is every other block, i.e. one
iteration's instructions when neither happens; instructions per element = hot path / elements per
iteration. The rare blocks are recognised by their content (the rescale's MUFU.EX2 behind the -126 range
check of the library's exp2f; the NaN scan's FSETP.GTU ... +INF chain), and the script prints every block
so that the split can be checked by eye.

nvcc and cuobjdump come from the PATH, or cuobjdump from the Triton wheel (it ships one); only the CUDA
compiler is needed, no GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "energy_cuda.cu"
#: The template argument of each logits dtype in the mangled kernel names, and its elements per 16 bytes.
DTYPES = {"bf16": ("13__nv_bfloat16", 8), "fp16": ("6__half", 8), "fp32": ("f", 4)}
LOADS_PER_ITERATION = 4  # kUnroll in energy_cuda.cu
INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)")


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.exists():
        return str(path)
    sys.exit("no cuobjdump on the PATH or in the triton wheel")


def build(arch: str, out: Path) -> str:
    """The cubin of energy_cuda.cu, compiled as the CMake build compiles it; returns ptxas's report."""
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-DMPPM_EXT_WITH_CUDA",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v", "-cubin", "-o", str(out),
           str(SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stderr


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Every kernel of a disassembly: name -> [(address, instruction text)]."""
    out = {}
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name, body = chunk.split("\n", 1)
        out[name.strip()] = [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, body.split("\n")) if m]
    return out


def opcode(text: str) -> str:
    words = text.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def main_loop(instructions: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The body [target, branch] of the backward branch that holds exactly LOADS_PER_ITERATION LDG.E.128."""
    for i, (addr, text) in enumerate(instructions):
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) <= addr:
            body = [(a, t) for a, t in instructions if int(m.group(1), 16) <= a <= addr]
            if sum("LDG.E.128" in t for _, t in body) == LOADS_PER_ITERATION:
                return body
    raise SystemExit("no loop with four 128-bit loads found")


def blocks(body: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """The loop body cut before every branch target and after every branch."""
    targets = {int(m.group(1), 16) for _, t in body if (m := BRANCH.search(t))}
    out, current = [], []
    for addr, text in body:
        if addr in targets and current:
            out.append(current)
            current = []
        current.append((addr, text))
        if BRANCH.search(text):
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def rare(block: list[tuple[int, str]]) -> str:
    """Why a block is off the hot path ('' when it is on it)."""
    text = [t for _, t in block]
    if any("-126" in t for t in text) and any("MUFU.EX2" in t for t in text):
        return "rescale (a chunk raised the running max)"
    if sum("FSETP.GTU" in t and "+INF" in t for t in text) >= 4:
        return "no finite logit yet (NaN scan)"
    return ""


def count(sass: str, kernel: str, dtype: str, verbose: bool, say=print) -> dict:
    tag, per_vector = DTYPES[dtype]
    # The first instance with these logits (energy_rows_kernel's second template argument, the hidden
    # dtype, does not touch the logits loop).
    name = next(n for n in functions(sass) if f"{kernel}I{tag}" in n)
    body = main_loop(functions(sass)[name])
    elements = LOADS_PER_ITERATION * per_vector
    hot = collections.Counter()
    hot_count = 0
    for block in blocks(body):
        why = rare(block)
        if verbose:
            ops = collections.Counter(opcode(t) for _, t in block)
            say(f"    block {block[0][0]:#06x}-{block[-1][0]:#06x}: {len(block):4d} instructions "
                  f"{'(rare: ' + why + ')' if why else '(hot)'}  {dict(ops.most_common(6))}")
        if not why:
            hot_count += len(block)
            hot.update(opcode(t) for _, t in block)
    return {"kernel": name, "dtype": dtype, "loop_instructions": len(body), "hot_path": hot_count,
            "elements": elements, "per_element": hot_count / elements, "hot_opcodes": dict(hot.most_common())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--kernel", default="energy_rows_kernel", choices=["energy_rows_kernel", "row_partials_kernel"])
    parser.add_argument("--dtype", nargs="+", default=sorted(DTYPES), choices=sorted(DTYPES))
    parser.add_argument("--cubin", type=Path, help="count this cubin instead of building one")
    parser.add_argument("--quiet", action="store_true", help="no per-block listing")
    parser.add_argument("--out", type=Path, help="also write the report into this file")
    args = parser.parse_args(argv)
    lines = []

    def say(text: str) -> None:
        print(text)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        cubin = args.cubin
        if cubin is None:
            cubin = Path(tmp) / "energy_cuda.cubin"
            version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
            say(f"{SOURCE.relative_to(ROOT)} for {args.arch}, {version[-1] if version else 'nvcc'}")
            kernel = "?"
            for line in build(args.arch, cubin).splitlines():
                if "Compiling entry function" in line:
                    # e.g. energy_rows_kernelI13__nv_bfloat16S2_ (the mangled template arguments)
                    kernel = re.sub(r"^_ZN4mppm\w*?_cu_[0-9a-f]{8}\d+", "", line.split("'")[1]).split("EEv")[0]
                elif "registers" in line or "spill" in line:
                    say(f"ptxas {kernel}: {line.split(':', 1)[-1].strip()}")
        sass = subprocess.run([cuobjdump(), "--dump-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    for dtype in args.dtype:
        r = count(sass, args.kernel, dtype, not args.quiet, say)
        say(f"{args.kernel} {dtype}: loop {r['loop_instructions']} instructions, hot path {r['hot_path']} for "
            f"{r['elements']} elements = {r['per_element']:.2f} per element; {r['hot_opcodes']}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # importing triton for its cuobjdump needs no GPU
    sys.exit(main())
