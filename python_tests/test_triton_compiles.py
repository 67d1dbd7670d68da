"""Every Triton kernel compiles to PTX for an H100 (sm_90) on this machine, GPU or not.

The interpreter runs the kernels' Python semantics only; this catches what only the compiler sees
(types of loop-carried values, fp64 math, tl.dot shapes) and checks the performance-relevant code:
tensor-core instructions in the bf16 fused-linear kernel and 16-byte loads in the energy body. It
runs in a subprocess because this test session defines the kernels in the interpreter."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

SCRIPT = r'''
import json, re, sys
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mppm_ext.triton import cg, energy, linear

def compile(fn, signature, constexprs, aligned, **options):
    names = list(signature)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    ptx = kernel.asm["ptx"]
    return {"v4_loads": len(re.findall(r"ld\.global(\.nc)?\.v4", ptx)), "mma": len(re.findall(r"\bw?gmma|mma\.sync", ptx))}

ptrs = lambda sig: [k for k, v in sig.items() if v.startswith("*")]
out = {}
sig = dict(hidden_ptr="*bf16", logits_ptr="*bf16", labels_ptr="*i64", real_ptr="*u8", scored_ptr="*u8",
           out_ptr="*fp64", T="i32", V="i32", D="i32", plane="i32", inv_temperature="fp64", h_sb="i32", h_st="i32",
           l_sb="i64", l_st="i32", lab_sb="i32", lab_st="i32", real_sb="i32", real_st="i32", sc_sb="i32", sc_st="i32")
out["energy"] = compile(energy._energy_kernel, sig, dict(VEC=8, LANES=256, ROWS=4, BLOCK_D=1024, FTZ=True),
                        ptrs(sig), num_warps=8)
sig = dict(hidden_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", targets_ptr="*i64", m_ptr="*fp32",
           s_ptr="*fp64", u_ptr="*fp64", picked_ptr="*fp32", N="i32", V="i32", D="i32", h_sn="i32", w_sv="i32",
           tiles_per_split="i32", inv_temperature="fp64")
const = dict(HAS_BIAS=True, COMPUTE=tl.bfloat16, PRECISION="tf32", BLOCK_N=128, BLOCK_V=128, BLOCK_D=64)
for tiles in linear.TILES:  # each tile shape as the launcher configures it at the benchmark's shape
    cfg = linear._config(8192, 50257, torch.bfloat16, tiles=tiles)
    out["token_log_prob " + tiles] = compile(linear._token_log_prob_kernel, sig,
        dict(const, **{k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}), ptrs(sig) + ["D", "h_sn", "w_sv"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
sig32 = {k: v.replace("bf16", "fp32") for k, v in sig.items()}
out["token_log_prob_fp32"] = compile(linear._token_log_prob_kernel, sig32, dict(const, COMPUTE=tl.float32,
    PRECISION="ieee", BLOCK_N=64, BLOCK_V=64, BLOCK_D=32), ptrs(sig32), num_warps=4, num_stages=2)
sig = dict(m_ptr="*fp32", s_ptr="*fp64", u_ptr="*fp64", picked_ptr="*fp32", out_ptr="*fp64", N="i32",
           inv_temperature="fp64")
out["token_log_prob_combine"] = compile(linear._token_log_prob_combine_kernel, sig, dict(SPLITS=5, BLOCK=256), ptrs(sig))
sig = dict(hidden_ptr="*bf16", weight_ptr="*bf16", bias_ptr="*bf16", m_ptr="*fp32", s_ptr="*fp64", acc_ptr="*fp32",
           B="i32", V="i32", D="i32", h_sb="i32", w_sv="i32", tiles_per_split="i32", inv_temperature="fp64")
out["softmax_moments"] = compile(linear._softmax_moments_kernel, sig, dict(const, BLOCK_N=16, BLOCK_D=32),
                                 ptrs(sig) + ["D", "h_sb", "w_sv"], num_warps=4, num_stages=2)
sig = dict(m_ptr="*fp32", s_ptr="*fp64", acc_ptr="*fp32", lse_ptr="*fp64", wbar_ptr="*fp32", B="i32", D="i32",
           inv_temperature="fp64")
out["softmax_moments_combine"] = compile(linear._softmax_moments_combine_kernel, sig, dict(SPLITS=7, BLOCK_D=256),
                                         ptrs(sig))
sig = dict(g_ptr="*bf16", rhs_ptr="*fp32", u_ptr="*fp32", iters_ptr="*i32", residual_ptr="*fp32", m="i32", D="i32",
           g_sb="i32", g_sm="i32", rhs_sb="i32", lam="fp64", tol2="fp64", max_iter="i32")
m_pad, options = cg.launch_config(cg.MAX_TARGETS)  # the launcher's options (8 warps, the register cap lifted)
out["cg"] = compile(cg._cg_kernel, sig, dict(COMPUTE=tl.bfloat16, PRECISION="tf32", M_PAD=m_pad, BLOCK_D=64),
                    ptrs(sig), **options)
# The float scalars a launch passes as Python floats: declared fp64, so that the launcher does not
# round them to fp32 (tol**2 of the CG would be 0 below tol ~1e-19).
kernels = (energy._energy_kernel, linear._token_log_prob_kernel, linear._token_log_prob_combine_kernel,
           linear._softmax_moments_kernel, linear._softmax_moments_combine_kernel, cg._cg_kernel)
out["float_scalars"] = sorted({p.annotation for k in kernels for p in k.params
                               if p.name in ("inv_temperature", "lam", "tol2")})
print(json.dumps(out))
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-P", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no ptxas to compile with")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["energy"]["v4_loads"] >= 1, "the energy body is not read with 16-byte loads"
    for tiles in ("wide", "paired"):
        assert result["token_log_prob " + tiles]["mma"] >= 1, f"bf16 fused-linear kernel, {tiles} tiles: no tensor cores"
    assert result["softmax_moments"]["mma"] >= 1 and result["cg"]["mma"] >= 1
    assert result["float_scalars"] == ["fp64"], result["float_scalars"]
