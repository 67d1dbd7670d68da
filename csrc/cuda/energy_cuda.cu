// CUDA `energy`: the computation of energy_cpu.cpp on the GPU, with the same semantics and faults.
//
//   energy_rows_kernel     one block per position (b, t): reads the logits row of a real state once
//                          (online softmax with the entropy accumulator, online_softmax.h, + the target
//                          logit) and the two hidden rows of the step into t, writes the parts
//                          (scratch) and out_defined, and reports the first faulty row.
//   row_partials_kernel    only when B*T is small next to the GPU (a few long rows would leave most SMs
//                          idle): S blocks per row, each reducing one fixed slice of the logits row to a
//                          partial (max, sums of exp and of the entropy's terms, NaN/+inf flag);
//                          energy_rows_kernel then combines the S partials of its row in slice order
//                          instead of reading the row.
// Then the shared finish (finish_cuda.cu) turns the parts into the per-token planes and the
// per-sequence statistics. Faults are left in the fault word for the caller to read (energy.h).
//
// All these kernels reduce in a fixed order (per-thread loops with a fixed element assignment, then
// fixed shuffle and shared-memory trees), so every output is bitwise reproducible from run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// A bfloat16 is the upper half of the float32 it stands for: one shift or one mask per element (the
// conversion intrinsics of a 16-bit value cost two instructions for the upper element of a word).
template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const uint4& v, float* x) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
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

