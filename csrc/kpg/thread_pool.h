// The CPU path's parallel loop: persistent workers that sleep (futex wait, no spinning) between
// calls, so they never compete with PyTorch's own OpenMP threads for the cores.
#pragma once

#include <cstdint>

namespace kpg {

using ItemFn = void (*)(void* context, int64_t item);

// Calls fn(context, item) once for every item in [0, num_items), spread over the calling thread and
// the workers; returns when all are done.
void parallel_for(int64_t num_items, ItemFn fn, void* context);

template <typename Fn>
void parallel_for(int64_t num_items, Fn& fn) {
  parallel_for(
      num_items, [](void* context, int64_t item) { (*static_cast<Fn*>(context))(item); }, &fn);
}

// Threads used by parallel_for, the calling thread included (at least 1).
void set_num_threads(int num_threads);
int get_num_threads();

}  // namespace kpg
