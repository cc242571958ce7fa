// FastFace LR scheduler step on the CPU: updates the float64 state and writes the group LRs
// (maths in ../sched_step.h, shared with the CUDA kernel).
#include <torch/library.h>
#include <torch/types.h>

#include "../sched_step.h"

namespace fastface {
namespace {

void check_sched_args(const at::Tensor& state, const at::Tensor& lrs, const at::Tensor& loss,
                      const at::Tensor& base_lrs, int64_t patience, double delta, int64_t max_halvings,
                      int64_t warmup_steps) {
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 && state.numel() == sched::kStateSize &&
                  state.is_contiguous(),
              "fastface_sched_step: state must be a contiguous float64 vector of ", int(sched::kStateSize),
              " entries, got ", state.scalar_type(), " ", state.sizes());
  TORCH_CHECK(lrs.dim() == 1 && lrs.is_contiguous() &&
                  (lrs.scalar_type() == at::kFloat || lrs.scalar_type() == at::kDouble),
              "fastface_sched_step: lrs must be a contiguous float32/float64 vector, got ", lrs.scalar_type(), " ",
              lrs.sizes());
  TORCH_CHECK(base_lrs.scalar_type() == at::kDouble && base_lrs.dim() == 1 && base_lrs.is_contiguous() &&
                  base_lrs.numel() == lrs.numel(),
              "fastface_sched_step: base_lrs must be a contiguous float64 vector as long as lrs (", lrs.numel(),
              "), got ", base_lrs.scalar_type(), " ", base_lrs.sizes());
  TORCH_CHECK(loss.numel() == 1 && at::isFloatingType(loss.scalar_type()),
              "fastface_sched_step: loss must be a single floating-point value, got ", loss.scalar_type(), " ",
              loss.sizes());
  TORCH_CHECK(patience >= 1 && delta > 0.0 && max_halvings >= 0 && warmup_steps >= 0,
              "fastface_sched_step: need patience >= 1, delta > 0, max_halvings >= 0, warmup_steps >= 0; got ",
              patience, ", ", delta, ", ", max_halvings, ", ", warmup_steps);
}

void sched_step_cpu(const at::Tensor& state, const at::Tensor& lrs, const at::Tensor& loss,
                    const at::Tensor& base_lrs, double w1, double w2, double w3, double alpha, double lambd,
                    int64_t patience, double delta, int64_t max_halvings, int64_t warmup_steps) {
  check_sched_args(state, lrs, loss, base_lrs, patience, delta, max_halvings, warmup_steps);
  for (const at::Tensor* t : {&state, &lrs, &loss, &base_lrs}) {
    TORCH_CHECK(t->device().is_cpu(), "fastface_sched_step (CPU): all tensors must be on the CPU, got one on ",
                t->device());
  }
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "fastface_sched_step_cpu",
                                  [&] { value = static_cast<double>(*loss.data_ptr<scalar_t>()); });
  const sched::Params p{w1, w2, w3, alpha, lambd, delta, patience, max_halvings, warmup_steps};
  double* st = state.data_ptr<double>();
  sched::update(st, value, p);
  const double scale = sched::lr_scale(st, p);
  const double* base = base_lrs.data_ptr<double>();
  const int64_t groups = lrs.numel();
  AT_DISPATCH_FLOATING_TYPES(lrs.scalar_type(), "fastface_sched_step_cpu_lrs", [&] {
    scalar_t* out = lrs.data_ptr<scalar_t>();
    for (int64_t i = 0; i < groups; ++i) out[i] = static_cast<scalar_t>(sched::mul(base[i], scale));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CPU, m) { m.impl("fastface_sched_step", &sched_step_cpu); }

}  // namespace fastface
