// Torch-free launcher of the fused inverted-residual block CUDA kernel (raw pointers, sizes, a
// stream), so ir_block.cu compiles with plain nvcc (make cuda-check) without CUDA torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fastface {
namespace cuda {

// Storage type of the activations and weights of the fused kernels (math is fp32 throughout).
enum class FusedDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct IrBlockShape {
  int64_t N, H, W, OH, OW;  // batch, input and output spatial size
  int64_t G, Cin, Ce, Cout;  // branches, and channels of one branch: input, expanded, output
  int64_t K, stride;         // depthwise kernel (odd, <= 7, padding K/2) and stride (1 or 2)
  bool has_expand, residual;
};

// y = ir_block(x, w_expand, b_expand, w_dw, b_dw, w_proj, b_proj) for G branches at once.
// x (N x H x W x G*Cin) and y (N x OH x OW x G*Cout) are channels-last (NHWC) contiguous; the
// weights are contiguous in the schema's shapes (w_expand G*Ce x Cin, w_dw G*Ce x K x K,
// w_proj G*Cout x Ce) and all tensors share `dtype`. w_expand and b_expand may be null when
// !has_expand. Returns cudaErrorInvalidValue for unsupported sizes.
cudaError_t ir_block_forward(const void* x, const void* w_expand, const void* b_expand, const void* w_dw,
                             const void* b_dw, const void* w_proj, const void* b_proj, void* y, FusedDType dtype,
                             const IrBlockShape& s, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastface
