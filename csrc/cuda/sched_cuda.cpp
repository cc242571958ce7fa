// Registers the FastFace scheduler step CUDA launcher for the CUDA dispatch key (CUDA builds only).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "sched.h"

namespace fastface {
namespace {

cuda::SchedDType sched_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::SchedDType::kFloat32;
    case at::kDouble: return cuda::SchedDType::kFloat64;
    case at::kHalf: return cuda::SchedDType::kFloat16;
    case at::kBFloat16: return cuda::SchedDType::kBFloat16;
    default: TORCH_CHECK(false, "fastface_sched_step (CUDA): ", what, " has unsupported dtype ", t.scalar_type());
  }
}

void sched_step_cuda(const at::Tensor& state, const at::Tensor& lrs, const at::Tensor& loss,
                     const at::Tensor& base_lrs, double w1, double w2, double w3, double alpha, double lambd,
                     int64_t patience, double delta, int64_t max_halvings, int64_t warmup_steps) {
  TORCH_CHECK(state.scalar_type() == at::kDouble && state.dim() == 1 && state.numel() == sched::kStateSize &&
                  state.is_contiguous(),
              "fastface_sched_step (CUDA): state must be a contiguous float64 vector of ", int(sched::kStateSize),
              " entries, got ", state.scalar_type(), " ", state.sizes());
  TORCH_CHECK(lrs.dim() == 1 && lrs.is_contiguous() &&
                  (lrs.scalar_type() == at::kFloat || lrs.scalar_type() == at::kDouble),
              "fastface_sched_step (CUDA): lrs must be a contiguous float32/float64 vector, got ", lrs.scalar_type(),
              " ", lrs.sizes());
  TORCH_CHECK(base_lrs.scalar_type() == at::kDouble && base_lrs.dim() == 1 && base_lrs.is_contiguous() &&
                  base_lrs.numel() == lrs.numel(),
              "fastface_sched_step (CUDA): base_lrs must be a contiguous float64 vector as long as lrs (",
              lrs.numel(), "), got ", base_lrs.scalar_type(), " ", base_lrs.sizes());
  TORCH_CHECK(loss.numel() == 1, "fastface_sched_step (CUDA): loss must be a single value, got ", loss.sizes());
  TORCH_CHECK(patience >= 1 && delta > 0.0 && max_halvings >= 0 && warmup_steps >= 0,
              "fastface_sched_step (CUDA): need patience >= 1, delta > 0, max_halvings >= 0, warmup_steps >= 0; got ",
              patience, ", ", delta, ", ", max_halvings, ", ", warmup_steps);
  for (const at::Tensor* t : {&lrs, &loss, &base_lrs}) {
    TORCH_CHECK(t->device() == state.device(), "fastface_sched_step (CUDA): all tensors must be on ",
                state.device(), ", got one on ", t->device());
  }
  TORCH_CHECK(state.is_cuda(), "fastface_sched_step (CUDA): tensors must be on a CUDA device");
  c10::cuda::CUDAGuard guard(state.device());
  const sched::Params p{w1, w2, w3, alpha, lambd, delta, patience, max_halvings, warmup_steps};
  auto err = cuda::sched_step(state.data_ptr<double>(), lrs.data_ptr(), sched_dtype(lrs, "lrs"), loss.data_ptr(),
                              sched_dtype(loss, "loss"), base_lrs.data_ptr<double>(), lrs.numel(), p,
                              at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastface_sched_step (CUDA): ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastface, CUDA, m) { m.impl("fastface_sched_step", &sched_step_cuda); }

}  // namespace fastface
