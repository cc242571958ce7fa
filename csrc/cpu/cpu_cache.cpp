// A caching CPU allocator: the CPU twin of CUDA's caching allocator, for training steps.
//
// glibc hands every allocation above its mmap threshold (dynamic, at most 32 MiB) fresh pages
// and returns them to the kernel on free, so a training step that allocates the same large
// activations and gradients every iteration page-faults all of them in again each time: one
// [64, 144, 28, 28] float map (29 MB) took 9.2 ms to normalise from fresh pages and 2.6 ms from
// reused ones in the face model's step. Once enabled, blocks of at least kMinBytes (64 KiB) are kept
// when freed and handed out again for the same (page-rounded) size; smaller ones, and every
// allocation while disabled, go to the allocator this one replaced, unchanged.
//
// The allocator is installed as c10's CPU allocator on first enable and stays installed (a
// tensor may outlive any enable/disable scope; every pointer it hands out is freed through it,
// others go back to the allocator that made them), so disabling only stops caching. The cache
// holds at most FASTFACE_CPU_CACHE_MB MiB of idle blocks (default a quarter of physical memory;
// evicting other sizes first), and empty() releases them all.
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

// Smaller blocks go to malloc's arenas. At 1 MiB the face model's step still took ~100-1,200 minor faults (its
// 0.1-1 MiB maps: glibc's dynamic mmap and trim thresholds hand some of them fresh pages again); at 64 KiB ~3, and
// the step ran ~2 ms faster (four A/B pairs, 2 threads).
constexpr size_t kMinBytes = size_t(64) << 10;
constexpr size_t kPage = size_t(4) << 10;
constexpr size_t kHuge = size_t(2) << 20;  // transparent huge page

size_t default_limit() {
  const char* env = std::getenv("FASTFACE_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') return size_t(std::max<long long>(0, std::atoll(env))) << 20;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? size_t(pages) * size_t(page) / 4 : size_t(1) << 30;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  CachingCPUAllocator() : limit_(default_limit()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || !enabled_.load(std::memory_order_relaxed)) return base_->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    void* p = nullptr;
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {  // a hit is handed out under this one lock
        p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
        track_locked(p, size, live, reserved);
      } else {
        ++misses_;
      }
    }
    if (p == nullptr) {  // fresh memory is allocated outside the lock
      p = fresh(size);
      std::lock_guard<std::mutex> lk(mu_);
      track_locked(p, size, live, reserved);
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, int64_t(size), live, reserved, c10::Device(c10::DeviceType::CPU));
    }
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // Frees p: into the cache when it is one of ours and caching is on (and it fits), back to the
  // system when ours otherwise, and to the replaced allocator when it made it.
  static void release(void* p);

  bool install() {
    std::call_once(installed_, [this] {
      base_ = c10::GetCPUAllocator();
      // Another caching allocator (e.g. an extension's) may already hold a higher priority.
      c10::SetCPUAllocator(this, /*priority=*/1);
      pthread_atfork([] { self().mu_.lock(); }, [] { self().mu_.unlock(); }, [] { self().mu_.unlock(); });
    });
    return c10::GetCPUAllocator() == this;
  }

  bool set_enabled(bool on) {
    if (on) {
      TORCH_CHECK(install(), "fastface CPU cache: c10's CPU allocator is held by another allocator of higher "
                             "priority; the cache cannot be enabled");
    }
    return enabled_.exchange(on);
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "fastface CPU cache: the limit must be >= 0 bytes, got ", bytes);
    std::vector<void*> drop;
    int64_t old;
    {
      std::lock_guard<std::mutex> lk(mu_);
      old = int64_t(limit_);
      limit_ = size_t(bytes);
      evict_locked(0, 0, drop);
    }
    for (void* p : drop) std::free(p);
    return old;
  }

  int64_t empty() {
    std::vector<void*> drop;
    size_t freed;
    {
      std::lock_guard<std::mutex> lk(mu_);
      freed = cached_;
      for (auto& [size, blocks] : free_) drop.insert(drop.end(), blocks.begin(), blocks.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* p : drop) std::free(p);
    return int64_t(freed);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lk(mu_);
    int64_t blocks = 0;
    for (auto& [size, b] : free_) blocks += int64_t(b.size());
    const bool installed = base_ != nullptr && c10::GetCPUAllocator() == this;
    return {int64_t(enabled_.load()), int64_t(installed), int64_t(cached_), blocks, int64_t(live_bytes_),
            int64_t(peak_cached_), hits_, misses_, int64_t(limit_), int64_t(kMinBytes)};
  }

  static CachingCPUAllocator& self() {
    static CachingCPUAllocator* a = new CachingCPUAllocator();  // never destroyed: tensors may outlive exit
    return *a;
  }

 private:
  void* fresh(size_t size) {
    // Blocks of a huge page or more start on one and ask for THP: fewer faults and TLB misses.
    const size_t align = size >= kHuge ? kHuge : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, size) != 0) {
      empty();  // give the idle blocks back and try once more
      if (posix_memalign(&p, align, size) != 0) {
        c10::reportOutOfMemoryToProfiler(int64_t(size), live_bytes_, live_bytes_ + cached_,
                                         c10::Device(c10::DeviceType::CPU));
        TORCH_CHECK_WITH(OutOfMemoryError, false, "fastface CPU cache: out of memory allocating ", size,
                         " bytes (", live_bytes_, " bytes in use through the cache)");
      }
    }
