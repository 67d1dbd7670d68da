// CUDA `softmax_tile`: the CPU kernel's fold (softmax_tile_cpu.cpp) with one block per tile row.
// A tile is what cuBLAS has just written: at most 2^23 floats (32 MiB, 2048 rows x 4096 columns; the
// CUDA budget of mppm_ext/streaming.py, which gives the design arithmetic), sized to stay in L2 (50 MB
// on an H100, 60 MB on an H200) beside the product's operands, so this kernel reads it from L2, not
// HBM. A tile row is then 4096 floats (16 KiB): a max pass that scales the row in place, then an exp
// pass over the same 16 KiB (in L1) that writes the probabilities in place (moments pass) and sums the
// softmax's and the entropy's terms. Reductions use a fixed
// element-to-thread assignment and fixed shuffle and shared-memory trees: no atomics, bitwise
// reproducible. Faults are recorded in bad_col on the device; the caller checks it once per call.
#include <cuda_runtime.h>

#include <cfloat>
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
  const float c = float(p.inv_temperature);
  const int64_t target = target_column(p, r);

  // The scale in place (each thread rewrites only the columns it reads again below, so no barrier is
  // needed), the target logit by the thread that owns its column, the max and the first NaN / +inf.
  float m = -INFINITY;
  long long first_bad = LLONG_MAX;
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) {
    const float x = row[j] * c;
    if (c != 1.0f) row[j] = x;
    if (j == target) p.picked[r] = double(x);
    if (!(x < INFINITY) && first_bad == LLONG_MAX) first_bad = j;  // NaN or +inf; -inf is legal
    m = fmaxf(m, x);
  }
  first_bad = block_reduce(first_bad, MinOp{}, shared_i);
  m = block_reduce(m, MaxOp{}, shared_f);
  if (first_bad != LLONG_MAX || m == -INFINITY) {
    // A fault (as on the CPU: the state is kept, the row's probabilities are zeroed, the fault is
    // recorded) or a tile row of -inf only, which adds nothing.
    if (p.alpha != nullptr)
      for (int64_t j = threadIdx.x; j < p.C; j += kThreads) row[j] = 0.0f;
    if (threadIdx.x == 0) {
      if (first_bad != LLONG_MAX && p.bad_col[r] < 0) p.bad_col[r] = p.v0 + first_bad;
      if (p.alpha != nullptr) p.alpha[r] = 1.0f;
    }
    return;
  }

  SoftmaxState state = run_state(p, r);
  double alpha = 0.0;
  const float shift = p.alpha == nullptr ? m : float(raise_max(state, double(m), alpha));
  float partial_s = 0.0f, partial_u = 0.0f;
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) {
    const float d = row[j] - shift;
    const float e = expf(d);  // 0 for -inf
    if (p.alpha != nullptr) row[j] = e;
    partial_s += e;
    partial_u = fmaf(e, fmaxf(d, -FLT_MAX), partial_u);  // 0 * -inf taken as 0
  }
  const double total_s = block_reduce(double(partial_s), SumOp{}, shared_d);
  const double total_u = block_reduce(double(partial_u), SumOp{}, shared_d);
  if (threadIdx.x != 0) return;
  if (p.alpha == nullptr) {
    SoftmaxState tile;
    tile.m = double(m);
    tile.s = total_s;
    tile.u = total_u;
    fold(state, tile);
  } else {
    state.s += total_s;
    state.u += total_u;
    p.alpha[r] = float(alpha);
  }
  store_run_state(p, r, state);
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
