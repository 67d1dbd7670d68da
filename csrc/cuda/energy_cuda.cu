// CUDA `energy`: the computation of energy_cpu.cpp on the GPU, with the same semantics and faults.
//
//   energy_rows_kernel     one block per position (b, t): reads the logits row once (online logsumexp
//                          + the target logit) and the two hidden rows of the step into t, writes the
//                          parts (scratch) and out_defined, and reports the first faulty row.
//   row_partials_kernel    only when B*T is small next to the GPU (a few long rows would leave most SMs
//                          idle): S blocks per row, each reducing one fixed slice of the logits row to a
//                          partial (max, sum of exp, non-finite flag); energy_rows_kernel then combines
//                          the S partials of its row in slice order instead of reading the row.
// Then, when no row is faulty, the shared finish (finish_cuda.cu) turns the parts into the per-token
// planes and the per-sequence statistics.
//
// All these kernels reduce in a fixed order (per-thread loops with a fixed element assignment, then
// fixed shuffle and shared-memory trees), so every output is bitwise reproducible from run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "mppm/energy.h"
#include "mppm/energy_math.h"
#include "mppm/finish.h"
#include "cuda_host.cuh"

namespace mppm {
namespace {

// Row kernel: a row is V elements (tens to hundreds of thousands). 256 threads, each with four 16-byte
// loads in flight, keep 16 KiB per block in flight; kRowBlocksPerSM blocks share an SM (64 KiB in
// flight, several times what hides DRAM latency on A100/H100), so one block's reduction tail overlaps
// the others' streaming. 512 threads would put no more bytes in flight per SM (the register file, not
// the block size, bounds the threads per SM) and would leave more threads idle in every row's tail.
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kUnroll = 4;  // 16-byte vectors loaded per thread before any of them is used
// Caps the kernel at 64 registers per thread, which it fits without spilling (unbounded, sm_80 takes
// 79 and only 3 blocks fit).
constexpr int kRowBlocksPerSM = 4;

constexpr unsigned kFullWarp = 0xffffffffu;

// The fault word packs (row << 2) | kind, so one atomicMin keeps the smallest faulty row together with
// its fault. All ones (what cudaMemsetAsync(0xff) gives) means no fault.
constexpr unsigned long long kNoFault = ~0ull;
static_assert(static_cast<int>(EnergyFault::NonFiniteHidden) < 4, "a fault kind must fit in two bits");

// ---------------------------------------------------------------------------------------------------
// Element access

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The 16 / sizeof(T) elements of a 16-byte vector, as float. Little-endian: in each 32-bit word the
// 16-bit element with the lower index is the low half.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float* x);

template <>
__device__ __forceinline__ void unpack<float>(const uint4& v, float* x) {
  x[0] = __uint_as_float(v.x);
  x[1] = __uint_as_float(v.y);
  x[2] = __uint_as_float(v.z);
  x[3] = __uint_as_float(v.w);
}

template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& v, float* x) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w[i] & 0xffffu)));
    x[2 * i + 1] = __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(w[i] >> 16)));
  }
}

template <>
__device__ __forceinline__ void unpack<__half>(const uint4& v, float* x) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    x[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}

__device__ __forceinline__ int64_t load_token(const EnergyParams& p, int64_t b, int64_t t) {
  const int64_t offset = b * p.tokens_sb + t * p.tokens_st;
  return p.tokens_dtype == DType::Int32 ? int64_t(static_cast<const int32_t*>(p.tokens)[offset])
                                        : static_cast<const int64_t*>(p.tokens)[offset];
}

__device__ __forceinline__ bool is_real(const EnergyParams& p, int64_t b, int64_t t, int64_t token) {
  const uint8_t* m = p.mask ? p.mask + b * p.mask_sb + t * p.mask_st : nullptr;
  return token_is_real(token, m, p.ignore_index);
}

__device__ __forceinline__ bool in_vocab(int64_t token, int64_t V) { return token >= 0 && token < V; }

// ---------------------------------------------------------------------------------------------------
// Per-thread row work

