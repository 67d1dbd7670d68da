// CUDA `energy_finish`: the computation of finish_cpu.cpp on the GPU, with the same arithmetic
// (energy_math.h) and the same order of additions within each sequence's passes, up to the tree below.
//
//   finish_tokens_kernel    one thread per position: its ten per-token planes from its parts.
//   sequence_stats_kernel   one block per sequence: the two-pass statistics of energy_math.h.
//
// Both reduce (or not) in a fixed order (per-thread loops with a fixed position assignment, then a
// fixed shared-memory tree), so every output is bitwise reproducible from run to run.
#include <cuda_runtime.h>

#include <cstdint>

#include "mppm/energy_math.h"
#include "mppm/finish.h"
#include "cuda_host.cuh"

namespace mppm {
namespace {

// Token kernel: a position reads 33 bytes and writes 40, so the kernel is bound by memory; 256
// threads and a grid-stride loop are the usual shape for such a kernel.
constexpr int kTokenThreads = 256;

// Statistics kernel: each thread keeps a whole StatSums (200 bytes) in shared memory for the tree
// reduction; 128 threads need 25 KiB, well inside the 48 KiB of static shared memory, and a sequence
// has only a few thousand positions, which 128 threads cover in a few dozen steps per pass.
constexpr int kStatThreads = 128;

__global__ void __launch_bounds__(kTokenThreads) finish_tokens_kernel(const FinishParams p) {
  const int64_t plane = p.B * p.T;
  for (int64_t idx = int64_t(blockIdx.x) * kTokenThreads + threadIdx.x; idx < plane;
       idx += int64_t(gridDim.x) * kTokenThreads)
    write_token_quantities(p.out_tokens, plane, idx, load_parts(p, idx));
}

__device__ __forceinline__ void merge(StatSums& a, const StatSums& b) {
  a.used += b.used;
  a.zero_kinetic += b.zero_kinetic;
#pragma unroll
  for (int q = 0; q < kNumStatQuantities; ++q) {
    a.sum[q] += b.sum[q];
    a.centred_sq[q] += b.centred_sq[q];
  }
  a.centred_cross += b.centred_cross;
}

// Fixed-shape tree over part[0, kStatThreads): part[i] absorbs part[i + stride] for halving strides,
// so the order of the additions never changes. The total is left in part[0], visible to all threads.
__device__ __forceinline__ void tree_reduce(StatSums* part) {
  static_assert((kStatThreads & (kStatThreads - 1)) == 0, "the tree needs a power-of-two block");
  __syncthreads();
#pragma unroll
  for (int stride = kStatThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) merge(part[threadIdx.x], part[threadIdx.x + stride]);
    __syncthreads();
  }
}

// sequence_stats of finish_cpu.cpp: the same two passes, each split over the threads by position.
__global__ void __launch_bounds__(kStatThreads) sequence_stats_kernel(const FinishParams p) {
  // Raw storage: StatSums has default member initialisers, which a __shared__ variable cannot have.
  __shared__ alignas(StatSums) unsigned char storage[kStatThreads * sizeof(StatSums)];
  StatSums* part = reinterpret_cast<StatSums*>(storage);
  const int tid = threadIdx.x;
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    StatSums first;
    for (int64_t t = tid; t < p.T; t += kStatThreads)
      if (const PositionParts q = load_parts(p, b * p.T + t); q.valid()) add_first_pass(first, q);
    part[tid] = first;
    tree_reduce(part);
    StatSums total = part[0];
    double mean[kNumStatQuantities];
    first_pass_means(total, mean);
    __syncthreads();  // everyone has read part[0] before the second pass overwrites it

    StatSums second;
    for (int64_t t = tid; t < p.T; t += kStatThreads)
      if (const PositionParts q = load_parts(p, b * p.T + t); q.valid()) add_second_pass(second, mean, q);
    part[tid] = second;
    tree_reduce(part);
    if (tid == 0) {
#pragma unroll
      for (int q = 0; q < kNumStatQuantities; ++q) total.centred_sq[q] = part[0].centred_sq[q];
      total.centred_cross = part[0].centred_cross;
      finish_stats(total, p.out_stats + b * kNumStatColumns, p.out_counts + b * kNumCountColumns);
    }
    __syncthreads();  // thread 0 reads part[0] above before the next sequence overwrites it
  }
}

}  // namespace

int64_t finish_cuda_workspace_bytes(int64_t, int64_t) { return 0; }  // one block per sequence: no partials

void finish_cuda(const FinishParams& p) {
  if (p.B == 0) return;
  DeviceGuard device(p.launch.device_index);
  const auto stream = static_cast<cudaStream_t>(p.launch.stream);
  const int64_t plane = p.B * p.T;
  // With T == 0 there are no positions, but every sequence still gets its (empty) statistics.
  if (plane > 0) {
    finish_tokens_kernel<<<grid_for((plane + kTokenThreads - 1) / kTokenThreads), kTokenThreads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "finish_tokens_kernel launch");
  }
  sequence_stats_kernel<<<grid_for(p.B), kStatThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "sequence_stats_kernel launch");
}

}  // namespace mppm
