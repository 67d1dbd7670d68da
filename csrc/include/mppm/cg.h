// The `cg_solve` op contract shared by the CPU and CUDA kernels: batched conjugate gradients on the
// m x m systems (G G^T + lam I) u = rhs of the steering solve, one independent system per batch row b.
//
// G is never formed: G = rows - 1 center^T (rows [B, m, d], center [B, d] or absent), so
//   G^T u = rows^T u - center * sum(u)     (a d-vector)
//   G t   = rows t   - (center . t) 1      (an m-vector)
// and one iteration costs 2 m d multiply-adds, independent of the vocabulary size.
// rows/center are float32 (what the streaming pass produces); every sum accumulates in float64.
#pragma once

#include <cstdint>

#include "mppm/tensor_view.h"

namespace mppm {

struct CGParams {
  int64_t B = 0, m = 0, d = 0;
  const float* rows = nullptr;    // [B, m, d] contiguous
  const float* center = nullptr;  // [B, d] contiguous, or nullptr (G = rows)
  const double* rhs = nullptr;    // [B, m] contiguous
  double lam = 0.0;               // >= 0
  double tol = 1e-4;              // stop when ||rhs - A u|| <= tol * ||rhs||
  int64_t max_iter = 1;

  // Outputs, contiguous: u [B, m], iters [B], residual [B] (relative, recomputed from u), converged [B].
  double* u = nullptr;
  int64_t* iters = nullptr;
  double* residual = nullptr;
  uint8_t* converged = nullptr;

  // Scratch [B, d + 3 m] float64: per row t = G^T p (d), then r, p, A p (m each).
  double* scratch = nullptr;

  Launch launch;
};

void cg_cpu(const CGParams& p);
#ifdef MPPM_EXT_WITH_CUDA
void cg_cuda(const CGParams& p);  // throws std::runtime_error on a CUDA error
#endif

}  // namespace mppm
