// The depthwise training conv's kernels for double, stride 2 (see dwconv_train_kernels.h).
#include "dwconv_train_kernels.h"

namespace fastface {
namespace dwconv_train {

FASTFACE_DWCONV_TRAIN_KERNELS(, double, 2)

}  // namespace dwconv_train
}  // namespace fastface