// The max of K floats (fmaxf ignores a NaN unless all are NaN; absorb's sum catches it).
template <int K>
__device__ __forceinline__ float max_of(const float (&x)[K]) {
  float m = x[0];
#pragma unroll
  for (int i = 1; i < K; ++i) m = fmaxf(m, x[i]);
  return m;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename P>
__device__ __forceinline__ P as_pair(uint32_t w) {
  static_assert(sizeof(P) == sizeof(w), "a pair of 16-bit values is a 32-bit word");
  P pair;
  memcpy(&pair, &w, sizeof w);
  return pair;
}

// The max of the elements of U 16-byte vectors of T, given also unpacked in x (NaN as in max_of).
// 16-bit elements are compared two at a time in their own format (HMNMX2: 15 instructions for the 32
// elements of four vectors instead of 31 FMNMX); the max of exact values is exact in any format.
template <typename T, int U>
__device__ __forceinline__ float vectors_max(const uint4 (&v)[U], const float (&x)[U * 16 / sizeof(T)]) {
  if constexpr (sizeof(T) == 4) {
    return max_of(x);
  } else {
    using P = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    P m = as_pair<P>(v[0].x);
#pragma unroll
    for (int k = 1; k < 4 * U; ++k) m = __hmax2(m, as_pair<P>(word(v[k / 4], k % 4)));
    return fmaxf(__low2float(m), __high2float(m));
  }
}

__device__ __forceinline__ int64_t load_id(const void* ids, DType dtype, int64_t offset) {
  return dtype == DType::Int32 ? int64_t(static_cast<const int32_t*>(ids)[offset])
                               : static_cast<const int64_t*>(ids)[offset];
}

__device__ __forceinline__ int64_t load_token(const EnergyParams& p, int64_t b, int64_t t) {
  return load_id(p.tokens, p.tokens_dtype, b * p.tokens_sb + t * p.tokens_st);
}

__device__ __forceinline__ int64_t load_label(const EnergyParams& p, int64_t b, int64_t t) {
  return load_id(p.labels, p.labels_dtype, b * p.labels_sb + t * p.labels_st);
}

// Whether `id` at (b, t) takes part (a token: the state is real; a label: the target is scored).
__device__ __forceinline__ bool takes_part(const EnergyParams& p, int64_t b, int64_t t, int64_t id) {
  const uint8_t* m = p.mask ? p.mask + b * p.mask_sb + t * p.mask_st : nullptr;
  return id_takes_part(id, m, p.ignore_index);
}

__device__ __forceinline__ bool state_real(const EnergyParams& p, int64_t b, int64_t t) {
  return takes_part(p, b, t, load_token(p, b, t));
}

// ---------------------------------------------------------------------------------------------------
// Per-thread row work

// The hot loop works in base 2 on logits prescaled by c2 = fl(c * log2(e)) (c = 1 / temperature): an
// element costs one FFMA, d = z * c2 - m, and one MUFU.EX2 (ex2.approx.ftz), where expf(z * c - m)
// costs a multiply, a two-constant range reduction, the MUFU and a denormal fix-up. With the max taken
// two bf16 at a time and one non-finite test per chunk, the bf16 main loop went from 17.6 to 7.5 SASS
// instructions per element on sm_90 (bench/sass_loop.py; bench/results/README.md), so it no longer
// caps the kernel near HBM bandwidth.
// Error bound, against the float64 definition on the same inputs:
// - ex2.approx.ftz.f32 has a relative error below 2^-22 (2 ulp; expf's bound is 2 ulp too); the terms
//   are positive, so s = sum 2^d carries at most that relative error plus the fp32 summation's
//   (absorb), i.e. <= 2.4e-7 + (K + n/K) * 6e-8 relative, <= ~5e-7 absolute in logsumexp and entropy.
//   Results below 2^-126 flush to 0: terms under e^-87 of the row's largest, < 1e-37 of s.
// - The reference point m cancels exactly (s, u and the max are all taken against the same fp32 m;
//   the combine works in double), so the rounding of fl(zmax * c2) costs nothing.
// - fl(c2) = c * log2(e) * k with |k - 1| = |delta| <= 2^-24 (1.3e-8 for c = 1): the kernel computes the
//   softmax of k * x instead of x (x = z * c). finish_row corrects logsumexp to first order,
//   lse(x) = (lse(kx) + delta * H(kx)) / k, exact for any constant offset of the logits (the
//   uncorrected error would be delta * E_p[x], 4e-7 at E_p[x] = 30); the entropy keeps an error of
//   delta * Var_p[x] (<= 1.2e-7 at c = 1 and Var = 9; <= 5.4e-7 for other temperatures, where the CPU
//   kernels' fl(c) has the same size of error). All of it is inside the tolerance rule of
//   python_tests/helpers.py (1e-6 + 2.5e-7 |truth| + 2 x the float32 reference's error).
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLog2e = 1.44269504088896340736;

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A thread's online softmax over its share of a row (online_softmax.h, in float and base 2): m is the
// running max of y = z * c2, s = sum 2^(y - m), u = sum 2^(y - m) * (y - m) (u * ln 2 is online_softmax.h's u of
// the natural-unit values y * ln 2).
struct OnlineSoftmax {
  float m;
  float s;
  float u;
  bool bad;  // a NaN or +inf was seen, or a logit so large that z * c2 overflows (-inf is legal)
};

// Folds K raw logits, whose max (NaN ignored) is chunk_max, into the state with one rescale for all of
// them (one extra exp per 16 or 32 elements instead of one per element). The K terms are summed apart
// before being added to s and u, which bounds the fp32 rounding error by about (K + elements / K) ulp
// instead of elements ulp. The max is taken of the raw z (fl(z * c2) is monotonic in z, c2 > 0), and
// the non-finite check is one test per chunk, not per element: a NaN makes its d and the chunk's sum
// NaN, a +inf makes m = +inf (and its d NaN); each fails chunk_sum + m < inf. A -inf element adds
// 2^-inf = 0 to s and 0 * max(-inf, -FLT_MAX) = 0 to u. Only logits beyond float32 after the scale,
// |z / temperature| > FLT_MAX / log2(e) = 2.4e38, differ from the CPU kernels: z * c2 overflows, so a
// row with such a positive logit is reported as non-finite and one with only such negative ones as
// having no finite entry.
template <int K>
__device__ __forceinline__ void absorb(OnlineSoftmax& a, const float (&z)[K], float chunk_max, float c2) {
  const float m = chunk_max * c2;
  if (m > a.m) {
    if (a.m != -INFINITY) {
      const float r = exp2f(a.m - m);  // rare (O(log n) times a thread): the library's exp2f, no flush
      a.u = r * (a.u + a.s * (a.m - m));
      a.s *= r;
    }
    a.m = m;
  }
  if (a.m == -INFINITY) {  // nothing finite yet: the chunk is -inf and NaN only (rare), and adds nothing
#pragma unroll
    for (int i = 0; i < K; ++i) a.bad |= isnan(z[i]);
    return;
  }
  const float neg_m = -a.m;
  // The first term starts the sums (0 + e is not e for e = -0, so the compiler would keep the add).
  const float d0 = fmaf(z[0], c2, neg_m);
  float chunk_sum = ex2_approx(d0);
  float chunk_ent = chunk_sum * fmaxf(d0, -FLT_MAX);
#pragma unroll
  for (int i = 1; i < K; ++i) {
    const float d = fmaf(z[i], c2, neg_m);
    const float e = ex2_approx(d);
    chunk_sum += e;
    chunk_ent = fmaf(e, fmaxf(d, -FLT_MAX), chunk_ent);
  }
  a.bad |= !(chunk_sum + a.m < INFINITY);
  a.s += chunk_sum;
  a.u += chunk_ent;
}

template <typename T>
__device__ __forceinline__ void absorb_element(OnlineSoftmax& a, T x, float c2) {
  const float one[1] = {to_float(x)};
  absorb(a, one, one[0], c2);
}

// This thread's share of the online softmax (base 2) of c2 * row[0, n). The bulk is read as 16-byte
// vectors from the first 16-byte boundary on; the fewer than 16 / sizeof(T) elements before it and
// after the last whole vector are read one per thread. Rows of a contiguous tensor with V * sizeof(T) % 16 == 0 (and a
// 16-byte aligned base) have neither. Assumes the row is aligned to its element size, as every DLPack
// producer's tensors are. Which thread reads which element depends only on n and the row's address,
// so the result is reproducible.
template <typename T>
__device__ __forceinline__ OnlineSoftmax softmax_part(const T* row, int64_t n, float c2) {
  constexpr int kVec = 16 / sizeof(T);
  const int tid = threadIdx.x;
  OnlineSoftmax a{-INFINITY, 0.0f, 0.0f, false};

  const int64_t to_boundary_bytes = int64_t((16 - reinterpret_cast<uintptr_t>(row) % 16) % 16);
  const int64_t to_boundary = to_boundary_bytes / int64_t(sizeof(T));
  const int64_t head = to_boundary < n ? to_boundary : n;
  const int64_t n_vec = (n - head) / kVec;
  const int64_t tail = head + n_vec * kVec;

  if (tid < head) absorb_element(a, row[tid], c2);

  const uint4* vec = reinterpret_cast<const uint4*>(row + head);
  int64_t i = tid;
  for (; i + (kUnroll - 1) * kRowThreads < n_vec; i += kUnroll * kRowThreads) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(vec + i + u * kRowThreads);
    float x[kUnroll * kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack<T>(v[u], x + u * kVec);
    absorb(a, x, vectors_max<T>(v, x), c2);
  }
  for (; i < n_vec; i += kRowThreads) {
    float x[kVec];
    unpack<T>(__ldg(vec + i), x);
    absorb(a, x, max_of(x), c2);
  }

  if (tid < n - tail) absorb_element(a, row[tail + tid], c2);
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
  double warp_sum[kRowWarps];
  double warp_ent[kRowWarps];
  double warp_sq[kRowWarps];
};

// A thread's (s, u) against its base-2 max m, with u already in natural units (u * ln 2), moved to the
// block's base-2 reference max `ref` by online_softmax.h's rule in double and natural units (m * ln 2),
// so the combine adds no error to that of the per-thread fp32 sums. Threads that saw nothing finite
// give (0, 0).
__device__ __forceinline__ void thread_sums_at(float m, double s, double u, float ref, double* s_out,
                                               double* u_out) {
  if (m == -INFINITY) s = u = 0.0;
  rescale_to(s, u, double(m) * kLn2, double(ref) * kLn2);
  *s_out = s;
  *u_out = u;
}

// c2 = fl(c * log2(e)), the prescale of the hot loop, and k = c2 * ln(2) / c, the factor by which the
// kernel's softmax is that of k * x rather than x (see the error bound above ex2_approx).
struct Prescale {
  float c2;
  double k;
};

__device__ __forceinline__ Prescale prescale_of(double inv_temperature) {
  const float c2 = float(inv_temperature * kLog2e);
  return Prescale{c2, double(c2) * kLn2 / inv_temperature};
}

// ---------------------------------------------------------------------------------------------------
// Split rows (stage 1): the partial of one slice of a logits row

// In the units of the hot loop: y = z * c2 (base 2), and u in natural units (y * ln 2).
struct RowPartial {
  float m;       // max of y over the slice (-inf for an empty slice, a row not read, or no finite entry)
  float poison;  // nonzero when the slice holds a NaN or +inf (or overflows z * c2)
  double s;      // sum of 2^(y - m) over the slice
  double u;      // sum of 2^(y - m) * (y - m) * ln 2 over the slice
};

// Slices are multiples of 64 elements, so every slice of an aligned row starts on a 16-byte boundary.
constexpr int64_t kSliceAlign = 64;
// A slice shorter than this is not worth a block: its reduction tail would cost more than its reads.
constexpr int64_t kMinSlice = 4096;

// The row of (b, t) is read: the state is real (and its token in range; else the row is a fault).
__device__ __forceinline__ bool row_is_read(const EnergyParams& p, int64_t b, int64_t t) {
  const int64_t token = load_token(p, b, t);
  return takes_part(p, b, t, token) && in_vocab(token, p.V);
}

// Block (row, k) of a grid of n_rows * splits blocks reduces slice k of the row: elements
// [k * slice, min(V, (k + 1) * slice)). The same per-thread online softmax and warp trees as a whole
// row, so the partials, and the combine in energy_rows_kernel, are reproducible.
template <typename LT>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM)
    row_partials_kernel(const EnergyParams p, int splits, int64_t slice, RowPartial* partials) {
  __shared__ float warp_max_s[kRowWarps];
  __shared__ double warp_sum_s[kRowWarps];
  __shared__ double warp_ent_s[kRowWarps];
  const int64_t n_rows = p.B * p.T;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float c2 = prescale_of(p.inv_temperature).c2;
  for (int64_t block = blockIdx.x; block < n_rows * splits; block += gridDim.x) {
    const int64_t row = block / splits, k = block % splits;
    const int64_t b = row / p.T, t = row % p.T;
    const int64_t start = k * slice;
    const int64_t len = start < p.V ? (p.V - start < slice ? p.V - start : slice) : 0;
    OnlineSoftmax a{-INFINITY, 0.0f, 0.0f, false};
    if (len > 0 && row_is_read(p, b, t)) {
      const LT* logits = static_cast<const LT*>(p.logits) + (b * p.logits_sb + t * p.logits_st);
      a = softmax_part(logits + start, len, c2);
    }
    const float m_warp = warp_max(a.m);
    if (lane == 0) warp_max_s[warp] = m_warp;
    const bool poisoned = __syncthreads_or(a.bad);
    float m = warp_max_s[0];
#pragma unroll
    for (int w = 1; w < kRowWarps; ++w) m = fmaxf(m, warp_max_s[w]);
    double part_s = 0.0, part_u = 0.0;
    if (!poisoned) thread_sums_at(a.m, a.s, double(a.u) * kLn2, m, &part_s, &part_u);
    const double sum_warp = warp_sum(part_s);
    const double ent_warp = warp_sum(part_u);
    if (lane == 0) {
      warp_sum_s[warp] = sum_warp;
      warp_ent_s[warp] = ent_warp;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      double sum = 0.0, ent = 0.0;
#pragma unroll
      for (int w = 0; w < kRowWarps; ++w) {
        sum += warp_sum_s[w];
        ent += warp_ent_s[w];
      }
      partials[block] = RowPartial{m, poisoned ? 1.0f : 0.0f, sum, ent};
    }
    __syncthreads();  // the shared arrays are reused by the next block-row
  }
}

