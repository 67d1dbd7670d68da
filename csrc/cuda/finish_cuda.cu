// CUDA `energy_finish`: the computation of finish_cpu.cpp on the GPU, with the same arithmetic
// (energy_math.h) and the same two passes per sequence, the additions grouped as below.
//
//   finish_tokens_kernel   one thread per position: its ten per-token planes from its parts.
//   stats_first_kernel     one block per chunk of a sequence: the chunk's first-pass sums (counts and
//                          sums of every stat quantity) into the workspace.
//   stats_second_kernel    one block per chunk: the sequence's means from all its chunks' first-pass
//                          sums (every block combines them in the same order, so every block has the
//                          same means to the bit), then the chunk's centred second moments.
//   stats_final_kernel     one block per sequence: both passes' chunk sums combined, the statistics.
//
// A sequence is cut into chunks by its length alone (chunk_plan), never by the device or by timing,
// and every sum runs in a fixed order (per-thread loops over a fixed position assignment, then a fixed
// shared-memory tree, then the chunks in a fixed tree), so every output is bitwise reproducible from
// run to run and from GPU to GPU. Splitting the sequence lets B = 1, T = 32768 occupy 128 blocks
// instead of one: the statistics were one 128-thread block per sequence, two dependent passes of
// double log/exp per position on a single SM (0.1-0.4 ms next to a ~0.85 ms row pass on an H100).
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

// Statistics kernels: each thread keeps a whole StatSums (200 bytes) in shared memory for the tree
// reduction; 128 threads need 25 KiB, well inside the 48 KiB of static shared memory.
constexpr int kStatThreads = 128;
// Chunks of at least 2 positions per thread (below that a block's tree costs more than its loads),
// at most 256 of them per sequence (every block of the second pass re-combines all of its sequence's
// first-pass chunk sums: 256 * 200 bytes = 50 KiB from L2, next to the chunk's own reads).
// T = 32768: 128 chunks of 256 positions; T = 10^6: 256 chunks of 3907.
constexpr int64_t kMinChunk = 2 * kStatThreads;
constexpr int64_t kMaxChunks = 256;

struct ChunkPlan {
  int64_t chunks = 1;  // per sequence, >= 1 (a sequence with T = 0 still gets its empty statistics)
  int64_t length = 0;  // positions per chunk; the last chunk may be shorter or empty
};

ChunkPlan chunk_plan(int64_t T) {
  ChunkPlan plan;
  plan.chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, (T + kMinChunk - 1) / kMinChunk));
  plan.length = (T + plan.chunks - 1) / plan.chunks;
  return plan;
}

// The workspace: the first-pass sums of every chunk ([B, chunks] StatSums), then the second-pass ones.
struct StatsWorkspace {
  StatSums* first;
  StatSums* second;
};

StatsWorkspace stats_workspace(void* base, int64_t B, const ChunkPlan& plan) {
  StatSums* const first = static_cast<StatSums*>(base);
  return StatsWorkspace{first, first + B * plan.chunks};
}

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

// Raw shared storage for one StatSums per thread: StatSums has default member initialisers, which a
// __shared__ variable cannot have.
struct SharedSums {
  alignas(StatSums) unsigned char storage[kStatThreads * sizeof(StatSums)];
  __device__ StatSums* get() { return reinterpret_cast<StatSums*>(storage); }
};

// Every thread's `mine` into one total by a fixed-shape tree (part[i] absorbs part[i + stride] for
// halving strides, so the order of the additions never changes); the total is returned to every thread.
// The trailing barrier lets the caller reuse `part` right away.
__device__ __forceinline__ StatSums block_total(StatSums* part, const StatSums& mine) {
  static_assert((kStatThreads & (kStatThreads - 1)) == 0, "the tree needs a power-of-two block");
  part[threadIdx.x] = mine;
  __syncthreads();
#pragma unroll
  for (int stride = kStatThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) merge(part[threadIdx.x], part[threadIdx.x + stride]);
    __syncthreads();
  }
  const StatSums total = part[0];
  __syncthreads();  // everyone has read part[0] before it is overwritten
  return total;
}

