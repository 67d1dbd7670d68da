// CUDA `softmax_tile`: the CPU kernel's fold (softmax_tile_cpu.cpp) with one block per tile row.
// A tile row is a few thousand floats that cuBLAS has just written (mostly still in L2), so the kernel
// is short: a max pass, then an exp pass that writes the probabilities in place. Reductions use a fixed
// element-to-thread assignment and fixed shuffle and shared-memory trees: no atomics, bitwise
// reproducible. Faults are recorded in bad_col on the device; the caller checks it once per call.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>

#include "mppm/softmax_tile.h"
#include "mppm/softmax_tile_math.h"
#include "cuda_host.cuh"

namespace mppm {
namespace {

// 256 threads: a 4096-column tile row gives each thread 16 elements per pass, and 8 warps keep the
// shared-memory combine to one step.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xffffffffu;

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// Reduces one value per thread to a value every thread receives, in a fixed tree.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(kFullWarp, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < kWarps; ++w) v = op(v, shared[w]);
  return v;
}

__global__ void __launch_bounds__(kThreads) softmax_tile_kernel(const SoftmaxTileParams p) {
  __shared__ double shared_d[kWarps];
  __shared__ float shared_f[kWarps];
  __shared__ long long shared_i[kWarps];
  const int64_t r = blockIdx.x;
  float* row = p.z + r * p.z_stride;
  const double old_max = p.run_max[r];
  if (threadIdx.x == 0) {
    const int64_t target = target_column(p, r);
    if (target >= 0) p.picked[r] = double(row[target]);
  }

  float m = -INFINITY;
  long long first_bad = LLONG_MAX;
  for (int64_t c = threadIdx.x; c < p.C; c += kThreads) {
    const float x = row[c];
    if (!isfinite(x) && first_bad == LLONG_MAX) first_bad = c;
    m = fmaxf(m, x);
  }
  first_bad = block_reduce(first_bad, MinOp{}, shared_i);
  if (first_bad != LLONG_MAX) {
    // As on the CPU: the state is kept, the row's probabilities are zeroed, the fault is recorded.
    if (p.alpha != nullptr)
      for (int64_t c = threadIdx.x; c < p.C; c += kThreads) row[c] = 0.0f;
    if (threadIdx.x == 0) {
      if (p.bad_col[r] < 0) p.bad_col[r] = p.v0 + first_bad;
      if (p.alpha != nullptr) p.alpha[r] = 1.0f;
    }
    return;
  }
  m = block_reduce(m, MaxOp{}, shared_f);

  double alpha = 0.0, run_max = old_max;
  const float shift = p.alpha == nullptr ? m : float(raise_max(run_max, double(m), alpha));
  float partial = 0.0f;
  for (int64_t c = threadIdx.x; c < p.C; c += kThreads) {
    const float e = expf(row[c] - shift);
    if (p.alpha != nullptr) row[c] = e;
    partial += e;
  }
  const double total = block_reduce(double(partial), SumOp{}, shared_d);
  if (threadIdx.x != 0) return;
  if (p.alpha == nullptr) {
    fold_logsumexp(p.run_max[r], p.run_sum[r], double(m) + log(total));
  } else {
    p.run_max[r] = run_max;
    p.run_sum[r] = alpha * p.run_sum[r] + total;
    p.alpha[r] = float(alpha);
  }
}

}  // namespace

void softmax_tile_cuda(const SoftmaxTileParams& p) {
  const DeviceGuard guard(p.launch.device_index);
  const auto stream = static_cast<cudaStream_t>(p.launch.stream);
  if (p.R > INT32_MAX) throw std::invalid_argument("softmax_tile: more than 2^31 - 1 rows in one tile");
  softmax_tile_kernel<<<dim3(unsigned(p.R)), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "softmax_tile_kernel launch");
}

}  // namespace mppm
