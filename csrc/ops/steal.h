// A loop over many equal, memory-bound tasks (the int8 / int4 kernels' weight tiles) split across the threads so
// that they finish together.
//
// schedule(static) gives each thread one contiguous share: the weights are read as one stream per thread, and the
// kernels' prefetches run ahead within it. But a thread that starts late (an OpenMP worker sees a new region some
// microseconds after the master enters it) or reads slower than the other finishes later, and the other waits at
// the barrier. A decode step of the 270M runs ~110 such regions of 20-200 microseconds each: on the Intel Xeon VM of
// 2026-11-27 (2 threads, real 270M int8 decode at context 128), `perf` put 5-6% of each thread's time in libgomp's
// spin, and the master's share of it (its waits for the worker) went from 5.3% to 1.6% with this split.
// schedule(dynamic, 4) balances but breaks the streams (83 -> 74-76 tok/s there), guided did nothing.
//
// parallel_steal keeps the static shares and their order, and a thread that runs out takes the back half of what
// another thread has left (work stealing by halves). A share is one 64-bit word, the next task (low half) and the
// end (high half): its thread claims tasks by adding to the low half, a thief takes the back half by a
// compare-and-swap on the word, so every task is run by exactly one thread. The word means the same whatever its
// history (the tasks [next, end) nobody has claimed), so a compare-and-swap that finds the value it read is right.
// Which thread runs a task changes nothing in its result: the tasks write disjoint outputs.
//
// Measured 2026-11-27 on that Xeon, alternating builds (`cls.py` of the closing note: real 270M, int8 weights, decode
// at context 128): 78.7-83.3 -> 82.6-85.2 tok/s over four pairs forced to amx and avx512. The bf16 decode panels
// (64-column panels of 20-80 KB) did not gain (avx2: 48-51 -> 46-49 claiming one panel at a time) and keep
// schedule(static).
#pragma once
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace gemmalens::ops {

// Tasks are claimed kStealGrain at a time from a thread's own share (one atomic add per claim, on a line no other
// thread touches until it steals; a task of the int8 decode kernels is a 16-column tile, ~10-30 KB of weights). A
// matmul ends when its last claim does, so a thread that finds nothing left waits up to one claim of the other's:
// at 4 tiles that was ~1-8 us per matmul (a quarter to a half of a 2048-deep tile's 128 KB of weights), 73 matmuls a
// decode step. One tile per claim, alternated builds on the Xeon (2026-11-28, `dec3.py int8 64` of the closing note:
// real 270M at context 128, fraction of the bandwidth bound): amx 0.82-0.85 -> 0.86-0.91 (90-99 -> 94-105 tok/s),
// avx512 0.83-0.88 -> 0.84-0.88, avx2 0.83-0.84 -> 0.84-0.85; 2 tiles in between.
constexpr uint64_t kStealGrain = 1;

template <class F>
void parallel_steal(int64_t n, F&& f) {
  constexpr uint64_t grain = kStealGrain;
  const int nt = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), n));
  if (nt <= 1 || omp_in_parallel() || n >= (int64_t{1} << 31)) {
#pragma omp parallel for schedule(static) if (nt > 1 && !omp_in_parallel())
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct alignas(64) Share {
    std::atomic<uint64_t> word;
  };
  constexpr int kOnStack = 8;
  Share on_stack[kOnStack];
  std::unique_ptr<Share[]> on_heap;
  Share* share = on_stack;
  if (nt > kOnStack) {
    on_heap.reset(new Share[nt]);
    share = on_heap.get();
  }
  auto pack = [](uint64_t next, uint64_t end) { return next | end << 32; };
  for (int t = 0; t < nt; ++t)
    share[t].word.store(pack(static_cast<uint64_t>(n * t / nt), static_cast<uint64_t>(n * (t + 1) / nt)), std::memory_order_relaxed);
#pragma omp parallel num_threads(nt)
  {
    // A team smaller than asked for leaves shares without their thread: the others take them by halves.
    const int me = omp_get_thread_num();
    std::atomic<uint64_t>& own = share[me].word;
    for (;;) {
      for (;;) {
        const uint64_t w = own.fetch_add(grain, std::memory_order_acq_rel);
        const uint64_t next = w & 0xffffffffu, end = w >> 32;
        if (next >= end) break;
        for (uint64_t i = next; i < std::min(end, next + grain); ++i) f(static_cast<int64_t>(i));
      }
      bool took = false;
      for (int k = 1; k < nt && !took; ++k) {
        std::atomic<uint64_t>& other = share[(me + k) % nt].word;
        uint64_t w = other.load(std::memory_order_relaxed);
        for (;;) {
          const uint64_t next = w & 0xffffffffu, end = w >> 32;
          if (next >= end) break;
          const uint64_t from = end - (end - next + 1) / 2;  // the back half, the odd task with it
          if (other.compare_exchange_weak(w, pack(next, from), std::memory_order_acq_rel, std::memory_order_relaxed)) {
            own.store(pack(from, end), std::memory_order_release);
            took = true;
            break;
          }
        }
      }
      if (!took) break;
    }
  }
}

}  // namespace gemmalens::ops
