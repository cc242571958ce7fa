// Tasks of the training kernels on ATen's OpenMP threads, shared by bn_act, dwconv_bn_act and
// dwconv_train.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace fastface {

// body(t) for every t in [0, ntasks) on ATen's OpenMP threads; problems with less than
// `inline_below` units of work run inline, where handing out tasks would cost more than the work.
// Not the task pool of task_pool.h (the eval kernels' choice): these ops run in training, between
// OpenMP-parallel ATen ops (1x1 convs, BN, ReLU6), and the pool's helper threads, spinning after a
// kernel next to OpenMP's, took cores from those ops: on the quiet 2-core box a MobileNetV2
// training step (batch 64) took 0.525 s with the pool and 0.484 s with OpenMP. Callers fix their
// tasks by the shape alone and merge per-task partials in task order, so results do not depend on
// the threads.
//
// Each team thread owns a contiguous share of the tasks, as at::parallel_for would give it, and
// takes them from its front; a thread done with its share then takes the tasks left in the others'
// shares from their backs. With fixed shares only, a thread that started late, ran slower (another
// process on its core) or drew the short tail of the tasks left the other waiting at the region's
// barrier (perf on a training step: the second thread spun in libgomp ~18 % of its time). Handing
// out every task from one shared counter instead interleaved the threads' tasks and ran a training
// step ~6 % slower (neighbouring tasks share cache lines and halo rows, and each thread's prefetchers
// ran into the other's data); taking from the back keeps the two apart.
class alignas(64) TaskShare {
 public:
  void reset(int64_t lo, int64_t hi) { range_.store(pack(lo, hi), std::memory_order_relaxed); }
  // The next task from the front (owner) or the back (thief); -1 when the share is empty.
  int64_t take(bool front) {
    uint64_t r = range_.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = int64_t(r >> 32), hi = int64_t(r & 0xFFFFFFFFu);
      if (lo >= hi) return -1;
      const uint64_t want = front ? pack(lo + 1, hi) : pack(lo, hi - 1);
      if (range_.compare_exchange_weak(r, want, std::memory_order_relaxed)) return front ? lo : hi - 1;
    }
  }

 private:
  static uint64_t pack(int64_t lo, int64_t hi) { return (uint64_t(lo) << 32) | uint64_t(hi); }
  std::atomic<uint64_t> range_{0};
};

template <class F>
void for_tasks(int64_t work, int64_t ntasks, F&& body, int64_t inline_below = int64_t(1) << 15) {
  const int64_t nth = std::min<int64_t>(at::get_num_threads(), ntasks);
  // (task indices travel packed in 32 bits; no caller comes near that many)
  if (work < inline_below || nth <= 1 || at::in_parallel_region() || ntasks >= (int64_t(1) << 31)) {
    for (int64_t t = 0; t < ntasks; ++t) body(t);
    return;
  }
  std::vector<TaskShare> shares(static_cast<size_t>(nth));
  const int64_t per = (ntasks + nth - 1) / nth;
  for (int64_t i = 0; i < nth; ++i) shares[size_t(i)].reset(std::min(ntasks, i * per), std::min(ntasks, (i + 1) * per));
  at::parallel_for(0, nth, 1, [&](int64_t b, int64_t) {
    for (int64_t k = 0; k < nth; ++k) {
      TaskShare& s = shares[size_t((b + k) % nth)];
      for (int64_t t = s.take(k == 0); t >= 0; t = s.take(k == 0)) body(t);
    }
  });
}

}  // namespace fastface
