"""Speed of mppm_ext against the plain-PyTorch reference, torch.compile of it, peers when installed,
and a measured ceiling (a copy for memory-bound ops, a bare GEMM for compute-bound ones).

    python bench/run.py                            # CPU: every op at its default size
    python bench/run.py --ops energy --all-isas    # the CPU energy kernel on every instruction set
    python bench/run.py --device cuda --n 32768 --batch 1 8 --vocab 50257 128256 --dtypes bf16

Prints a table last and writes JSON + CSV (device, versions, git SHA) to bench/results/.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

import mppm_ext

sys.path.insert(0, str(Path(__file__).parent))
import ops_energy  # noqa: E402
import ops_linear  # noqa: E402
import ops_linear_backward  # noqa: E402
import ops_steer  # noqa: E402
from harness import Report, run_case  # noqa: E402

OPS = {"energy": ops_energy, "energy_from_hidden": ops_linear, "energy_from_hidden_backward": ops_linear_backward,
       "steer_step": ops_steer}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="dtype of logits, hidden states and weights")
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257], help="energy and energy_from_hidden")
    parser.add_argument("--n", type=int, default=4096, help="energy: tokens")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="energy: split the --n tokens into this many sequences of n / batch (one case each)")
    parser.add_argument("--hidden", type=int, default=768, help="energy: hidden size d")
    parser.add_argument("--linear-n", type=int, default=512, help="energy_from_hidden: tokens")
    parser.add_argument("--linear-hidden", type=int, default=768, help="energy_from_hidden: hidden size d")
    parser.add_argument("--steer-batch", type=int, default=64)
    parser.add_argument("--steer-hidden", type=int, default=2048)
    parser.add_argument("--steer-vocab", type=int, default=50257)
    parser.add_argument("--steer-targets", type=int, nargs="+", default=[1, 16, 256], help="m, targets per row")
    parser.add_argument("--steer-reference-max-targets", type=int, default=16,
                        help="time the steer_step reference (J by autograd + pinv) only up to this m")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--all-isas", action="store_true", help="time every CPU instruction set, not just the best")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out providers whose name contains any of these")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--parse-only", action="store_true",
                        help="check the options, print them and exit (no device needed; bench/gpu_session.sh --dry-run)")
    args = parser.parse_args(argv)
    if any(b < 1 or args.n % b for b in args.batch):
        parser.error(f"--batch values must divide --n {args.n}, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available() and not args.parse_only:
        parser.error("--device cuda needs a CUDA device")
    args.dtype_map = DTYPES
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.parse_only:
        print("options:", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "dtype_map"})
        return 0
    report = Report(device=args.device)
    default_isa = mppm_ext.build_info()["cpu_isa"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    stem = f"{'+'.join(args.ops)}-{args.device}-{stamp}"
    for op in args.ops:
        for case in OPS[op].cases(args):
            print(f"[{case.name}]", flush=True)
            report.rows.extend(run_case(case, args.device, args.warmup, args.repeats, args.skip))
            # Rewritten after every case: a run stopped by a time limit keeps the cases it finished.
            json_path, csv_path = report.write(args.out, stem)
    if args.device == "cpu":
        mppm_ext.set_cpu_isa(default_isa)
    env = report.environment()
    print(f"\n{env['device']} | torch {env['torch']} | mppm_ext {env['mppm_ext']} @ {env['git_sha'][:12]}")
    print(f"results: {json_path} and {csv_path.name}\n")
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
