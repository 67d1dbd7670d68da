// Batched CG of the steering solve on the GPU (contract: include/mppm/cg.h). One thread block per batch
// row runs the whole solve: a row's work per iteration is 2 m d multiply-adds on data that stays in L2
// (rows is m d floats), so a launch per iteration would cost more than the arithmetic.
//   G^T p: threads stride over d (coalesced over rows' last dimension), looping over the m rows;
//   G t:   one warp per output i, lanes stride over d, reduced with shuffles.
// The iteration sequence is the CPU kernel's; sums differ only in association order.
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_host.cuh"
#include "mppm/cg.h"

namespace mppm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, returned to every thread. `shared` holds kWarps + 1 doubles.
__device__ double block_sum(double v, double* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double s = lane < kWarps ? shared[lane] : 0.0;
    s = warp_sum(s);
    if (lane == 0) shared[kWarps] = s;
  }
  __syncthreads();
  const double out = shared[kWarps];
  __syncthreads();
  return out;
}

__device__ double block_dot(const double* a, const double* b, int64_t n, double* shared) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += a[i] * b[i];
  return block_sum(s, shared);
}

// out = (G G^T + lam I) x for this block's row; t is the row's d-sized scratch.
__device__ void normal_matvec(const float* rows, const float* center, int64_t m, int64_t d, double lam,
                              const double* x, double* out, double* t, double* shared) {
  double sx = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) sx += x[i];
  sx = block_sum(sx, shared);
  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
    double s = center ? -double(center[k]) * sx : 0.0;
    for (int64_t i = 0; i < m; ++i) s += double(rows[i * d + k]) * x[i];
    t[k] = s;
  }
  __syncthreads();
  double ct = 0.0;
  if (center) {
    for (int64_t k = threadIdx.x; k < d; k += blockDim.x) ct += double(center[k]) * t[k];
    ct = block_sum(ct, shared);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t i = warp; i < m; i += kWarps) {
    double s = 0.0;
    for (int64_t k = lane; k < d; k += 32) s += double(rows[i * d + k]) * t[k];
    s = warp_sum(s);
    if (lane == 0) out[i] = s - ct + lam * x[i];
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) cg_kernel(CGParams p) {
  __shared__ double shared[kWarps + 1];
  const int64_t b = blockIdx.x, m = p.m, d = p.d;
  const float* rows = p.rows + b * m * d;
  const float* center = p.center ? p.center + b * d : nullptr;
  double* t = p.scratch + b * (d + 3 * m);
  double* r = t + d;
  double* dir = r + m;
  double* ad = dir + m;
  const double* rhs = p.rhs + b * m;
  double* u = p.u + b * m;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
    u[i] = 0.0;
    r[i] = rhs[i];
    dir[i] = rhs[i];
  }
  __syncthreads();
  const double b_norm = sqrt(block_dot(rhs, rhs, m, shared));
  double rr = b_norm * b_norm;
  int64_t it = 0;
  while (it < p.max_iter && sqrt(rr) > p.tol * b_norm) {
    normal_matvec(rows, center, m, d, p.lam, dir, ad, t, shared);
    const double pap = block_dot(dir, ad, m, shared);
    if (!(pap > 0.0)) break;  // singular along dir (lam = 0, rank-deficient G): stop, not converged
    const double alpha = rr / pap;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) {
      u[i] += alpha * dir[i];
      r[i] -= alpha * ad[i];
    }
    __syncthreads();
    const double rr_new = block_dot(r, r, m, shared);
    const double beta = rr_new / rr;
    for (int64_t i = threadIdx.x; i < m; i += blockDim.x) dir[i] = r[i] + beta * dir[i];
    __syncthreads();
    rr = rr_new;
    ++it;
  }
  normal_matvec(rows, center, m, d, p.lam, u, ad, t, shared);
  double res = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) res += (rhs[i] - ad[i]) * (rhs[i] - ad[i]);
  res = block_sum(res, shared);
  if (threadIdx.x == 0) {
    const double rel = b_norm > 0.0 ? sqrt(res) / b_norm : 0.0;
    p.iters[b] = it;
    p.residual[b] = rel;
    p.converged[b] = rel <= p.tol ? 1 : 0;
  }
}

}  // namespace

void cg_cuda(const CGParams& p) {
  if (p.B == 0) return;
  const DeviceGuard guard(p.launch.device_index);
  cg_kernel<<<static_cast<unsigned>(p.B), kThreads, 0, static_cast<cudaStream_t>(p.launch.stream)>>>(p);
  check_cuda(cudaGetLastError(), "cg_kernel launch");
}

}  // namespace mppm
