// CPU `softmax_tile`: folds one logits tile into the per-row online softmax state (softmax_tile.h).
// Each row is one task: the scale by inv_temperature in place (skipped at 1), then a max pass and an
// in-place exp pass when the probabilities are wanted, or one online softmax pass (the energy op's row
// kernel) when only the log-partition and entropy are; the target logit is read before the row is
// overwritten. OpenMP over rows; the row kernels are the run-time chosen ones.
#include <omp.h>

#include <cmath>

#include "mppm/softmax_tile.h"
#include "mppm/softmax_tile_math.h"
#include "row_kernels.h"

namespace mppm {
namespace {

// The first column holding NaN or +inf (-inf is legal).
int64_t first_non_finite(const float* row, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    if (std::isnan(row[c]) || row[c] == INFINITY) return c;
  return -1;
}

void fold_row(const SoftmaxTileParams& p, const cpu::RowKernels& k, int64_t r) {
  float* row = p.z + r * p.z_stride;
  const float c = float(p.inv_temperature);
  if (c != 1.0f)
    for (int64_t j = 0; j < p.C; ++j) row[j] *= c;
  const int64_t target = target_column(p, r);
  if (target >= 0) p.picked[r] = double(row[target]);
  SoftmaxState a = run_state(p, r);
  bool finite = true;
  if (p.alpha == nullptr) {
    SoftmaxState tile;
    finite = k.softmax(row, p.C, DType::Float32, 1.0f, &tile);
    if (finite) fold(a, tile);
  } else {
    const float tile_max = k.row_max(row, p.C, &finite);
    if (finite && tile_max == -INFINITY) {
      // Nothing to add: P = 0, and the accumulation keeps its scale.
      p.alpha[r] = 1.0f;
      for (int64_t j = 0; j < p.C; ++j) row[j] = 0.0f;
      return;
    }
    if (finite) {
      double alpha = 0.0;
      const double new_max = raise_max(a, double(tile_max), alpha);
      k.exp_shift(row, p.C, float(new_max), &a.s, &a.u);
      p.alpha[r] = float(alpha);
    }
  }
  if (finite) {
    store_run_state(p, r, a);
    return;
  }
  // The state is left as it was (the caller raises); the probabilities of this row are zeroed so that
  // the caller's product stays finite.
  if (p.bad_col[r] < 0) p.bad_col[r] = p.v0 + first_non_finite(row, p.C);
  if (p.alpha != nullptr) {
    p.alpha[r] = 1.0f;
    for (int64_t j = 0; j < p.C; ++j) row[j] = 0.0f;
  }
}

}  // namespace

// Below this many logits a tile takes a few microseconds on one core, less than waking a team of threads
// (and on an oversubscribed machine, far less than a barrier whose threads are descheduled).
constexpr int64_t kMinParallelElements = 1 << 15;

void softmax_tile_cpu(const SoftmaxTileParams& p) {
  const cpu::RowKernels& kernels = cpu::active_kernels();
  const int threads = p.R * p.C < kMinParallelElements ? 1 : p.launch.num_threads;
  // A tile row is a few thousand elements (~1-2 us): static chunks of rows are enough balance.
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < p.R; ++r) fold_row(p, kernels, r);
}

}  // namespace mppm
