// Batched CG of the steering solve on the CPU (contract: include/mppm/cg.h). OpenMP over batch rows:
// each row's system is independent and small (m <= a few hundred), so rows are the natural grain and
// the result does not depend on the thread count.
#include <cmath>

#include "mppm/cg.h"

namespace mppm {
namespace {

struct Row {
  const float* rows;    // [m, d]
  const float* center;  // [d] or nullptr
  int64_t m, d;
  double lam;
  double* t;  // [d] scratch

  // out = (G G^T + lam I) x
  void normal_matvec(const double* x, double* out) const {
    double sx = 0.0;
    for (int64_t i = 0; i < m; ++i) sx += x[i];
    for (int64_t k = 0; k < d; ++k) t[k] = center ? -double(center[k]) * sx : 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const float* g = rows + i * d;
      const double xi = x[i];
      for (int64_t k = 0; k < d; ++k) t[k] += double(g[k]) * xi;
    }
    double ct = 0.0;
    if (center)
      for (int64_t k = 0; k < d; ++k) ct += double(center[k]) * t[k];
    for (int64_t i = 0; i < m; ++i) {
      const float* g = rows + i * d;
      double s = 0.0;
      for (int64_t k = 0; k < d; ++k) s += double(g[k]) * t[k];
      out[i] = s - ct + lam * x[i];
    }
  }
};

double dot(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void solve_row(const CGParams& p, int64_t b) {
  const int64_t m = p.m, d = p.d;
  double* scratch = p.scratch + b * (d + 3 * m);
  Row row{p.rows + b * m * d, p.center ? p.center + b * d : nullptr, m, d, p.lam, scratch};
  double* r = scratch + d;
  double* dir = r + m;
  double* ad = dir + m;
  const double* rhs = p.rhs + b * m;
  double* u = p.u + b * m;
  for (int64_t i = 0; i < m; ++i) {
    u[i] = 0.0;
    r[i] = rhs[i];
    dir[i] = rhs[i];
  }
  const double b_norm = std::sqrt(dot(rhs, rhs, m));
  double rr = b_norm * b_norm;
  int64_t it = 0;
  while (it < p.max_iter && std::sqrt(rr) > p.tol * b_norm) {
    row.normal_matvec(dir, ad);
    const double pap = dot(dir, ad, m);
    if (!(pap > 0.0)) break;  // A is singular along dir (lam = 0, rank-deficient G): stop, not converged
    const double alpha = rr / pap;
    for (int64_t i = 0; i < m; ++i) {
      u[i] += alpha * dir[i];
      r[i] -= alpha * ad[i];
    }
    const double rr_new = dot(r, r, m);
    const double beta = rr_new / rr;
    for (int64_t i = 0; i < m; ++i) dir[i] = r[i] + beta * dir[i];
    rr = rr_new;
    ++it;
  }
  // The residual reported is recomputed from u: the recurrence's r drifts from the true one.
  row.normal_matvec(u, ad);
  double res = 0.0;
  for (int64_t i = 0; i < m; ++i) res += (rhs[i] - ad[i]) * (rhs[i] - ad[i]);
  res = b_norm > 0.0 ? std::sqrt(res) / b_norm : 0.0;
  p.iters[b] = it;
  p.residual[b] = res;
  p.converged[b] = res <= p.tol ? 1 : 0;
}

}  // namespace

void cg_cpu(const CGParams& p) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(p.launch.num_threads)
  for (int64_t b = 0; b < p.B; ++b) solve_row(p, b);
}

}  // namespace mppm
