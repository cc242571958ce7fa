// Tasks of the training kernels on ATen's OpenMP threads, shared by bn_act, dwconv_bn_act and
// dwconv_train.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace fastface {

// body(t) for every t in [0, ntasks) on ATen's OpenMP threads; problems with less than
// `inline_below` units of work run inline, where handing out tasks would cost more than the work.
// Not the task pool of task_pool.h (the eval kernels' choice): these ops run in training, between
// OpenMP-parallel ATen ops (1x1 convs, BN, ReLU6), and the pool's helper threads, spinning after a
// kernel next to OpenMP's, took cores from those ops: on the quiet 2-core box a MobileNetV2
// training step (batch 64) took 0.525 s with the pool and 0.484 s with OpenMP. Callers fix their
// tasks by the shape alone and merge per-task partials in task order, so results do not depend on
// the threads.
template <class F>
void for_tasks(int64_t work, int64_t ntasks, F&& body, int64_t inline_below = int64_t(1) << 15) {
  if (work < inline_below || ntasks == 1) {
    for (int64_t t = 0; t < ntasks; ++t) body(t);
  } else {
    at::parallel_for(0, ntasks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) body(t);
    });
  }
}

}  // namespace fastface
