// The dwconv_forward / dwconv_backward ops of fastface's depthwise 3 x 3 training conv on the CPU:
// argument checks, layouts and dispatch to the kernels of dwconv_train_kernels.h (what they compute
// and how: see there).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "dwconv_train_kernels.h"
#include "moments.h"

namespace fastface {
namespace {

using namespace dwconv_train;

// ---- ops --------------------------------------------------------------------------------------

using Opt = c10::optional<at::Tensor>;

Geo check_args(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t stride, int64_t padding,
               const Opt& mean, const Opt& scale, const Opt& beta) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got ", x.sizes());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == K &&
                  weight.size(3) == K,
              op, ": weight must be C x 1 x 3 x 3 with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK((stride == 1 || stride == 2) && padding == 1, op,
              ": the CPU kernel serves stride 1 or 2 with padding 1, got stride ", stride, ", padding ", padding);
  TORCH_CHECK(N >= 1 && C >= 1 && H >= 1 && W >= 1, op, ": empty input ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": float32 and float64 only, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt, op, ": dtypes differ (x is ", dt, ", weight ", weight.scalar_type(), ")");
  TORCH_CHECK(mean.has_value() == scale.has_value() && scale.has_value() == beta.has_value(), op,
              ": give mean, scale and beta (the BN + ReLU6 prologue), or none of them");
  if (scale.has_value()) {
    for (const at::Tensor* t : {&*mean, &*scale, &*beta}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": mean, scale and beta must have C = ", C,
                  " entries, got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == dt, op, ": dtypes differ (x is ", dt, ", mean/scale/beta ", t->scalar_type(),
                  ")");
    }
  }
  return {N, C, H, W, (H + 2 - K) / stride + 1, (W + 2 - K) / stride + 1};
}

// f(S, FL) with the stride and the flavour as integral constants.
template <typename F>
void dispatch_geometry(int64_t stride, int flavour, F&& f) {
  auto with_stride = [&](auto S) {
    if (flavour == kPrologueSums)
      f(S, std::integral_constant<int, kPrologueSums>{});
    else if (flavour == kPrologue)
      f(S, std::integral_constant<int, kPrologue>{});
    else
      f(S, std::integral_constant<int, kNoPrologue>{});
  };
  if (stride == 1)
    with_stride(std::integral_constant<int, 1>{});
  else
    with_stride(std::integral_constant<int, 2>{});
}

at::Tensor dwconv_forward_cpu(const at::Tensor& x_, const at::Tensor& weight, int64_t stride, int64_t padding,
                              const Opt& mean, const Opt& scale, const Opt& beta) {
  const Geo G = check_args("dwconv_forward", x_, weight, stride, padding, mean, scale, beta);
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor x = x_.contiguous(cl);
  at::Tensor z = at::empty({G.N, G.C, G.OH, G.OW}, x.options().memory_format(cl));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_forward_cpu", [&] {
    const Consts<scalar_t> cst(weight, mean, scale, beta, G.C);
    dispatch_geometry(stride, scale.has_value() ? kPrologue : kNoPrologue, [&](auto S, auto FL) {
      forward_kernel<scalar_t, decltype(S)::value, decltype(FL)::value != kNoPrologue, false>(
          G, x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), cst, nullptr);
    });
  });
  return channels_last(x_) ? z : z.contiguous();
}

