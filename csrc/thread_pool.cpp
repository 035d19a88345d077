// Persistent worker threads for the CPU kernels (kpg/thread_pool.h). Each participant owns a
// contiguous block of items and claims them in order, so every thread streams through memory the
// way hardware prefetchers expect; one that finishes early takes the remaining items of the other
// blocks. Every item is independent, so results do not depend on which thread ran it.
#include "kpg/thread_pool.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace kpg {
namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads) : owner_pid_(getpid()) { resize(num_threads); }

  int num_threads() {
    std::lock_guard<std::mutex> lock(mutex_);
    return active_workers_ + 1;
  }

  // Workers are detached and live until the process ends, asleep between jobs; shrinking only
  // lowers how many take part.
  void resize(int num_threads) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    std::lock_guard<std::mutex> lock(mutex_);
    const int wanted_workers = std::max(num_threads, 1) - 1;
    if (static_cast<int>(blocks_.size()) < wanted_workers + 1)
      blocks_ = std::vector<Block>(wanted_workers + 1);
    for (; started_workers_ < wanted_workers; ++started_workers_) {
      std::thread([this, index = started_workers_] { worker_loop(index); }).detach();
    }
    active_workers_ = wanted_workers;
  }

  void run(int64_t num_items, ItemFn fn, void* context) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    int helpers;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      helpers = static_cast<int>(std::min<int64_t>(active_workers_, num_items - 1));
      fn_ = fn;
      context_ = context;
      num_items_ = num_items;
      participants_ = helpers + 1;
      for (int p = 0; p < participants_; ++p) {
        blocks_[p].next.store(block_begin(p), std::memory_order_relaxed);
      }
      helpers_ = helpers;
      pending_helpers_ = helpers;
      ++generation_;
    }
    if (helpers > 0) job_posted_.notify_all();
    work(helpers);
    std::unique_lock<std::mutex> lock(mutex_);
    job_done_.wait(lock, [this] { return pending_helpers_ == 0; });
  }

  bool owned_by_this_process() const { return owner_pid_ == getpid(); }

 private:
  int64_t block_begin(int block) const { return num_items_ * block / participants_; }

  // Participant `self` drains its own block, then the others' in turn.
  void work(int self) {
    for (int offset = 0; offset < participants_; ++offset) {
      const int block = (self + offset) % participants_;
      const int64_t end = block_begin(block + 1);
      for (int64_t item = blocks_[block].next.fetch_add(1, std::memory_order_relaxed); item < end;
           item = blocks_[block].next.fetch_add(1, std::memory_order_relaxed)) {
        fn_(context_, item);
      }
    }
  }

  // A worker reads the generation and the job under one lock, so it joins a job at most once; the
  // next job cannot be posted before every helper of this one has reported.
  void worker_loop(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      job_posted_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= helpers_) continue;
      lock.unlock();
      work(index);
      lock.lock();
      if (--pending_helpers_ == 0) job_done_.notify_one();
    }
  }

  const pid_t owner_pid_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable job_posted_;
  std::condition_variable job_done_;
  int started_workers_ = 0;
  int active_workers_ = 0;
  uint64_t generation_ = 0;
  int helpers_ = 0;
  int pending_helpers_ = 0;
  ItemFn fn_ = nullptr;
  void* context_ = nullptr;
  int64_t num_items_ = 0;
  int participants_ = 1;
  // One claim counter per block, each on its own cache line so claims do not contend.
  struct alignas(64) Block {
    std::atomic<int64_t> next{0};
  };
  std::vector<Block> blocks_;
};

std::mutex pool_mutex;
ThreadPool* pool = nullptr;
int requested_threads = 0;

// A forked child has none of the parent's workers: it builds a pool of its own (the parent's object
// is abandoned, never destroyed, as its threads do not exist here).
ThreadPool& current_pool() {
  std::lock_guard<std::mutex> guard(pool_mutex);
  if (pool == nullptr || !pool->owned_by_this_process()) {
    const int threads = requested_threads > 0
                            ? requested_threads
                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    pool = new ThreadPool(threads);
  }
  return *pool;
}

}  // namespace

void parallel_for(int64_t num_items, ItemFn fn, void* context) {
  if (num_items <= 0) return;
  current_pool().run(num_items, fn, context);
}

void set_num_threads(int num_threads) {
  {
    std::lock_guard<std::mutex> guard(pool_mutex);
    requested_threads = std::max(num_threads, 1);
  }
  current_pool().resize(std::max(num_threads, 1));
}

int get_num_threads() { return current_pool().num_threads(); }

}  // namespace kpg
