// The `softmax_tile` op contract: the fused epilogue of the streaming pass over the unembedding
// (mppm_ext/streaming.py). The caller forms one tile of logits z = H[r0:r1] @ W[v0:v0+C]^T (+ b) with
// BLAS / cuBLAS and this op scales it in place to x = z * inv_temperature and folds x into a per-row
// online softmax kept in float64 (online_softmax.h):
//
//   run_max[r], run_sum[r]   sum over the vocabulary seen so far of exp(x) = run_sum * exp(run_max);
//                            start at (-inf, 0). logsumexp = run_max + log(run_sum) at the end.
//   run_ent[r] (optional)    sum of exp(x - run_max) * (x - run_max), moved with run_max by the
//                            rescale rule; start at 0. entropy = log(run_sum) - run_ent / run_sum.
//   picked[r]                x[r, targets[r] - v0] when the target falls in [v0, v0 + C) (optional).
//   bad_col[r]               -1 until the row meets a NaN or +inf logit, then that logit's vocabulary
//                            index (the first one met); later tiles leave it alone. Checking it once
//                            at the end keeps the CUDA path free of a host sync per tile. -inf is a
//                            legal logit (probability 0); a tile row that is all -inf adds nothing.
//   alpha[r] (optional)      when given, z is overwritten with P = exp(x - new_max) (0 for -inf) and
//                            alpha receives exp(old_max - new_max) (1 for a row the tile adds nothing
//                            to), so that wbar = alpha * wbar + P @ W_tile keeps
//                            wbar = sum_v exp(x_v - run_max) W_v (the flash-attention accumulation).
//
// Rows are independent and each is reduced in a fixed order, so results do not depend on the thread
// count or the schedule.
#pragma once

#include <cstdint>

#include "mppm/tensor_view.h"

namespace mppm {

struct SoftmaxTileParams {
  int64_t R = 0, C = 0;
  float* z = nullptr;  // z[r, c] at z + r * z_stride + c
  int64_t z_stride = 0;
  int64_t v0 = 0;  // vocabulary index of column 0
  double inv_temperature = 1.0;  // > 0 and finite

  double* run_max = nullptr;  // [R], contiguous, in/out
  double* run_sum = nullptr;  // [R], in/out
  double* run_ent = nullptr;  // [R], in/out, or null
  int64_t* bad_col = nullptr;  // [R], in/out

  const int64_t* targets = nullptr;  // [R] or null
  double* picked = nullptr;          // [R], written where the target is in this tile; null with targets
  float* alpha = nullptr;            // [R] or null: null leaves z untouched

  Launch launch;
};

void softmax_tile_cpu(const SoftmaxTileParams& p);
#ifdef MPPM_EXT_WITH_CUDA
void softmax_tile_cuda(const SoftmaxTileParams& p);
#endif

}  // namespace mppm