// dwconv_forward and the batch statistics of its output z (mean, 1 / sqrt(biased var + eps) per channel, as
// bn_stats computes them), reduced from the outputs while they are in registers: no pass over z.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_forward_stats_cpu(const at::Tensor& x_, const at::Tensor& weight,
                                                                        int64_t stride, int64_t padding,
                                                                        const Opt& mean, const Opt& scale,
                                                                        const Opt& beta, double eps) {
  const Geo G = check_args("dwconv_forward_stats", x_, weight, stride, padding, mean, scale, beta);
  TORCH_CHECK(eps >= 0, "dwconv_forward_stats: eps must be >= 0, got ", eps);
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor x = x_.contiguous(cl);
  at::Tensor z = at::empty({G.N, G.C, G.OH, G.OW}, x.options().memory_format(cl));
  at::Tensor z_mean = at::empty({G.C}, x.options()), z_invstd = at::empty({G.C}, x.options());
  const int64_t C = G.C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_forward_stats_cpu", [&] {
    using T = scalar_t;
    const int64_t ntasks = forward_tasks<T>(G).second;  // the kernel's own split: one partial per task
    std::vector<double> tsum(size_t(ntasks * C)), tsq(size_t(ntasks * C));
    std::vector<int64_t> tcount(static_cast<size_t>(ntasks), 0);
    const Consts<T> cst(weight, mean, scale, beta, C);
    std::vector<T> tshift(size_t(ntasks * C));
    const ZStats<T> zs{tsum.data(), tsq.data(), tshift.data(), tcount.data()};
    dispatch_geometry(stride, scale.has_value() ? kPrologue : kNoPrologue, [&](auto S, auto FL) {
      forward_kernel<T, decltype(S)::value, decltype(FL)::value != kNoPrologue, true>(
          G, x.data_ptr<T>(), z.data_ptr<T>(), cst, &zs);
    });
    // Per task: mean = shift + sum / n, M2 = sumsq - sum^2 / n; then Chan's merge in task order.
    std::vector<double> tmean(size_t(ntasks * C)), tm2(size_t(ntasks * C));
    for (int64_t t = 0; t < ntasks; ++t) {
      const double n = double(tcount[size_t(t)]);
      for (int64_t c = 0; c < C; ++c) {
        const size_t i = size_t(t * C + c);
        tmean[i] = double(tshift[i]) + tsum[i] / n;
        tm2[i] = std::max(0.0, tsq[i] - tsum[i] * tsum[i] / n);
      }
    }
    std::vector<double> mu, m2;
    const double cnt = merge_task_moments(ntasks, C, tmean, tm2, tcount, mu, m2);
    write_mean_invstd(C, mu, m2, cnt, eps, z_mean.data_ptr<T>(), z_invstd.data_ptr<T>());
  });
  return {channels_last(x_) ? z : z.contiguous(), z_mean, z_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_backward_cpu(const at::Tensor& grad_out_, const at::Tensor& x_,
                                                                   const at::Tensor& weight, int64_t stride,
                                                                   int64_t padding, const Opt& mean, const Opt& scale,
                                                                   const Opt& beta, bool sums) {
  const Geo G = check_args("dwconv_backward", x_, weight, stride, padding, mean, scale, beta);
  TORCH_CHECK(grad_out_.dim() == 4 && grad_out_.size(0) == G.N && grad_out_.size(1) == G.C &&
                  grad_out_.size(2) == G.OH && grad_out_.size(3) == G.OW,
              "dwconv_backward: grad_out ", grad_out_.sizes(), " is not the output of x ", x_.sizes(), " (stride ",
              stride, "): expected [", G.N, ", ", G.C, ", ", G.OH, ", ", G.OW, "]");
  TORCH_CHECK(grad_out_.scalar_type() == x_.scalar_type(), "dwconv_backward: dtypes differ (x is ",
              x_.scalar_type(), ", grad_out ", grad_out_.scalar_type(), ")");
  TORCH_CHECK(!sums || scale.has_value(), "dwconv_backward: sums need the BN + ReLU6 prologue (mean, scale, beta)");
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor gy = grad_out_.contiguous(cl), x = x_.contiguous(cl);
  at::Tensor gx = at::empty({G.N, G.C, G.H, G.W}, x.options().memory_format(cl));
  std::vector<double> acc(static_cast<size_t>(NACC * G.C));
  const int flavour = !scale.has_value() ? kNoPrologue : sums ? kPrologueSums : kPrologue;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dwconv_backward_cpu", [&] {
    const Consts<scalar_t> cst(weight, mean, scale, beta, G.C);
    dispatch_geometry(stride, flavour, [&](auto S, auto FL) {
      backward_kernel<scalar_t, decltype(S)::value, decltype(FL)::value>(
          G, gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), cst, acc.data());
    });
  });
  at::Tensor gw = at::empty({G.C, NT}, x.options().dtype(at::kDouble));
  double* out = gw.data_ptr<double>();
  for (int i = 0; i < NT; ++i)
    for (int64_t c = 0; c < G.C; ++c) out[c * NT + i] = acc[size_t(i * G.C + c)];
  at::Tensor bn = at::empty({sums ? 2 : 0, G.C}, x.options().dtype(at::kDouble));
  if (sums) std::copy(acc.begin() + NT * G.C, acc.end(), bn.data_ptr<double>());
  return {channels_last(x_) ? gx : gx.contiguous(), gw.to(x.scalar_type()).reshape({G.C, 1, K, K}), bn};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) {
  m.impl("dwconv_forward", &dwconv_forward_cpu);
  m.impl("dwconv_forward_stats", &dwconv_forward_stats_cpu);
  m.impl("dwconv_backward", &dwconv_backward_cpu);
}

}  // namespace fastface
