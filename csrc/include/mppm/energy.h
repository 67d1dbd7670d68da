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

#include "mppm/online_softmax.h"  // MPPM_HD
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

  // Output, one 64-bit word on the device: the first fault found in the data, packed by pack_fault,
  // or kNoFault. The op never reads it back (no host synchronisation); the caller does, once.
  unsigned long long* fault = nullptr;

  // Workspace on the device, 16-byte aligned, at least energy_workspace_bytes(...) bytes (the CUDA
  // kernels' row partials and the finish's; none on the CPU). Allocated by the caller (torch), so
  // that the op allocates nothing and can be captured in a CUDA graph.
  void* workspace = nullptr;

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

// The fault word packs (row << kFaultBits) | kind with row = b * T + t, so one atomicMin (CUDA) or one
// minimum over the rows (CPU) keeps the first faulty position in (b, t) order together with its fault.
// All ones means no fault (-1 as the int64 tensor Python reads it).
constexpr int kFaultBits = 3;
constexpr unsigned long long kNoFault = ~0ull;
static_assert(static_cast<int>(EnergyFault::kNumKinds) <= (1 << kFaultBits), "a fault kind must fit in kFaultBits");

MPPM_HD unsigned long long pack_fault(int64_t row, EnergyFault kind) {
  return (static_cast<unsigned long long>(row) << kFaultBits) | static_cast<unsigned long long>(kind);
}

// Both kernels write every output and *p.fault whatever the data: a faulty position gets NaN parts with
// every kDefined* bit set (record_faulty_parts, energy_math.h), so that a caller that skips the check
// (mppm_ext.energy(check=False)) sees NaN there rather than stale memory; the finish runs regardless.
void energy_cpu(const EnergyParams& p);
#ifdef MPPM_EXT_WITH_CUDA
void energy_cuda(const EnergyParams& p);
// Bytes of workspace energy_cuda needs for these shapes on this device (the split of the rows depends
// on its number of SMs); a host query, no synchronisation.
int64_t energy_cuda_workspace_bytes(int64_t B, int64_t T, int64_t V, int device);
#endif

}  // namespace mppm
