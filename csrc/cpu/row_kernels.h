// The inner loops of the CPU `energy` and `softmax_tile` kernels, compiled once per instruction set and chosen at run
// time, so that one binary uses AVX-512 where the CPU has it and still runs on any x86-64 or aarch64.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mppm/online_softmax.h"
#include "mppm/tensor_view.h"

namespace mppm::cpu {

struct RowKernels {
  const char* name;
  // The online softmax state (m, s, u of online_softmax.h) of x = row[i] * c (c > 0) over a row of n
  // logits, accumulated in fp32 lanes and double tiles: logsumexp and entropy in one read. Returns false
  // when the row holds a NaN or +inf; -inf is legal (probability 0), and a row of -inf only gives m = -inf.
  bool (*softmax)(const void* row, int64_t n, DType dtype, float c, SoftmaxState* out);
  // sum_i (a[i] - b[i])^2 over n elements: differences and squares in float lanes, each lane adding at
  // most 8 squares in float before its sum moves into a double total; the last n % lanes elements in
  // double. So not a double computation: it agrees with one to float rounding of those short sums.
  double (*squared_distance)(const void* a, const void* b, int64_t n, DType dtype);
  // Max of n float32 values; sets *finite to false when the row holds a NaN or +inf (-inf is legal).
  float (*row_max)(const float* row, int64_t n, bool* finite);
  // Overwrites row[i] with exp(row[i] - m) (m finite, >= every row[i]; 0 for -inf) and adds their sum
  // to *s and the entropy's sum of exp(row[i] - m) * (row[i] - m) to *u, in double.
  void (*exp_shift)(float* row, int64_t n, float m, double* s, double* u);
};

// One declaration per compiled instruction set (row_kernels_<isa>.cpp).
namespace baseline { extern const RowKernels kernels; }
#if defined(MPPM_EXT_X86_ISAS)
namespace avx2 { extern const RowKernels kernels; }
namespace avx512 { extern const RowKernels kernels; }
#endif

// The instruction sets this build holds and this CPU can run, best first.
std::vector<std::string> supported_isas();
// The kernels in use: the best supported, or the one named by set_isa / MPPM_EXT_CPU_ISA.
const RowKernels& active_kernels();
// Raises std::invalid_argument for a name that is not in supported_isas().
void set_isa(const std::string& name);

}  // namespace mppm::cpu
