// CPU `energy`: one pass over the rows, each real state's row reading its logits once (tile-wise
// online softmax with the entropy accumulator + the target logit) and its two hidden rows (the step
// into it) and keeping its parts (log_prob, kinetic, entropy, logsumexp, defined bits), then the shared
// finish (finish_cpu.cpp) over those O(N) parts for the per-token planes and the per-sequence
// statistics. Nothing of size N*V is allocated.
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
  int64_t label(int64_t t) const { return load_index(p.labels, b * p.labels_sb + t * p.labels_st, p.labels_dtype); }
  const uint8_t* mask(int64_t t) const { return p.mask ? p.mask + b * p.mask_sb + t * p.mask_st : nullptr; }
  bool state_real(int64_t t) const { return id_takes_part(token(t), mask(t), p.ignore_index); }
  bool scored(int64_t t) const { return id_takes_part(label(t), mask(t), p.ignore_index); }
  const void* logits(int64_t t) const { return row_ptr(p.logits, p.logits_dtype, b, t, p.logits_sb, p.logits_st); }
  const void* hidden(int64_t t) const { return row_ptr(p.hidden, p.hidden_dtype, b, t, p.hidden_sb, p.hidden_st); }
};

// Computes position t of a sequence and records its parts. Returns the fault found there: faults of
// the ids first (its token as a real state, its label as the target of state t-1), then of its row,
// then of its step. A label out of range is position t's fault, so has_lp leaves it to position t+1.
EnergyFault process_position(const EnergyParams& p, const cpu::RowKernels& k, const Sequence& seq, int64_t t) {
  const bool real = seq.state_real(t);
  if (real && !in_vocab(seq.token(t), p.V)) return EnergyFault::TokenOutOfRange;
  if (t > 0 && seq.scored(t) && seq.state_real(t - 1) && !in_vocab(seq.label(t), p.V))
    return EnergyFault::LabelOutOfRange;
  const bool has_lp = real && t + 1 < p.T && seq.scored(t + 1) && in_vocab(seq.label(t + 1), p.V);
  const bool has_k = real && t > 0 && seq.state_real(t - 1);
  PositionParts q;
  q.defined = defined_bits(has_lp, has_k, real);
  if (real) {
    // The scale in float, as the row kernels apply it: x = z * c exactly, then one rounding of x - m.
    const float c = float(p.inv_temperature);
    const void* row = seq.logits(t);
    SoftmaxState a;
    if (!k.softmax(row, p.V, p.logits_dtype, c, &a)) return EnergyFault::NonFiniteLogits;
    if (a.m == -INFINITY) return EnergyFault::NoFiniteLogit;
    q.lse = logsumexp_of(a);
    q.entropy = entropy_of(a);
    // A -inf target logit gives log_prob = -inf: probability 0, not a fault.
    if (has_lp) q.lp = double(load_element(row, seq.label(t + 1), p.logits_dtype)) * double(c) - q.lse;
  }
  if (has_k) {
    q.k = 0.5 * k.squared_distance(seq.hidden(t), seq.hidden(t - 1), p.d, p.hidden_dtype);
    if (!std::isfinite(q.k)) return EnergyFault::NonFiniteHidden;
  }
  record_parts(p, seq.b * p.T + t, q);
  return EnergyFault::None;
}

}  // namespace

void energy_cpu(const EnergyParams& p) {
  const cpu::RowKernels& kernels = cpu::active_kernels();
  const int64_t n_rows = p.B * p.T;
  // Rows are independent, so any schedule gives bitwise-identical results; dynamic chunks keep the
  // threads busy when padding leaves some rows with nothing to read.
  std::atomic<int64_t> first_fault{n_rows};
#pragma omp parallel for schedule(dynamic, 4) num_threads(p.launch.num_threads)
  for (int64_t row = 0; row < n_rows; ++row) {
    const Sequence seq{p, row / p.T};
    if (process_position(p, kernels, seq, row % p.T) != EnergyFault::None) {
      record_faulty_parts(p, row);
      int64_t seen = first_fault.load();
      while (row < seen && !first_fault.compare_exchange_weak(seen, row)) {
      }
    }
  }
  *p.fault = kNoFault;
  if (const int64_t row = first_fault.load(); row < n_rows) {
    // Re-run the first faulty position alone to name its fault: deterministic whatever the threads did.
    // It returns before recording anything, so its NaN parts stay.
    const Sequence seq{p, row / p.T};
    *p.fault = pack_fault(row, process_position(p, kernels, seq, row % p.T));
  }
  finish_cpu(finish_of(p));
}

}  // namespace mppm
