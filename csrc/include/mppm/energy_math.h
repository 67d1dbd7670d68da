// Per-position and per-sequence arithmetic of the `energy` op's row pass and of its finish
// (finish.h), written once for the CPU and CUDA kernels so that both produce the same numbers from
// the same log-prob and kinetic values.
// Everything here works in double: it touches O(N) values, so its cost is nothing next to reading
// the O(N*V) logits, and double keeps exp(log K + s) from overflowing for any realistic input.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "mppm/energy.h"
#include "mppm/finish.h"

#if defined(__CUDACC__)
#define MPPM_HD __host__ __device__ __forceinline__
#else
#define MPPM_HD inline
#endif

namespace mppm {

template <typename T>
MPPM_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Token t takes part in the analysis unless it is masked out or equal to ignore_index.
MPPM_HD bool token_is_real(int64_t token, const uint8_t* mask_entry, int64_t ignore_index) {
  return token != ignore_index && (mask_entry == nullptr || *mask_entry != 0);
}

MPPM_HD uint8_t defined_bits(bool has_lp, bool has_k) {
  return uint8_t((has_lp ? kDefinedLogProb : 0) | (has_k ? kDefinedKinetic : 0));
}

// Both bits set: the position is valid. Other bits are ignored.
MPPM_HD bool is_valid(uint8_t defined) {
  constexpr uint8_t kBoth = kDefinedLogProb | kDefinedKinetic;
  return (defined & kBoth) == kBoth;
}

// What the row pass of the energy op keeps of one position: its kDefined* bits and the full-precision
// log_prob and kinetic (0 where undefined), the parts that the finish reads back.
MPPM_HD void record_parts(const EnergyParams& p, int64_t idx, bool has_lp, double lp, bool has_k, double k) {
  const int64_t plane = p.B * p.T;
  p.out_defined[idx] = defined_bits(has_lp, has_k);
  p.scratch[kPartLogProb * plane + idx] = lp;
  p.scratch[kPartKinetic * plane + idx] = k;
}

// Writes the eight per-token planes for position `idx` (= b*T + t) of a [q, B, T] block from its
// kDefined* bits and parts. Undefined entries get 0 (see energy.h) whatever their parts hold.
MPPM_HD void write_token_quantities(float* out_tokens, int64_t plane, int64_t idx, uint8_t defined, double lp,
                                    double k) {
  const bool has_lp = (defined & kDefinedLogProb) != 0;
  const bool has_k = (defined & kDefinedKinetic) != 0;
  const bool valid = has_lp && has_k;
  const double log_k = has_k ? log(k) : 0.0;  // k == 0 gives -inf, reported through the counts
  out_tokens[kLogProb * plane + idx] = has_lp ? float(lp) : 0.0f;
  out_tokens[kSurprisal * plane + idx] = has_lp ? float(-lp) : 0.0f;
  out_tokens[kKinetic * plane + idx] = has_k ? float(k) : 0.0f;
  out_tokens[kLogKinetic * plane + idx] = has_k ? float(log_k) : 0.0f;
  out_tokens[kEnergy * plane + idx] = valid ? float(exp(log_k - lp)) : 0.0f;
  out_tokens[kLogEnergy * plane + idx] = valid ? float(log_k - lp) : 0.0f;
  out_tokens[kAdditiveEnergy * plane + idx] = valid ? float(k + lp) : 0.0f;
  out_tokens[kLogLagrangian * plane + idx] = valid ? float(log_k + lp) : 0.0f;
}

// The statistics' value of every stat quantity at one position, from its log_prob and kinetic.
MPPM_HD void stat_values(double lp, double k, double* v) {
  const double log_k = log(k);
  const double s = -lp;
  v[kLogProb] = lp;
  v[kSurprisal] = s;
  v[kKinetic] = k;
  v[kLogKinetic] = log_k;
  v[kEnergy] = exp(log_k + s);
  v[kLogEnergy] = log_k + s;
  v[kAdditiveEnergy] = k + lp;
  v[kLogLagrangian] = log_k - s;
  v[kPpl] = exp(s);
}

// Sums a sequence's statistics are finished from. Filled in two passes (means first, then centred
// second moments) because one-pass formulas lose the CV of nearly constant quantities to
// cancellation, and nearly constant is exactly what a conservation law predicts.
struct StatSums {
  int64_t used = 0;
  int64_t zero_kinetic = 0;
  double sum[kNumStatQuantities] = {};
  double centred_sq[kNumStatQuantities] = {};
  double centred_cross = 0.0;  // sum (log K - mean)(s - mean)
};

// First pass: counts and sums. Positions with kinetic == 0 are valid but have log K = -inf; they are
// counted apart and left out of every statistic so that one zero step cannot turn them all to NaN.
MPPM_HD void add_first_pass(StatSums& a, double lp, double k) {
  if (!(k > 0.0)) {
    ++a.zero_kinetic;
    return;
  }
  double v[kNumStatQuantities];
  stat_values(lp, k, v);
  ++a.used;
  for (int q = 0; q < kNumStatQuantities; ++q) a.sum[q] += v[q];
}

// Second pass: squared deviations from the means of the first pass.
MPPM_HD void add_second_pass(StatSums& a, const double* mean, double lp, double k) {
  if (!(k > 0.0)) return;
  double v[kNumStatQuantities];
  stat_values(lp, k, v);
  for (int q = 0; q < kNumStatQuantities; ++q) a.centred_sq[q] += (v[q] - mean[q]) * (v[q] - mean[q]);
  a.centred_cross += (v[kLogKinetic] - mean[kLogKinetic]) * (v[kSurprisal] - mean[kSurprisal]);
}

MPPM_HD void first_pass_means(const StatSums& a, double* mean) {
  for (int q = 0; q < kNumStatQuantities; ++q) mean[q] = a.used > 0 ? a.sum[q] / double(a.used) : 0.0;
}

// A quantity whose spread is rounding noise of its mean (sum/n need not reproduce a constant exactly)
// has no correlation with anything: corr(log K, s) is then NaN, as it is for an exact constant.
constexpr double kFlatRelativeStd = 1e-12;

MPPM_HD bool constant_within_rounding(const StatSums& a, int q) {
  const double mean = a.sum[q] / double(a.used);
  return a.centred_sq[q] <= double(a.used) * (kFlatRelativeStd * mean) * (kFlatRelativeStd * mean);
}

MPPM_HD void finish_stats(const StatSums& a, float* out_stats, int64_t* out_counts) {
  out_counts[kCountUsed] = a.used;
  out_counts[kCountZeroKinetic] = a.zero_kinetic;
  const double n = double(a.used);
  for (int q = 0; q < kNumStatQuantities; ++q) {
    const double mean = a.used > 0 ? a.sum[q] / n : quiet_nan<double>();
    const double sd = a.used > 0 ? sqrt(a.centred_sq[q] / n) : quiet_nan<double>();
    out_stats[kStatMean + q] = float(mean);
    out_stats[kStatStd + q] = float(sd);
    out_stats[kStatCv + q] = float(sd / fabs(mean));
  }
  const bool flat = constant_within_rounding(a, kLogKinetic) || constant_within_rounding(a, kSurprisal);
  const double denom = sqrt(a.centred_sq[kLogKinetic] * a.centred_sq[kSurprisal]);
  out_stats[kStatCorr] = a.used > 0 && !flat ? float(a.centred_cross / denom) : quiet_nan<float>();
}

}  // namespace mppm