// A thread's online logsumexp over its share of a row: running max m and sum of exp(x - m).
struct OnlineLse {
  float m;
  float s;
  float poison;  // x * 0 summed: 0 for finite x, NaN once an inf or NaN was seen
};

// Folds K elements into the state with one rescale for all of them (one extra exp per 16 or 32
// elements instead of one per element). The K terms are summed apart before being added to s, which
// bounds the fp32 rounding error by about (K + elements / K) ulp instead of elements ulp.
template <int K>
__device__ __forceinline__ void absorb(OnlineLse& a, const float (&x)[K]) {
  float chunk_max = x[0];
#pragma unroll
  for (int i = 1; i < K; ++i) chunk_max = fmaxf(chunk_max, x[i]);
#pragma unroll
  for (int i = 0; i < K; ++i) a.poison = fmaf(x[i], 0.0f, a.poison);
  if (chunk_max > a.m) {
    a.s *= expf(a.m - chunk_max);  // exp(-inf) = 0 on the first chunk
    a.m = chunk_max;
  }
  float chunk_sum = 0.0f;
#pragma unroll
  for (int i = 0; i < K; ++i) chunk_sum += expf(x[i] - a.m);
  a.s += chunk_sum;
}

template <typename T>
__device__ __forceinline__ void absorb_element(OnlineLse& a, T x) {
  const float one[1] = {to_float(x)};
  absorb(a, one);
}

// This thread's share of logsumexp(row[0, n)). The bulk is read as 16-byte vectors from the first
// 16-byte boundary on; the fewer than 16 / sizeof(T) elements before it and after the last whole
// vector are read one per thread. Rows of a contiguous tensor with V * sizeof(T) % 16 == 0 (and a
// 16-byte aligned base) have neither. Assumes the row is aligned to its element size, as every DLPack
// producer's tensors are. Which thread reads which element depends only on n and the row's address,
// so the result is reproducible.
template <typename T>
__device__ __forceinline__ OnlineLse logsumexp_part(const T* row, int64_t n) {
  constexpr int kVec = 16 / sizeof(T);
  const int tid = threadIdx.x;
  OnlineLse a{-INFINITY, 0.0f, 0.0f};

  const int64_t to_boundary_bytes = int64_t((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16);
  const int64_t to_boundary = to_boundary_bytes / int64_t(sizeof(T));
  const int64_t head = to_boundary < n ? to_boundary : n;
  const int64_t n_vec = (n - head) / kVec;
  const int64_t tail = head + n_vec * kVec;

  if (tid < head) absorb_element(a, row[tid]);

  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * kRowThreads < n_vec; i += kUnroll * kRowThreads) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(vec + i + u * kRowThreads);
    float x[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack<T>(v[u], x + u * kVec);
    absorb(a, x);
  }
  for (; i < n_vec; i += kRowThreads) {
    float x[kVec];
    unpack<T>(__ldg(vec + i), x);
    absorb(a, x);
  }

  if (tid < n - tail) absorb_element(a, row[tail + tid]);
  return a;
}

// This thread's share of ||a - b||^2 over [0, n), in double (exact differences of the inputs; the CPU
// forms differences and squares in float lanes, so the two agree to rounding, not bitwise). Scalar
// loads: the hidden rows are 1-2% of the bytes of a logits row.
template <typename T>
__device__ __forceinline__ double squared_distance_part(const T* a, const T* b, int64_t n) {
  double acc = 0.0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < n; i += kRowThreads) {
    const double diff = double(to_float(a[i])) - double(to_float(b[i]));
    acc += diff * diff;
  }
  return acc;
}

// Warp reductions. The max is exact in any order; the sum is a fixed tree whose total lands in lane 0.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFullWarp, v, offset);
  return v;
}

struct RowScratch {
  float warp_max[kRowWarps];
  double warp_lse[kRowWarps];
  double warp_sq[kRowWarps];
};

// ---------------------------------------------------------------------------------------------------
// Split rows (stage 1): the partial of one slice of a logits row

struct RowPartial {
  float m;       // max over the slice (-inf for an empty slice or a row without a log-prob)
  float poison;  // nonzero when the slice holds an inf or NaN
  double s;      // sum of exp(x - m) over the slice
};

