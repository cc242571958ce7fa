// Per-task batch statistics merged into per-channel moments, shared by the fused BN kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace fastface {

// Merges per-task partials (tmean, tm2: ntasks x C, row t = task t's mean and sum of squared
// deviations over tcount[t] values) in task order with Chan et al.'s formula, so the result does
// not depend on which thread ran a task. mu and m2 receive the merged mean and M2 of each
// channel; returns the total count.
inline double merge_task_moments(int64_t ntasks, int64_t C, const std::vector<double>& tmean,
                                 const std::vector<double>& tm2, const std::vector<int64_t>& tcount,
                                 std::vector<double>& mu, std::vector<double>& m2) {
  mu.assign(size_t(C), 0.0);
  m2.assign(size_t(C), 0.0);
  double cnt = 0;
  for (int64_t t = 0; t < ntasks; ++t) {
    const double nb = double(tcount[size_t(t)]);
    if (nb == 0) continue;
    const double nab = cnt + nb;
    for (int64_t c = 0; c < C; ++c) {
      const double bm = tmean[size_t(t * C + c)], bq = tm2[size_t(t * C + c)];
      if (cnt == 0) {
        mu[size_t(c)] = bm;
        m2[size_t(c)] = bq;
      } else {
        const double delta = bm - mu[size_t(c)];
        mu[size_t(c)] += delta * nb / nab;
        m2[size_t(c)] += bq + delta * delta * cnt * nb / nab;
      }
    }
    cnt = nab;
  }
  return cnt;
}

// The batch statistics a training BN normalises with, from merged moments over cnt values: mean and
// 1 / sqrt(biased variance + eps) per channel, in float64 then rounded to T (bn_act's and
// dwconv_forward_stats' results agree to the rounding of their sums).
template <typename T>
inline void write_mean_invstd(int64_t C, const std::vector<double>& mu, const std::vector<double>& m2, double cnt,
                              double eps, T* mean, T* invstd) {
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = T(mu[size_t(c)]);
    invstd[c] = T(1.0 / std::sqrt(m2[size_t(c)] / cnt + eps));
  }
}

}  // namespace fastface
