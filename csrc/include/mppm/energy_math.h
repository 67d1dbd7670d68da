// Per-position and per-sequence arithmetic of the `energy` op's row pass and of its finish
// (finish.h), written once for the CPU and CUDA kernels so that both produce the same numbers from
// the same parts (log_prob, kinetic, entropy, logsumexp).
// Everything here works in double: it touches O(N) values, so its cost is nothing next to reading
// the O(N*V) logits, and double keeps exp(log K + s) from overflowing for any realistic input.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "mppm/energy.h"
#include "mppm/finish.h"
#include "mppm/online_softmax.h"

namespace mppm {

template <typename T>
MPPM_HD T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// State t takes part (tokens) and token t is scored as a target (labels) by the same rule: the mask
// is nonzero there and the id is not ignore_index.
MPPM_HD bool id_takes_part(int64_t id, const uint8_t* mask_entry, int64_t ignore_index) {
  return id != ignore_index && (mask_entry == nullptr || *mask_entry != 0);
}

MPPM_HD bool in_vocab(int64_t id, int64_t V) { return id >= 0 && id < V; }

// What is known of one position: its kDefined* bits and its parts, at full precision (0 where
// undefined in what the row pass writes; anything, NaN included, in what a finish may be given).
struct PositionParts {
  uint8_t defined = 0;
  double lp = 0.0, k = 0.0, entropy = 0.0, lse = 0.0;

  MPPM_HD bool has_lp() const { return (defined & kDefinedLogProb) != 0; }
  MPPM_HD bool has_k() const { return (defined & kDefinedKinetic) != 0; }
  MPPM_HD bool has_state() const { return (defined & kDefinedState) != 0; }
  // log_prob and kinetic are both defined: the position is valid (the state bit follows from either).
  MPPM_HD bool valid() const { return has_lp() && has_k(); }
};

MPPM_HD uint8_t defined_bits(bool has_lp, bool has_k, bool has_state) {
  return uint8_t((has_lp ? kDefinedLogProb : 0) | (has_k ? kDefinedKinetic : 0) | (has_state ? kDefinedState : 0));
}

// What the row pass of the energy op keeps of one position, for the finish to read back.
MPPM_HD void record_parts(const EnergyParams& p, int64_t idx, const PositionParts& q) {
  const int64_t plane = p.B * p.T;
  p.out_defined[idx] = q.defined;
  p.scratch[kPartLogProb * plane + idx] = q.lp;
  p.scratch[kPartKinetic * plane + idx] = q.k;
  p.scratch[kPartEntropy * plane + idx] = q.entropy;
  p.scratch[kPartLogsumexp * plane + idx] = q.lse;
}

// What the row pass keeps of a position whose data is faulty (energy.h): NaN parts with every bit set,
// so that every per-token output there is NaN when the caller does not raise on the fault.
MPPM_HD void record_faulty_parts(const EnergyParams& p, int64_t idx) {
  PositionParts q;
  q.defined = defined_bits(true, true, true);
  q.lp = q.k = q.entropy = q.lse = quiet_nan<double>();
  record_parts(p, idx, q);
}

// The parts of position `idx` from a finish's inputs.
MPPM_HD PositionParts load_parts(const FinishParams& p, int64_t idx) {
  const int64_t plane = p.B * p.T;
  PositionParts q;
  q.defined = p.defined[idx];
  q.lp = p.parts[kPartLogProb * plane + idx];
  q.k = p.parts[kPartKinetic * plane + idx];
  q.entropy = p.parts[kPartEntropy * plane + idx];
  q.lse = p.parts[kPartLogsumexp * plane + idx];
  return q;
}

// Writes the ten per-token planes for position `idx` (= b*T + t) of a [q, B, T] block from its parts.
// Undefined entries get 0 (see energy.h) whatever their parts hold.
MPPM_HD void write_token_quantities(float* out_tokens, int64_t plane, int64_t idx, const PositionParts& q) {
  const bool has_lp = q.has_lp(), has_k = q.has_k(), valid = q.valid(), has_state = q.has_state();
  const double lp = q.lp, k = q.k;
  const double log_k = has_k ? log(k) : 0.0;  // k == 0 gives -inf, reported through the counts
  out_tokens[kLogProb * plane + idx] = has_lp ? float(lp) : 0.0f;
  out_tokens[kSurprisal * plane + idx] = has_lp ? float(-lp) : 0.0f;
  out_tokens[kKinetic * plane + idx] = has_k ? float(k) : 0.0f;
  out_tokens[kLogKinetic * plane + idx] = has_k ? float(log_k) : 0.0f;
  out_tokens[kEnergy * plane + idx] = valid ? float(exp(log_k - lp)) : 0.0f;
  out_tokens[kLogEnergy * plane + idx] = valid ? float(log_k - lp) : 0.0f;
  out_tokens[kAdditiveEnergy * plane + idx] = valid ? float(k + lp) : 0.0f;
  out_tokens[kLogLagrangian * plane + idx] = valid ? float(log_k + lp) : 0.0f;
  out_tokens[kEntropy * plane + idx] = has_state ? float(q.entropy) : 0.0f;
  out_tokens[kLogsumexp * plane + idx] = has_state ? float(q.lse) : 0.0f;
}

// The statistics' value of every stat quantity at one (valid) position.
MPPM_HD void stat_values(const PositionParts& q, double* v) {
  const double log_k = log(q.k);
  const double s = -q.lp;
  v[kLogProb] = q.lp;
  v[kSurprisal] = s;
  v[kKinetic] = q.k;
  v[kLogKinetic] = log_k;
  v[kEnergy] = exp(log_k + s);
  v[kLogEnergy] = log_k + s;
  v[kAdditiveEnergy] = q.k + q.lp;
  v[kLogLagrangian] = log_k - s;
  // Parts whose bit is clear are never read: a backend without them gets NaN statistics of them.
  v[kEntropy] = q.has_state() ? q.entropy : quiet_nan<double>();
  v[kLogsumexp] = q.has_state() ? q.lse : quiet_nan<double>();
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
MPPM_HD void add_first_pass(StatSums& a, const PositionParts& q) {
  if (!(q.k > 0.0)) {
    ++a.zero_kinetic;
    return;
  }
  double v[kNumStatQuantities];
  stat_values(q, v);
  ++a.used;
  for (int q = 0; q < kNumStatQuantities; ++q) a.sum[q] += v[q];
}

// Second pass: squared deviations from the means of the first pass.
MPPM_HD void add_second_pass(StatSums& a, const double* mean, const PositionParts& q) {
  if (!(q.k > 0.0)) return;
  double v[kNumStatQuantities];
  stat_values(q, v);
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