// Slices are multiples of 64 elements, so every slice of an aligned row starts on a 16-byte boundary.
constexpr int64_t kSliceAlign = 64;
// A slice shorter than this is not worth a block: its reduction tail would cost more than its reads.
constexpr int64_t kMinSlice = 4096;

__device__ __forceinline__ bool row_has_log_prob(const EnergyParams& p, int64_t b, int64_t t, int64_t* target) {
  const int64_t token = load_token(p, b, t);
  if (!is_real(p, b, t, token) || !in_vocab(token, p.V) || t + 1 >= p.T) return false;
  *target = load_token(p, b, t + 1);
  return is_real(p, b, t + 1, *target) && in_vocab(*target, p.V);
}

// Block (row, k) of a grid of n_rows * splits blocks reduces slice k of the row: elements
// [k * slice, min(V, (k + 1) * slice)). The same per-thread online logsumexp and warp trees as a whole
// row, so the partials, and the combine in energy_rows_kernel, are reproducible.
template <typename LT>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM)
    row_partials_kernel(const EnergyParams p, int splits, int64_t slice, RowPartial* partials) {
  __shared__ float warp_max_s[kRowWarps];
  __shared__ double warp_sum_s[kRowWarps];
  const int64_t n_rows = p.B * p.T;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t block = blockIdx.x; block < n_rows * splits; block += gridDim.x) {
    const int64_t row = block / splits, k = block % splits;
    const int64_t b = row / p.T, t = row % p.T;
    const int64_t start = k * slice;
    const int64_t len = start < p.V ? (p.V - start < slice ? p.V - start : slice) : 0;
    int64_t target = 0;
    OnlineLse a{-INFINITY, 0.0f, 0.0f};
    if (len > 0 && row_has_log_prob(p, b, t, &target)) {
      const LT* logits = static_cast<const LT*>(p.logits) + (b * p.logits_sb + t * p.logits_st);
      a = logsumexp_part(logits + start, len);
    }
    const float m_warp = warp_max(a.m);
    if (lane == 0) warp_max_s[warp] = m_warp;
    const bool poisoned = __syncthreads_or(a.poison != 0.0f);
    float m = warp_max_s[0];
#pragma unroll
    for (int w = 1; w < kRowWarps; ++w) m = fmaxf(m, warp_max_s[w]);
    const double part = a.m == -INFINITY ? 0.0 : double(a.s) * exp(double(a.m) - double(m));
    const double sum_warp = warp_sum(part);
    if (lane == 0) warp_sum_s[warp] = sum_warp;
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0.0;
#pragma unroll
      for (int w = 0; w < kRowWarps; ++w) sum += warp_sum_s[w];
      partials[block] = RowPartial{m, poisoned ? 1.0f : 0.0f, sum};
    }
    __syncthreads();  // the shared arrays are reused by the next block-row
  }
}

// ---------------------------------------------------------------------------------------------------
// The row kernel: one block per position