// ---------------------------------------------------------------------------------------------------
// The row kernel: one block per position

// process_position of energy_cpu.cpp for one row, by the whole block. The returned fault is meaningful
// in thread 0 (the other threads may not know about NonFiniteHidden). The parts are written here only
// when the row has no fault; a faulty row's NaN parts are energy_rows_kernel's to write, as on the CPU.
// With `partials` (split rows), the row's logits are not read here: thread k < splits takes the partial
// of slice k as its online-softmax state, and the combine below is the one a whole row gets.
template <typename LT, typename HT>
__device__ __forceinline__ EnergyFault process_row(const EnergyParams& p, int64_t row, RowScratch& scratch,
                                                   const RowPartial* partials, int splits) {
  const int64_t b = row / p.T;
  const int64_t t = row % p.T;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  // Every thread evaluates the id tests itself (the loads are broadcasts), so every branch below
  // that contains a barrier is taken by the whole block or by none of it.
  const int64_t token = load_token(p, b, t);
  const bool real = takes_part(p, b, t, token);
  if (real && !in_vocab(token, p.V)) return EnergyFault::TokenOutOfRange;
  const bool prev_real = t > 0 && state_real(p, b, t - 1);
  if (prev_real) {
    const int64_t label = load_label(p, b, t);
    if (takes_part(p, b, t, label) && !in_vocab(label, p.V)) return EnergyFault::LabelOutOfRange;
  }
  bool has_lp = false;
  int64_t target = 0;
  if (real && t + 1 < p.T) {
    target = load_label(p, b, t + 1);
    has_lp = takes_part(p, b, t + 1, target) && in_vocab(target, p.V);
  }
  const bool has_k = real && prev_real;
  const Prescale scale = prescale_of(p.inv_temperature);

  OnlineSoftmax sm{-INFINITY, 0.0f, 0.0f, false};
  double sm_s = 0.0, sm_u = 0.0;  // the thread's sums, in double so that partials keep theirs; u natural
  float target_logit = 0.0f;
  if (real) {
    const LT* logits = static_cast<const LT*>(p.logits) + (b * p.logits_sb + t * p.logits_st);
    if (tid == 0 && has_lp) target_logit = to_float(logits[target]);
    if (partials == nullptr) {
      sm = softmax_part(logits, p.V, scale.c2);
      sm_s = double(sm.s);
      sm_u = double(sm.u) * kLn2;
    } else if (tid < splits) {
      const RowPartial q = partials[row * splits + tid];
      sm = OnlineSoftmax{q.m, 0.0f, 0.0f, q.poison != 0.0f};
      sm_s = q.s;
      sm_u = q.u;
    }
  }
  double sq_part = 0.0;
  if (has_k) {
    const HT* hidden = static_cast<const HT*>(p.hidden) + b * p.hidden_sb;
    sq_part = squared_distance_part(hidden + t * p.hidden_st, hidden + (t - 1) * p.hidden_st, p.d);
  }

  float row_max = 0.0f;
  double sum_part = 0.0, ent_part = 0.0;
  if (real) {
    const float m = warp_max(sm.m);
    if (lane == 0) scratch.warp_max[warp] = m;
    // The barrier that publishes the warp maxima also ORs the threads' NaN/+inf flags.
    if (__syncthreads_or(sm.bad)) return EnergyFault::NonFiniteLogits;
    row_max = scratch.warp_max[0];
#pragma unroll
    for (int w = 1; w < kRowWarps; ++w) row_max = fmaxf(row_max, scratch.warp_max[w]);
    if (row_max == -INFINITY) return EnergyFault::NoFiniteLogit;
    thread_sums_at(sm.m, sm_s, sm_u, row_max, &sum_part, &ent_part);
  }
  double sum = 0.0, ent = 0.0, sq_sum = 0.0;
  if (real) {
    const double sum_warp = warp_sum(sum_part);
    const double ent_warp = warp_sum(ent_part);
    const double sq_warp = warp_sum(sq_part);
    if (lane == 0) {
      scratch.warp_sum[warp] = sum_warp;
      scratch.warp_ent[warp] = ent_warp;
      scratch.warp_sq[warp] = sq_warp;
    }
    __syncthreads();
    if (tid == 0) {
      // The final combine of the warp totals stays in double, in warp order.
#pragma unroll
      for (int w = 0; w < kRowWarps; ++w) {
        sum += scratch.warp_sum[w];
        ent += scratch.warp_ent[w];
        sq_sum += scratch.warp_sq[w];
      }
    }
  }
  if (tid != 0) return EnergyFault::None;

  PositionParts q;
  q.defined = defined_bits(has_lp, has_k, real);
  if (real) {
    // The softmax of k * x (natural units); logsumexp corrected to that of x to first order in k - 1.
    const SoftmaxState state{double(row_max) * kLn2, sum, ent};
    q.entropy = entropy_of(state);
    q.lse = (logsumexp_of(state) + (scale.k - 1.0) * q.entropy) / scale.k;
    // A -inf target logit gives log_prob = -inf: probability 0, not a fault.
    if (has_lp) q.lp = double(target_logit) * p.inv_temperature - q.lse;
  }
  if (has_k) {
    q.k = 0.5 * sq_sum;
    if (!isfinite(q.k)) return EnergyFault::NonFiniteHidden;
  }
  record_parts(p, row, q);
  return EnergyFault::None;
}