// The sum of a sequence's `chunks` chunk sums in a fixed order: thread i adds chunks i, i + 128, ...
// in turn, then the tree. The same in every block that calls it for the same sequence.
__device__ __forceinline__ StatSums chunks_total(StatSums* part, const StatSums* chunk_sums, int64_t chunks) {
  StatSums mine;
  for (int64_t c = threadIdx.x; c < chunks; c += kStatThreads) merge(mine, chunk_sums[c]);
  return block_total(part, mine);
}

// The positions [start, end) of chunk k of a sequence of T positions.
__device__ __forceinline__ void chunk_range(const ChunkPlan& plan, int64_t T, int64_t k, int64_t* start, int64_t* end) {
  *start = min(T, k * plan.length);
  *end = min(T, *start + plan.length);
}

__global__ void __launch_bounds__(kStatThreads) stats_first_kernel(const FinishParams p, const ChunkPlan plan,
                                                                   StatsWorkspace ws) {
  __shared__ SharedSums shared;
  for (int64_t block = blockIdx.x; block < p.B * plan.chunks; block += gridDim.x) {
    const int64_t b = block / plan.chunks;
    int64_t start, end;
    chunk_range(plan, p.T, block % plan.chunks, &start, &end);
    StatSums mine;
    for (int64_t t = start + threadIdx.x; t < end; t += kStatThreads)
      if (const PositionParts q = load_parts(p, b * p.T + t); q.valid()) add_first_pass(mine, q);
    const StatSums total = block_total(shared.get(), mine);
    if (threadIdx.x == 0) ws.first[block] = total;
  }
}

__global__ void __launch_bounds__(kStatThreads) stats_second_kernel(const FinishParams p, const ChunkPlan plan,
                                                                    StatsWorkspace ws) {
  __shared__ SharedSums shared;
  for (int64_t block = blockIdx.x; block < p.B * plan.chunks; block += gridDim.x) {
    const int64_t b = block / plan.chunks;
    const StatSums first = chunks_total(shared.get(), ws.first + b * plan.chunks, plan.chunks);
    double mean[kNumStatQuantities];
    first_pass_means(first, mean);
    int64_t start, end;
    chunk_range(plan, p.T, block % plan.chunks, &start, &end);
    StatSums mine;
    for (int64_t t = start + threadIdx.x; t < end; t += kStatThreads)
      if (const PositionParts q = load_parts(p, b * p.T + t); q.valid()) add_second_pass(mine, mean, q);
    const StatSums total = block_total(shared.get(), mine);
    if (threadIdx.x == 0) ws.second[block] = total;
  }
}

__global__ void __launch_bounds__(kStatThreads) stats_final_kernel(const FinishParams p, const ChunkPlan plan,
                                                                   StatsWorkspace ws) {
  __shared__ SharedSums shared;
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    StatSums total = chunks_total(shared.get(), ws.first + b * plan.chunks, plan.chunks);
    const StatSums second = chunks_total(shared.get(), ws.second + b * plan.chunks, plan.chunks);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int q = 0; q < kNumStatQuantities; ++q) total.centred_sq[q] = second.centred_sq[q];
      total.centred_cross = second.centred_cross;
      finish_stats(total, p.out_stats + b * kNumStatColumns, p.out_counts + b * kNumCountColumns);
    }
  }
}

}  // namespace

int64_t finish_cuda_workspace_bytes(int64_t B, int64_t T) {
  return 2 * B * chunk_plan(T).chunks * int64_t(sizeof(StatSums));
}

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
  const ChunkPlan plan = chunk_plan(p.T);
  const StatsWorkspace ws = stats_workspace(p.workspace, p.B, plan);
  const unsigned blocks = grid_for(p.B * plan.chunks);
  stats_first_kernel<<<blocks, kStatThreads, 0, stream>>>(p, plan, ws);
  check_cuda(cudaGetLastError(), "stats_first_kernel launch");
  stats_second_kernel<<<blocks, kStatThreads, 0, stream>>>(p, plan, ws);
  check_cuda(cudaGetLastError(), "stats_second_kernel launch");
  stats_final_kernel<<<grid_for(p.B), kStatThreads, 0, stream>>>(p, plan, ws);
  check_cuda(cudaGetLastError(), "stats_final_kernel launch");
}

}  // namespace mppm