// process_position of energy_cpu.cpp for one row, by the whole block. The returned fault is meaningful
// in thread 0 (the other threads may not know about NonFiniteHidden). The parts are written only when the
// row has no fault, as on the CPU.
// With `partials` (split rows), the row's logits are not read here: thread k < splits takes the partial
// of slice k as its online-logsumexp state, and the combine below is the one a whole row gets.
template <typename LT, typename HT>
__device__ __forceinline__ EnergyFault process_row(const EnergyParams& p, int64_t row, RowScratch& scratch,
                                                   const RowPartial* partials, int splits) {
  const int64_t b = row / p.T;
  const int64_t t = row % p.T;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  // Every thread evaluates the token tests itself (the loads are broadcasts), so every branch below
  // that contains a barrier is taken by the whole block or by none of it.
  const int64_t token = load_token(p, b, t);
  const bool real = is_real(p, b, t, token);
  if (real && !in_vocab(token, p.V)) return EnergyFault::TokenOutOfRange;
  bool has_lp = false;
  int64_t target = 0;
  if (real && t + 1 < p.T) {
    target = load_token(p, b, t + 1);
    has_lp = is_real(p, b, t + 1, target) && in_vocab(target, p.V);
  }
  const bool has_k = real && t > 0 && is_real(p, b, t - 1, load_token(p, b, t - 1));

  OnlineLse lse{-INFINITY, 0.0f, 0.0f};
  double lse_s = 0.0;  // the thread's sum of exp(x - lse.m), in double so that partials keep theirs
  float target_logit = 0.0f;
  if (has_lp) {
    const LT* logits = static_cast<const LT*>(p.logits) + (b * p.logits_sb + t * p.logits_st);
    if (tid == 0) target_logit = to_float(logits[target]);
    if (partials == nullptr) {
      lse = logsumexp_part(logits, p.V);
      lse_s = double(lse.s);
    } else if (tid < splits) {
      const RowPartial q = partials[row * splits + tid];
      lse = OnlineLse{q.m, 0.0f, q.poison};
      lse_s = q.s;
    }
  }
  double sq_part = 0.0;
  if (has_k) {
    const HT* hidden = static_cast<const HT*>(p.hidden) + b * p.hidden_sb;
    sq_part = squared_distance_part(hidden + t * p.hidden_st, hidden + (t - 1) * p.hidden_st, p.d);
  }

  float row_max = 0.0f;
  double lse_part = 0.0;
  if (has_lp) {
    const float m = warp_max(lse.m);
    if (lane == 0) scratch.warp_max[warp] = m;
    // The barrier that publishes the warp maxima also ORs the threads' non-finite flags.
    if (__syncthreads_or(lse.poison != 0.0f)) return EnergyFault::NonFiniteLogits;
    row_max = scratch.warp_max[0];
#pragma unroll
    for (int w = 1; w < kRowWarps; ++w) row_max = fmaxf(row_max, scratch.warp_max[w]);
    // The threads' sums are rescaled to the row max and combined in double, so the combine adds no
    // error to that of the per-thread fp32 sums. Threads that read nothing have m = -inf and s = 0,
    // giving 0.
    lse_part = lse.m == -INFINITY ? 0.0 : lse_s * exp(double(lse.m) - double(row_max));
  }
  double lse_sum = 0.0, sq_sum = 0.0;
  if (has_lp || has_k) {
    const double lse_warp = warp_sum(lse_part);
    const double sq_warp = warp_sum(sq_part);
    if (lane == 0) {
      scratch.warp_lse[warp] = lse_warp;
      scratch.warp_sq[warp] = sq_warp;
    }
    __syncthreads();
    if (tid == 0) {
      // The final combine of the warp totals stays in double, in warp order.
#pragma unroll
      for (int w = 0; w < kRowWarps; ++w) {
        lse_sum += scratch.warp_lse[w];
        sq_sum += scratch.warp_sq[w];
      }
    }
  }
  if (tid != 0) return EnergyFault::None;

  const double lp = has_lp ? double(target_logit) - (double(row_max) + log(lse_sum)) : 0.0;
  const double kinetic = has_k ? 0.5 * sq_sum : 0.0;
  if (has_k && !isfinite(kinetic)) return EnergyFault::NonFiniteHidden;
  record_parts(p, row, has_lp, lp, has_k, kinetic);
  return EnergyFault::None;
}