// A faulty row records NaN parts (energy.h) and its packed fault into p.fault, which the host set to
// kNoFault before the launch; the smallest word, the first faulty row, wins.
template <typename LT, typename HT>
__global__ void __launch_bounds__(kRowThreads, kRowBlocksPerSM)
    energy_rows_kernel(const EnergyParams p, const RowPartial* partials, int splits) {
  __shared__ RowScratch scratch;
  const int64_t n_rows = p.B * p.T;
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const EnergyFault f = process_row<LT, HT>(p, row, scratch, partials, splits);
    if (threadIdx.x == 0 && f != EnergyFault::None) {
      record_faulty_parts(p, row);
      atomicMin(p.fault, pack_fault(row, f));
    }
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

// The workspace of energy_cuda: the row partials (when the rows are split), then the finish's, each
// on a 256-byte boundary (the workspace itself starts on one: torch's allocator aligns to 512 bytes;
// bindings.cpp checks 16).
constexpr int64_t kWorkspaceAlign = 256;

int64_t aligned(int64_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

int64_t partials_bytes(int64_t n_rows, const Split& split) {
  return split.splits > 1 ? aligned(n_rows * split.splits * int64_t(sizeof(RowPartial))) : 0;
}

}  // namespace

int64_t energy_cuda_workspace_bytes(int64_t B, int64_t T, int64_t V, int device) {
  const int64_t n_rows = B * T;
  const int64_t rows = n_rows > 0 ? partials_bytes(n_rows, choose_split(n_rows, V, device)) : 0;
  return rows + finish_cuda_workspace_bytes(B, T);
}

// Everything is enqueued on the caller's stream and nothing is read back: no allocation, no copy to the
// host, no synchronisation, so the call can be captured in a CUDA graph. The fault word is reset here
// (a memset node in a graph) and the finish runs whether or not a row was faulty.
void energy_cuda(const EnergyParams& p) {
  DeviceGuard device(p.launch.device_index);
  const auto stream = static_cast<cudaStream_t>(p.launch.stream);
  check_cuda(cudaMemsetAsync(p.fault, 0xff, sizeof(unsigned long long), stream), "cudaMemsetAsync (fault word)");
  if (p.B == 0) return;
  char* const workspace = static_cast<char*>(p.workspace);

  const int64_t n_rows = p.B * p.T;
  int64_t used = 0;
  // With T == 0 there are no rows, but the finish still writes every sequence's (empty) statistics.
  if (n_rows > 0) {
    const Split split = choose_split(n_rows, p.V, p.launch.device_index);
    RowPartial* const partials = split.splits > 1 ? reinterpret_cast<RowPartial*>(workspace) : nullptr;
    used = partials_bytes(n_rows, split);
    with_float_type(p.logits_dtype, [&](auto logits_tag) {
      using LT = typename decltype(logits_tag)::type;
      if (split.splits > 1) {
        row_partials_kernel<LT><<<grid_for(n_rows * split.splits), kRowThreads, 0, stream>>>(
            p, split.splits, split.slice, partials);
        check_cuda(cudaGetLastError(), "row_partials_kernel launch");
      }
      with_float_type(p.hidden_dtype, [&](auto hidden_tag) {
        using HT = typename decltype(hidden_tag)::type;
        energy_rows_kernel<LT, HT><<<grid_for(n_rows), kRowThreads, 0, stream>>>(p, partials, split.splits);
      });
    });
    check_cuda(cudaGetLastError(), "energy_rows_kernel launch");
  }

  FinishParams finish = finish_of(p);
  finish.workspace = workspace + used;
  finish_cuda(finish);
}

}  // namespace mppm
