"""Operand dtypes for tl.dot, shared by the kernels that multiply tiles."""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype both tl.dot operands are converted to in registers: the inputs' common 16-bit
    dtype (tensor cores, exact products, fp32 accumulation), else float32 (no copies of W)."""
    from . import _interpreted

    dtypes = {t.dtype for t in tensors}
    common = dtypes.pop() if len(dtypes) == 1 else torch.float32
    # Triton's interpreter keeps bfloat16 as raw uint16 bits and multiplies those in tl.dot (Triton
    # 3.9): there bf16 tiles go through fp32, which gives the same products (bf16 x bf16 is exact
    # in fp32) in another summation order.
    if common == torch.bfloat16 and _interpreted():
        return torch.float32
    return common


def tl_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands take the "ieee" path (CUDA-core FMAs): TF32's 10-bit mantissa would miss the
    float32 tolerance. The setting is ignored for 16-bit operands."""
    return "ieee" if dtype == torch.float32 else "tf32"