#ifdef MADV_HUGEPAGE
    if (align == kHuge) madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
  }

  // Records p as handed out; live and reserved: the totals after it (for the profiler).
  void track_locked(void* p, size_t size, size_t& live, size_t& reserved) {
    live_.emplace(p, size);
    live_bytes_ += size;
    live = live_bytes_;
    reserved = live_bytes_ + cached_;
  }

  // Frees idle blocks (other sizes than `keep` first) until `incoming` more bytes fit the limit.
  void evict_locked(size_t incoming, size_t keep, std::vector<void*>& drop) {
    for (int pass = 0; pass < 2 && cached_ + incoming > limit_; ++pass) {
      for (auto it = free_.begin(); it != free_.end() && cached_ + incoming > limit_;) {
        if (pass == 0 && it->first == keep) {
          ++it;
          continue;
        }
        while (!it->second.empty() && cached_ + incoming > limit_) {
          drop.push_back(it->second.back());
          it->second.pop_back();
          cached_ -= it->first;
        }
        it = it->second.empty() ? free_.erase(it) : std::next(it);
      }
    }
  }

  c10::Allocator* base_ = nullptr;
  std::once_flag installed_;
  std::atomic<bool> enabled_{false};
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // page-rounded size -> idle blocks
  std::unordered_map<void*, size_t> live_;                 // handed out, not yet freed
  size_t cached_ = 0, live_bytes_ = 0, peak_cached_ = 0, limit_;
  int64_t hits_ = 0, misses_ = 0;
};

void CachingCPUAllocator::release(void* p) {
  if (p == nullptr) return;
  CachingCPUAllocator& a = self();
  size_t size = 0, live = 0, reserved = 0;
  bool keep = false;
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lk(a.mu_);
    auto it = a.live_.find(p);
    if (it != a.live_.end()) {
      size = it->second;
      a.live_.erase(it);
      a.live_bytes_ -= size;
      if (a.enabled_.load(std::memory_order_relaxed) && size <= a.limit_) {
        a.evict_locked(size, size, drop);
        a.free_[size].push_back(p);
        a.cached_ += size;
        a.peak_cached_ = std::max(a.peak_cached_, a.cached_);
        keep = true;
      }
      live = a.live_bytes_;
      reserved = a.live_bytes_ + a.cached_;
    }
  }
  for (void* q : drop) std::free(q);
  if (size == 0) {
    a.base_->raw_deleter()(p);  // made by the replaced allocator (small, or while disabled)
    return;
  }
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(p, -int64_t(size), live, reserved, c10::Device(c10::DeviceType::CPU));
  }
  if (!keep) std::free(p);
}

bool cpu_cache_enable(bool on) { return CachingCPUAllocator::self().set_enabled(on); }
std::vector<int64_t> cpu_cache_stats() { return CachingCPUAllocator::self().stats(); }
int64_t cpu_cache_empty() { return CachingCPUAllocator::self().empty(); }
int64_t cpu_cache_set_limit(int64_t bytes) { return CachingCPUAllocator::self().set_limit(bytes); }

}  // namespace

// Tensor-free control ops: registered with their kernels as catch-all functions.
TORCH_LIBRARY_FRAGMENT(fastface, m) {
  // Turns caching on or off (installing the allocator on first use); returns the previous state.
  m.def("cpu_cache_enable(bool on) -> bool", &cpu_cache_enable);
  // [enabled, installed, cached bytes, cached blocks, live bytes, peak cached bytes, hits, misses,
  //  limit bytes, smallest cached size]
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
  // Releases every idle block; returns the bytes released.
  m.def("cpu_cache_empty() -> int", &cpu_cache_empty);
  // Sets the most idle bytes kept (evicting at once); returns the previous limit.
  m.def("cpu_cache_set_limit(int bytes) -> int", &cpu_cache_set_limit);
}
