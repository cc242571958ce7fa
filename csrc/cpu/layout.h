// fastface's output layout rule, shared by every CPU kernel (and fastface/ops/_common.py's twin):
// channels_last in, channels_last out; shapes where both layouts coincide count as NCHW.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastface {

inline bool channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace fastface
