// The online softmax with the entropy accumulator, shared by every kernel that reduces a logits row in
// pieces (the CPU row kernels' tiles, the CUDA threads and row slices, softmax_tile's vocabulary tiles).
// Over the x seen so far, with m their max:
//   s = sum exp(x - m),   u = sum exp(x - m) * (x - m),
// so that logsumexp = m + log s and the entropy H = -sum p log p = log s - u / s. An x of -inf has
// probability 0 and adds 0 to both sums (its exp is 0 and 0 * -inf is taken as 0). When the reference
// point moves from m to m' >= m, with a = exp(m - m'):
//   u' = a * (u + s * (m - m')),   s' = a * s.
// Nothing seen (or only -inf) is m = -inf, s = u = 0, and folds into anything as nothing.
#pragma once

#include <cmath>

#ifndef MPPM_HD
#if defined(__CUDACC__)
#define MPPM_HD __host__ __device__ __forceinline__
#else
#define MPPM_HD inline
#endif
#endif

namespace mppm {

struct SoftmaxState {
  double m = -INFINITY;
  double s = 0.0;
  double u = 0.0;
};

// Moves (s, u), accumulated against m, to the reference point ref >= m. m = -inf (nothing) stays 0:
// the rule's s * (m - ref) would be 0 * -inf.
MPPM_HD void rescale_to(double& s, double& u, double m, double ref) {
  if (m == -INFINITY) return;
  const double a = exp(m - ref);
  u = a * (u + s * (m - ref));
  s = a * s;
}

// Folds b into a (the order of the folds fixes the rounding: callers fold in a fixed order).
MPPM_HD void fold(SoftmaxState& a, const SoftmaxState& b) {
  if (b.m == -INFINITY) return;
  const double ref = b.m > a.m ? b.m : a.m;
  double bs = b.s, bu = b.u;
  rescale_to(a.s, a.u, a.m, ref);
  rescale_to(bs, bu, b.m, ref);
  a.m = ref;
  a.s += bs;
  a.u += bu;
}

MPPM_HD double logsumexp_of(const SoftmaxState& a) { return a.m + log(a.s); }
MPPM_HD double entropy_of(const SoftmaxState& a) { return log(a.s) - a.u / a.s; }

}  // namespace mppm
