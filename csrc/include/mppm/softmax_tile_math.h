// Per-row arithmetic of the `softmax_tile` op, shared by the CPU and CUDA kernels so that both fold
// a tile into the running state with the same double-precision operations.
#pragma once

#include <cmath>
#include <cstdint>

#include "mppm/online_softmax.h"
#include "mppm/softmax_tile.h"

namespace mppm {

// The running state of row r.
MPPM_HD SoftmaxState run_state(const SoftmaxTileParams& p, int64_t r) {
  SoftmaxState a;
  a.m = p.run_max[r];
  a.s = p.run_sum[r];
  a.u = p.run_ent == nullptr ? 0.0 : p.run_ent[r];
  return a;
}

MPPM_HD void store_run_state(const SoftmaxTileParams& p, int64_t r, const SoftmaxState& a) {
  p.run_max[r] = a.m;
  p.run_sum[r] = a.s;
  if (p.run_ent != nullptr) p.run_ent[r] = a.u;
}

// The moments pass: moves row r's state to the reference max(run_max, tile_max) (tile_max > -inf) and
// returns it; alpha = exp(old - new) rescales what was accumulated against the old max (0 on the
// first tile, where old = -inf). The tile's own sums are then added against the new reference.
MPPM_HD double raise_max(SoftmaxState& a, double tile_max, double& alpha) {
  const double new_max = tile_max > a.m ? tile_max : a.m;
  alpha = exp(a.m - new_max);
  rescale_to(a.s, a.u, a.m, new_max);
  a.m = new_max;
  return new_max;
}

// Target column of row r inside the tile, or -1.
MPPM_HD int64_t target_column(const SoftmaxTileParams& p, int64_t r) {
  if (p.targets == nullptr) return -1;
  const int64_t c = p.targets[r] - p.v0;
  return c >= 0 && c < p.C ? c : -1;
}

}  // namespace mppm
