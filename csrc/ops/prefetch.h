// Software prefetch for the decode kernels' weight streams: ops/quant.cpp's int8 / int4 tiles and ops/gemv_bf16.cpp's
// bf16 panels, each read once per step from memory, a thread's share in address order.
//
// A kernel asks for the lines kStreamNear bytes ahead of the ones it loads into L1 (_MM_HINT_T0) and kStreamFar
// ahead into L2 (_MM_HINT_T1). Past the end of a tile or panel that is the next one, the thread's next in its share; a
// prefetch never faults. A core's stream is bound by its own misses in flight: on an Intel Xeon (2026-11-27, 2
// threads) a plain sequential read ran at 27.6 GB/s and one asking for the lines 1-2 KB ahead at 31.6 (the hardware
// prefetchers ask for fewer). L1 holds few requests at a time (its fill buffers: a profile of int8 decode had most of
// the kernel's samples on the T0 prefetches, each waiting for one), L2 more, so the far requests keep more of the
// stream coming. The kernels' own comments give what each distance measured there.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace gemmalens::ops {

constexpr int64_t kStreamNear = 2048;  // bytes ahead, into L1
constexpr int64_t kStreamFar = 4096;   // bytes ahead, into L2

// The `lines` 64-byte lines from p, kStreamNear ahead into L1 and kStreamFar ahead into L2.
inline void prefetch_stream(const void* p, int lines) {
  const char* c = static_cast<const char*>(p);
  for (int l = 0; l < lines; ++l) _mm_prefetch(c + kStreamNear + 64 * l, _MM_HINT_T0);
  for (int l = 0; l < lines; ++l) _mm_prefetch(c + kStreamFar + 64 * l, _MM_HINT_T1);
}

}  // namespace gemmalens::ops
