// BatchNorm's running-statistics update after a training forward, as nn.BatchNorm2d does it, in one
// call: the fused training path runs it for ~50 BNs a step, and as a dozen tiny ATen ops each it took
// ~2 % of a face-model step on 2 threads (their dispatch, not their arithmetic).
//   num_batches_tracked += 1
//   running_mean = (1 - f) running_mean + f mean[offset : offset + C]
//   running_var  = (1 - f) running_var  + f max(invstd[offset : offset + C]^-2 - eps, 0) * unbias
// with f = momentum, or 1 / num_batches_tracked (after the increment) when momentum < 0 (nn's None:
// a cumulative average). Arithmetic in float64, stored in the running tensors' dtype.
#include <torch/library.h>
#include <torch/types.h>

namespace fastface {
namespace {

template <typename R, typename S>
void update(R* rm, R* rv, const S* mean, const S* invstd, int64_t C, double f, double eps, double unbias) {
  for (int64_t c = 0; c < C; ++c) {
    const double inv = double(invstd[c]);
    const double var = std::max(1.0 / (inv * inv) - eps, 0.0) * unbias;
    rm[c] = R((1.0 - f) * double(rm[c]) + f * double(mean[c]));
    rv[c] = R((1.0 - f) * double(rv[c]) + f * var);
  }
}

void bn_update_running_cpu(at::Tensor& running_mean, at::Tensor& running_var, at::Tensor& num_batches_tracked,
                           const at::Tensor& mean, const at::Tensor& invstd, int64_t offset, double eps,
                           double unbias, double momentum) {
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() && running_var.numel() == C &&
                  running_var.scalar_type() == running_mean.scalar_type(),
              "bn_update_running: running_mean and running_var must be contiguous, of one dtype and size");
  TORCH_CHECK(mean.dim() == 1 && invstd.sizes() == mean.sizes() && mean.is_contiguous() && invstd.is_contiguous() &&
                  invstd.scalar_type() == mean.scalar_type(),
              "bn_update_running: mean and invstd must be contiguous vectors of one dtype and size");
  TORCH_CHECK(offset >= 0 && offset + C <= mean.numel(), "bn_update_running: channels [", offset, ", ", offset + C,
              ") are outside the ", mean.numel(), " statistics");
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong,
              "bn_update_running: num_batches_tracked must be one int64");
  int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
  *nbt += 1;
  const double f = momentum >= 0 ? momentum : 1.0 / double(*nbt);
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "bn_update_running", [&] {
    using R = scalar_t;
    R* rm = running_mean.data_ptr<R>();
    R* rv = running_var.data_ptr<R>();
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_update_running_stats", [&] {
      update<R, scalar_t>(rm, rv, mean.data_ptr<scalar_t>() + offset, invstd.data_ptr<scalar_t>() + offset, C, f, eps,
                          unbias);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) { m.impl("bn_update_running", &bn_update_running_cpu); }

}  // namespace fastface
