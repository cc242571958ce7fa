// A task pool for the fused CPU kernels where the calling thread works too and never waits
// for a helper that has not started.
//
// Why not at::parallel_for (OpenMP): an OpenMP region ends in a barrier that needs every team
// thread. On a loaded machine the second thread is often descheduled, and each region then
// waits a scheduler slice for it: measured on the shared 2-core box (load 5), a 50 us block
// took ~14 ms with two OpenMP threads, while onnxruntime (whose pool lets the caller run the
// work) stayed at ~0.3 ms. Here tasks are claimed from an atomic counter: the caller takes
// tasks until none are left, then waits only for tasks a helper already claimed. A helper that
// wakes late finds nothing to do. Results never depend on which thread ran a task.
//
// Helpers spin briefly after a job (consecutive kernels of one forward arrive within tens of
// microseconds), then sleep on a condition variable. The pool is per process (re-created
// after fork) and never destroyed (helpers blocked at exit are reaped by the OS).
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FF_PAUSE() _mm_pause()
#else
#define FF_PAUSE() std::this_thread::yield()
#endif

namespace fastface {
namespace pool {

struct Job {
  const std::function<void(int64_t)>* fn = nullptr;  // valid until every claimed task is done
  int64_t ntasks = 0;
  int64_t helpers = 0;  // helpers allowed to join (threads - 1)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex err_mu;
  std::exception_ptr error;

  // Claims and runs tasks until none are left.
  void work() {
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= ntasks) return;
      try {
        (*fn)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

inline thread_local bool tl_in_pool = false;

class Pool {
 public:
  static Pool& get() {
    static std::mutex create_mu;
    static Pool* pool = nullptr;
    std::lock_guard<std::mutex> lk(create_mu);
    if (pool == nullptr || pool->pid_ != ::getpid()) pool = new Pool();  // a forked child has no helpers
    return *pool;
  }

  void run(int64_t ntasks, int64_t threads, const std::function<void(int64_t)>& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->ntasks = ntasks;
    job->helpers = threads - 1;
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (int64_t(helpers_.size()) < threads - 1) {
        const int64_t idx = int64_t(helpers_.size());
        helpers_.emplace_back([this, idx] { loop(idx); });
        helpers_.back().detach();
      }
      job_ = job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    tl_in_pool = true;  // a kernel nested in a task runs inline
    job->work();
    tl_in_pool = false;
    // Only tasks a helper already claimed are left: wait for those, yielding the core.
    for (int spin = 0; job->done.load(std::memory_order_acquire) < ntasks; ++spin) {
      if (spin < 256)
        FF_PAUSE();
      else
        std::this_thread::yield();
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (job_ == job) job_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  Pool() : pid_(::getpid()) {}

  void loop(int64_t idx) {
    tl_in_pool = true;
    uint64_t seen = gen_.load(std::memory_order_acquire);
    for (;;) {
      // ~20 us of polling before sleeping: the next kernel of a forward usually comes sooner.
      for (int i = 0; i < 4000 && gen_.load(std::memory_order_acquire) == seen; ++i) FF_PAUSE();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job && idx < job->helpers) job->work();
    }
  }

  const pid_t pid_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::shared_ptr<Job> job_;
  std::vector<std::thread> helpers_;
};

// Below this many multiply-adds a fused kernel runs on the calling thread alone: handing out
// tasks and waking a helper costs more than it saves. Default 1M (~15 us on one core);
// FASTFACE_PARALLEL_MIN_MACS overrides it (read once).
inline int64_t min_parallel_macs() {
  static const int64_t v = [] {
    const char* env = std::getenv("FASTFACE_PARALLEL_MIN_MACS");
    const long long n = env != nullptr && *env != '\0' ? std::atoll(env) : 0;
    return n > 0 ? int64_t(n) : (int64_t(1) << 20);
  }();
  return v;
}

// fn(t) for every t in [0, ntasks), on up to at::get_num_threads() threads (the caller
// included); inline when there is one task, one thread, or we are already inside the pool.
inline void parallel_tasks(int64_t ntasks, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (threads <= 1 || tl_in_pool || at::in_parallel_region()) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  Pool::get().run(ntasks, threads, fn);
}

}  // namespace pool
}  // namespace fastface