template <typename LT, typename HT>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM)
    energy_rows_kernel(const EnergyParams p, unsigned long long* fault, const RowPartial* partials, int splits) {
  __shared__ RowScratch scratch;
  const int64_t n_rows = p.B * p.T;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const EnergyFault f = process_row<LT, HT>(p, row, scratch, partials, splits);
    if (threadIdx.x == 0 && f != EnergyFault::None)
      atomicMin(fault, (static_cast<unsigned long long>(row) << 2) | static_cast<unsigned long long>(f));
    // The next row reuses the scratch, which thread 0 may still be reading.
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// Host side

// How many slices each row is cut into: 1 (no split) unless the rows cannot fill the GPU with
// kRowBlocksPerSM blocks per SM, then enough to fill it, with slices of at least kMinSlice elements and
// at most kRowThreads of them (one per combining thread). E.g. 8 rows of V = 128256 on a 132-SM H100:
// 528 block slots / 8 rows = 66 slices of 1984 -> capped by kMinSlice at 31 slices of 4160 elements.
// The split depends only on the shapes and the device, never on timing, so results are reproducible
// on a given GPU model.
struct Split {
  int splits = 1;
  int64_t slice = 0;
};

Split choose_split(int64_t n_rows, int64_t V, int device) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t slots = int64_t(sms) * kRowBlocksPerSM;
  Split split;
  if (n_rows * 2 > slots) return split;  // enough rows: one block per row already fills the GPU
  int64_t want = (slots + n_rows - 1) / n_rows;
  want = std::min<int64_t>(want, std::max<int64_t>(1, V / kMinSlice));
  want = std::min<int64_t>(want, kRowThreads);
  if (want <= 1) return split;
  int64_t slice = (V + want - 1) / want;
  slice = (slice + kSliceAlign - 1) / kSliceAlign * kSliceAlign;
  split.slice = slice;
  split.splits = int((V + slice - 1) / slice);
  return split;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<element type>) for a floating dtype that bindings.cpp admits.
template <typename F>
void with_float_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::Float16: f(TypeTag<__half>{}); return;
    default: throw std::invalid_argument(std::string("energy_cuda: unsupported dtype ") + dtype_name(dtype));
  }
}

template <typename T>
int64_t copy_to_host(const void* base, int64_t offset, cudaStream_t stream) {
  T value{};
  check_cuda(cudaMemcpyAsync(&value, static_cast<const T*>(base) + offset, sizeof(T), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (token)");
  check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return int64_t(value);
}

}  // namespace

EnergyStatus energy_cuda(const EnergyParams& p) {
  EnergyStatus status;
  if (p.B == 0) return status;
  DeviceGuard device(p.launch.device_index);
  const auto stream = static_cast<cudaStream_t>(p.launch.stream);

  const int64_t n_rows = p.B * p.T;
  // With T == 0 there are no rows, but the finish still writes every sequence's (empty) statistics.
  if (n_rows > 0) {
    StreamBuffer<unsigned long long> fault(1, stream, "cudaMallocAsync (fault word)");
    check_cuda(cudaMemsetAsync(fault.get(), 0xff, sizeof(unsigned long long), stream), "cudaMemsetAsync");
    const Split split = choose_split(n_rows, p.V, p.launch.device_index);
    StreamBuffer<RowPartial> partials(split.splits > 1 ? n_rows * split.splits : 0, stream,
                                      "cudaMallocAsync (partials)");
    with_float_type(p.logits_dtype, [&](auto logits_tag) {
      using LT = typename decltype(logits_tag)::type;
      if (split.splits > 1) {
        row_partials_kernel<LT><<<grid_for(n_rows * split.splits), kRowThreads, 0, stream>>>(
            p, split.splits, split.slice, partials.get());
        check_cuda(cudaGetLastError(), "row_partials_kernel launch");
      }
      with_float_type(p.hidden_dtype, [&](auto hidden_tag) {
        using HT = typename decltype(hidden_tag)::type;
        energy_rows_kernel<LT, HT><<<grid_for(n_rows), kRowThreads, 0, stream>>>(p, fault.get(), partials.get(),
                                                                                  split.splits);
      });
    });
    check_cuda(cudaGetLastError(), "energy_rows_kernel launch");

    unsigned long long word = kNoFault;
    check_cuda(cudaMemcpyAsync(&word, fault.get(), sizeof word, cudaMemcpyDeviceToHost, stream),
               "cudaMemcpyAsync (fault)");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    if (word != kNoFault) {
      const int64_t row = static_cast<int64_t>(word >> 2);
      status.fault = static_cast<EnergyFault>(word & 3u);
      status.b = row / p.T;
      status.t = row % p.T;
      const int64_t offset = status.b * p.tokens_sb + status.t * p.tokens_st;
      status.token = p.tokens_dtype == DType::Int32 ? copy_to_host<int32_t>(p.tokens, offset, stream)
                                                    : copy_to_host<int64_t>(p.tokens, offset, stream);
      return status;
    }
  }

  finish_cuda(finish_of(p));
  return status;
}

}  // namespace mppm
