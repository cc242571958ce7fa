// Torch-free launcher of the FastFace scheduler step CUDA kernel (raw pointers and a
// stream), so sched.cu compiles with plain nvcc (make cuda-check) without CUDA torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../sched_step.h"

namespace fastface {
namespace cuda {

// Storage type of the loss and of the LR vector (the state and base LRs are always float64).
enum class SchedDType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// One scheduler step on the device: state[kStateSize] (float64) updated in place from *loss,
// then lrs[i] = base_lrs[i] * factor * warmup for i < groups. A single thread does all of it:
// a few dozen flops, so the launch is the whole cost, and nothing is read back to the host.
cudaError_t sched_step(double* state, void* lrs, SchedDType lrs_dtype, const void* loss, SchedDType loss_dtype,
                       const double* base_lrs, int64_t groups, sched::Params params, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastface
