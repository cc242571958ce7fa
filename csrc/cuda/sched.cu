// FastFace LR scheduler step, CUDA: one thread runs the shared update (../sched_step.h, with
// __d*_rn intrinsics so nvcc cannot contract the recurrence into FMAs) and writes the LRs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sched.h"

namespace fastface {
namespace cuda {
namespace {

__device__ inline double load_loss(const void* p, SchedDType dt) {
  switch (dt) {
    case SchedDType::kFloat32: return (double)*static_cast<const float*>(p);
    case SchedDType::kFloat64: return *static_cast<const double*>(p);
    case SchedDType::kFloat16: return (double)__half2float(*static_cast<const __half*>(p));
    default: return (double)__bfloat162float(*static_cast<const __nv_bfloat16*>(p));
  }
}

__global__ void sched_step_kernel(double* __restrict__ state, void* __restrict__ lrs, SchedDType lrs_dtype,
                                  const void* __restrict__ loss, SchedDType loss_dtype,
                                  const double* __restrict__ base_lrs, int64_t groups, sched::Params p) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double st[sched::kStateSize];
  for (int i = 0; i < sched::kStateSize; ++i) st[i] = state[i];
  sched::update(st, load_loss(loss, loss_dtype), p);
  for (int i = 0; i < sched::kStateSize; ++i) state[i] = st[i];
  const double scale = sched::lr_scale(st, p);
  for (int64_t g = 0; g < groups; ++g) {
    const double lr = sched::mul(base_lrs[g], scale);
    if (lrs_dtype == SchedDType::kFloat64) static_cast<double*>(lrs)[g] = lr;
    else static_cast<float*>(lrs)[g] = __double2float_rn(lr);
  }
}

}  // namespace

cudaError_t sched_step(double* state, void* lrs, SchedDType lrs_dtype, const void* loss, SchedDType loss_dtype,
                       const double* base_lrs, int64_t groups, sched::Params params, cudaStream_t stream) {
  if (lrs_dtype != SchedDType::kFloat32 && lrs_dtype != SchedDType::kFloat64) return cudaErrorInvalidValue;
  sched_step_kernel<<<1, 1, 0, stream>>>(state, lrs, lrs_dtype, loss, loss_dtype, base_lrs, groups, params);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastface
