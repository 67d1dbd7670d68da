// The `energy` op contract shared by the CPU and CUDA kernels: a plain parameter struct that the
// host code in bindings.cpp fills after validating every view, and the layout of the outputs.
//
// docs/definitions.md defines every quantity; in brief, for position t of sequence b, with h_t the
// hidden state, z_t the logits, x_t = z_t * inv_temperature, tokens[t] the token id and labels[t] the
// target id at t (Python passes the tokens when the user gives no labels):
//   state_real[t]   state t takes part: mask[t] != 0 and tokens[t] != ignore_index
//   scored[t]       token t is scored as a target: mask[t] != 0 and labels[t] != ignore_index
//   log_prob[t]     log softmax(x_t)[labels[t+1]], how likely state t found the next token; defined when
//                   state_real[t] and scored[t+1] (so t <= T-2). surprisal s_t = -log_prob[t]; a target
//                   whose logit is -inf has log_prob -inf.
//   kinetic[t]      K_t = 0.5 * ||h_t - h_{t-1}||^2, the step into state t; defined when state_real[t]
//                   and state_real[t-1] (so t >= 1)
//   entropy[t],     -sum p log p and logsumexp of softmax(x_t); defined at every real state
//   logsumexp[t]    (T-1 included). Entries of probability 0 (logit -inf) add 0 to both.
//   valid[t]        log_prob and kinetic are defined; the energy-type quantities exist only there:
//                   energy K_t * exp(s_t), log_energy log K_t + s_t, additive_energy K_t + log_prob[t],
//                   log_lagrangian log K_t - s_t.
// The logits row t is read when state_real[t]. -inf logits are legal; NaN or +inf in a read row, or a
// read row without a finite entry, is a fault.
// The statistics of a sequence are over its valid positions with K_t > 0 (a zero step has
// log K = -inf and is only counted): mean, population std and cv = std / |mean| of every quantity and
// of exp(s_t), and Pearson corr(log K, s), NaN when either is constant to rounding (a spread below
// kFlatRelativeStd = 1e-12 of its mean, energy_math.h).
// The kernels write 0 into undefined entries and say what is defined in out_defined; the Python
// wrapper turns undefined entries into NaN. (NaN-free op outputs keep torch.library.opcheck's exact
// eager-vs-compiled comparison meaningful.)
#pragma once

#include <cstdint>

#include "mppm/tensor_view.h"

namespace mppm {

// Order of the per-token output planes, out_tokens[q, b, t]. TOKEN_QUANTITIES in mppm_ext/results.py
// lists the same names in the same order.
enum TokenQuantity : int {
  kLogProb = 0,
  kSurprisal,
  kKinetic,
  kLogKinetic,
  kEnergy,
  kLogEnergy,
  kAdditiveEnergy,
  kLogLagrangian,
  kEntropy,
  kLogsumexp,
  kNumTokenQuantities
};

// Statistics are kept for the token quantities plus point perplexity (exp(surprisal)).
constexpr int kPpl = kNumTokenQuantities;
constexpr int kNumStatQuantities = kNumTokenQuantities + 1;

// Bits of out_defined[b, t].
constexpr uint8_t kDefinedLogProb = 1;
constexpr uint8_t kDefinedKinetic = 2;
constexpr uint8_t kDefinedState = 4;  // the state is real: entropy and logsumexp are defined

// Columns of out_stats[b, :]: mean[q], std[q], cv[q] for every stat quantity q, then corr(log K, s).
constexpr int kStatMean = 0;
constexpr int kStatStd = kNumStatQuantities;
constexpr int kStatCv = 2 * kNumStatQuantities;
constexpr int kStatCorr = 3 * kNumStatQuantities;
constexpr int kNumStatColumns = 3 * kNumStatQuantities + 1;

// Columns of out_counts[b, :].
constexpr int kCountUsed = 0;          // valid positions with kinetic > 0: the statistics' population
constexpr int kCountZeroKinetic = 1;   // valid positions left out because kinetic == 0 (log K = -inf)
constexpr int kNumCountColumns = 2;

struct EnergyParams {
  int64_t B = 0, T = 0, d = 0, V = 0;

  // hidden[b, t, :] at hidden + b*hidden_sb + t*hidden_st, unit stride along d.
  const void* hidden = nullptr;
  DType hidden_dtype = DType::Float32;
  int64_t hidden_sb = 0, hidden_st = 0;

  // logits[b, t, :] likewise, unit stride along V.
  const void* logits = nullptr;
  DType logits_dtype = DType::Float32;
  int64_t logits_sb = 0, logits_st = 0;

  const void* tokens = nullptr;  // int32 or int64
  DType tokens_dtype = DType::Int64;
  int64_t tokens_sb = 0, tokens_st = 0;

  const void* labels = nullptr;  // int32 or int64: the targets (the tokens when the user gave none)
  DType labels_dtype = DType::Int64;
  int64_t labels_sb = 0, labels_st = 0;

  const uint8_t* mask = nullptr;  // optional; nonzero = real token
  int64_t mask_sb = 0, mask_st = 0;

  int64_t ignore_index = -100;
  double inv_temperature = 1.0;  // 1 / temperature, > 0 and finite (checked by bindings.cpp)

  // Outputs, contiguous: [kNumTokenQuantities, B, T] fp32, [B, T] uint8 (kDefined* bits),
  // [B, kNumStatColumns] fp32, [B, kNumCountColumns] int64. The row pass writes out_defined and the
  // scratch; the finish (finish.h) writes the other three from them.
  float* out_tokens = nullptr;
  uint8_t* out_defined = nullptr;
  float* out_stats = nullptr;
  int64_t* out_counts = nullptr;

  // Scratch, contiguous [kNumParts = 4, B, T] float64: the parts (log_prob, kinetic, entropy,
  // logsumexp; finish.h) at full precision for the finish (means of exp(log K + s) amplify float32
  // rounding of s beyond the tolerance).
  double* scratch = nullptr;

  Launch launch;
};

// What a kernel found wrong in the data itself (the shapes were checked before it ran).
// The first offending position in (b, t) order is reported, so the message is deterministic.
// A position's own faults: TokenOutOfRange (a real state's token outside [0, V)), LabelOutOfRange (the
// label at t, a target of the real state t-1, outside [0, V)), NonFiniteLogits (NaN or +inf in the row
// of a real state), NoFiniteLogit (that row is all -inf), NonFiniteHidden (the step into t).
enum class EnergyFault : int {
  None = 0,
  TokenOutOfRange,
  LabelOutOfRange,
  NonFiniteLogits,
  NoFiniteLogit,
  NonFiniteHidden,
  kNumKinds
};

struct EnergyStatus {
  EnergyFault fault = EnergyFault::None;
  int64_t b = -1, t = -1;
  int64_t id = 0;  // the offending id: tokens[b, t] for TokenOutOfRange, labels[b, t] for LabelOutOfRange
};

EnergyStatus energy_cpu(const EnergyParams& p);
#ifdef MPPM_EXT_WITH_CUDA
EnergyStatus energy_cuda(const EnergyParams& p);
#endif

}  // namespace mppm
