// CPU `energy`: one pass over the rows, each row reading its logits once (tile-wise online
// logsumexp + the target logit) and its two hidden rows (the step into it) and keeping its parts
// (log_prob, kinetic, defined bits), then the shared finish (finish_cpu.cpp) over those O(N) parts
// for the per-token planes and the per-sequence statistics. Nothing of size N*V is allocated.
#include <omp.h>

#include <atomic>
#include <cmath>

#include "convert.h"
#include "mppm/energy.h"
#include "mppm/energy_math.h"
#include "mppm/finish.h"
#include "row_kernels.h"

namespace mppm {
namespace {

using cpu::load_element;
using cpu::load_index;

int64_t element_size(DType d) { return d == DType::Float32 ? 4 : 2; }

const void* row_ptr(const void* base, DType dtype, int64_t b, int64_t t, int64_t sb, int64_t st) {
  return static_cast<const char*>(base) + (b * sb + t * st) * element_size(dtype);
}

struct Sequence {
  const EnergyParams& p;
  int64_t b;

  int64_t token(int64_t t) const { return load_index(p.tokens, b * p.tokens_sb + t * p.tokens_st, p.tokens_dtype); }
  bool real(int64_t t) const {
    const uint8_t* m = p.mask ? p.mask + b * p.mask_sb + t * p.mask_st : nullptr;
    return token_is_real(token(t), m, p.ignore_index);
  }
  bool in_vocab(int64_t t) const { return token(t) >= 0 && token(t) < p.V; }
  const void* logits(int64_t t) const { return row_ptr(p.logits, p.logits_dtype, b, t, p.logits_sb, p.logits_st); }
  const void* hidden(int64_t t) const { return row_ptr(p.hidden, p.hidden_dtype, b, t, p.hidden_sb, p.hidden_st); }
};

// Computes position t of a sequence and records its parts. Returns the fault found there.
EnergyFault process_position(const EnergyParams& p, const cpu::RowKernels& k, const Sequence& seq, int64_t t) {
  const int64_t idx = seq.b * p.T + t;
  const bool real = seq.real(t);
  if (real && !seq.in_vocab(t)) return EnergyFault::TokenOutOfRange;
  const bool has_lp = real && t + 1 < p.T && seq.real(t + 1) && seq.in_vocab(t + 1);
  const bool has_k = real && t > 0 && seq.real(t - 1);
  double lp = 0.0, kinetic = 0.0;
  if (has_lp) {
    bool finite = true;
    const void* row = seq.logits(t);
    lp = double(load_element(row, seq.token(t + 1), p.logits_dtype)) - k.logsumexp(row, p.V, p.logits_dtype, &finite);
    if (!finite) return EnergyFault::NonFiniteLogits;
  }
  if (has_k) {
    kinetic = 0.5 * k.squared_distance(seq.hidden(t), seq.hidden(t - 1), p.d, p.hidden_dtype);
    if (!std::isfinite(kinetic)) return EnergyFault::NonFiniteHidden;
  }
  record_parts(p, idx, has_lp, lp, has_k, kinetic);
  return EnergyFault::None;
}

}  // namespace

EnergyStatus energy_cpu(const EnergyParams& p) {
  const cpu::RowKernels& kernels = cpu::active_kernels();
  const int64_t n_rows = p.B * p.T;
  // Rows are independent, so any schedule gives bitwise-identical results; dynamic chunks keep the
  // threads busy when padding leaves some rows with nothing to read.
  std::atomic<int64_t> first_fault{n_rows};
#pragma omp parallel for schedule(dynamic, 4) num_threads(p.launch.num_threads)
  for (int64_t row = 0; row < n_rows; ++row) {
    const Sequence seq{p, row / p.T};
    if (process_position(p, kernels, seq, row % p.T) != EnergyFault::None) {
      int64_t seen = first_fault.load();
      while (row < seen && !first_fault.compare_exchange_weak(seen, row)) {
      }
    }
  }
  EnergyStatus status;
  if (const int64_t row = first_fault.load(); row < n_rows) {
    // Re-run the first faulty position alone to name its fault: deterministic whatever the threads did.
    status.b = row / p.T;
    status.t = row % p.T;
    const Sequence seq{p, status.b};
    status.fault = process_position(p, kernels, seq, status.t);
    status.token = seq.token(status.t);
    return status;
  }
  finish_cpu(finish_of(p));
  return status;
}

}  // namespace mppm
