// The `energy_finish` contract: from the per-position parts (log_prob, kinetic, entropy and logsumexp,
// and which of them are defined) to everything the energy op reports, i.e. the ten per-token planes and the
// per-sequence statistics. It is the one finish of every backend: the compiled energy op runs its row
// pass and then this, and backends that compute the parts elsewhere (Triton, energy_from_hidden,
// scans) call it through _C.energy_finish, so all of them report the same numbers from the same parts.
#pragma once

#include <cstdint>

#include "mppm/energy.h"
#include "mppm/tensor_view.h"

namespace mppm {

// Planes of parts[k, b, t]. Planes from kNumParts on (features added later) are never read.
constexpr int kPartLogProb = 0;
constexpr int kPartKinetic = 1;
constexpr int kPartEntropy = 2;    // with kPartLogsumexp, defined where kDefinedState is set
constexpr int kPartLogsumexp = 3;
constexpr int kNumParts = 4;

struct FinishParams {
  int64_t B = 0, T = 0;

  // Inputs, contiguous: parts [P >= kNumParts, B, T] float64 (plane k at parts + k*B*T) and defined
  // [B, T] uint8 (kDefined* bits: log_prob, kinetic, state real for entropy and logsumexp). A part whose bit is clear is ignored, so it may hold anything (NaN
  // included).
  const double* parts = nullptr;
  const uint8_t* defined = nullptr;

  // Outputs, contiguous, as in EnergyParams: [kNumTokenQuantities, B, T] fp32 (0 where undefined),
  // [B, kNumStatColumns] fp32, [B, kNumCountColumns] int64.
  float* out_tokens = nullptr;
  float* out_stats = nullptr;
  int64_t* out_counts = nullptr;

  // Workspace on the device, 16-byte aligned, at least finish_cuda_workspace_bytes(B, T) bytes: the
  // per-chunk partial sums of the statistics (CUDA only; the CPU needs none). Allocated by the caller.
  void* workspace = nullptr;

  Launch launch;
};

// The finish of an energy call: its scratch holds the parts, its out_defined says which are defined.
inline FinishParams finish_of(const EnergyParams& e) {
  FinishParams p;
  p.B = e.B;
  p.T = e.T;
  p.parts = e.scratch;
  p.defined = e.out_defined;
  p.out_tokens = e.out_tokens;
  p.out_stats = e.out_stats;
  p.out_counts = e.out_counts;
  p.launch = e.launch;
  return p;  // workspace: energy_cuda places the finish's inside its own
}

// No faults to report: every output is a function of the defined parts. The finish does not look for
// non-finite or negative values; they come out as inf / NaN entries, as the arithmetic gives them.
void finish_cpu(const FinishParams& p);
#ifdef MPPM_EXT_WITH_CUDA
void finish_cuda(const FinishParams& p);
// Bytes of workspace finish_cuda needs for B sequences of T positions (a function of the shapes only).
int64_t finish_cuda_workspace_bytes(int64_t B, int64_t T);
#endif

}  // namespace mppm
