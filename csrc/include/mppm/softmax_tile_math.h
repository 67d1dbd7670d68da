// Per-row arithmetic of the `softmax_tile` op, shared by the CPU and CUDA kernels so that both fold
// a tile into the running state with the same double-precision operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "mppm/softmax_tile.h"

#ifndef MPPM_HD
#if defined(__CUDACC__)
#define MPPM_HD __host__ __device__ __forceinline__
#else
#define MPPM_HD inline
#endif
#endif

namespace mppm {

// Folds a tile whose logsumexp is `tile_lse` into (run_max, run_sum). The reference point becomes the
// larger of the two, so neither exp overflows; run_max = -inf (nothing seen) contributes exactly 0.
MPPM_HD void fold_logsumexp(double& run_max, double& run_sum, double tile_lse) {
  const double ref = tile_lse > run_max ? tile_lse : run_max;
  run_sum = run_sum * exp(run_max - ref) + exp(tile_lse - ref);
  run_max = ref;
}

// The new running max after a tile whose max is `tile_max`, and the factor exp(old - new) that
// rescales everything accumulated against the old max (0 on the first tile, where old = -inf).
MPPM_HD double raise_max(double& run_max, double tile_max, double& alpha) {
  const double new_max = tile_max > run_max ? tile_max : run_max;
  alpha = exp(run_max - new_max);
  run_max = new_max;
  return new_max;
}

// Target column of row r inside the tile, or -1.
MPPM_HD int64_t target_column(const SoftmaxTileParams& p, int64_t r) {
  if (p.targets == nullptr) return -1;
  const int64_t c = p.targets[r] - p.v0;
  return c >= 0 && c < p.C ? c : -1;
}

}  // namespace mppm
