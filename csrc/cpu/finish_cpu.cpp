// CPU `energy_finish`: the per-token planes, position by position, then the two-pass statistics of
// each sequence. It touches O(B*T) values, so it costs nothing next to the row pass that reads the
// O(B*T*V) logits; both loops are split over the threads all the same, for the callers whose parts
// come from elsewhere (a scan of many long sequences).
#include <omp.h>

#include "mppm/energy_math.h"
#include "mppm/finish.h"

namespace mppm {
namespace {

void sequence_stats(const FinishParams& p, int64_t b) {
  StatSums sums;
  for (int64_t idx = b * p.T; idx < (b + 1) * p.T; ++idx)
    if (const PositionParts q = load_parts(p, idx); q.valid()) add_first_pass(sums, q);
  double mean[kNumStatQuantities];
  first_pass_means(sums, mean);
  for (int64_t idx = b * p.T; idx < (b + 1) * p.T; ++idx)
    if (const PositionParts q = load_parts(p, idx); q.valid()) add_second_pass(sums, mean, q);
  finish_stats(sums, p.out_stats + b * kNumStatColumns, p.out_counts + b * kNumCountColumns);
}

}  // namespace

void finish_cpu(const FinishParams& p) {
  const int64_t plane = p.B * p.T;
  // Each entry depends on its own position only, and each sequence's sums run in position order in one
  // thread, so the results are bitwise the same for any thread count.
#pragma omp parallel num_threads(p.launch.num_threads)
  {
#pragma omp for schedule(static) nowait
    for (int64_t idx = 0; idx < plane; ++idx)
      write_token_quantities(p.out_tokens, plane, idx, load_parts(p, idx));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.B; ++b) sequence_stats(p, b);
  }
}

}  // namespace mppm
