// Transparent huge pages (2 MB) for the large, long-lived buffers every decode step streams through: the weights and
// the KV cache. With 4 KB pages a step's ~300-550 MB (270m) cross a page boundary every 64 cache lines, where the
// hardware prefetchers stop and a TLB miss waits for a page walk. Linux's default THP mode, "madvise", gives 2 MB pages
// only to ranges that ask (measured 2026-11-27 on a Zen 5, 2 threads: decode attention over a 32k-position bf16 cache
// 3.6 -> 3.25 ms for 3 layers). A hint only: where THP is off (or "always") nothing changes.
// GEMMALENS_HUGE_PAGES=0 leaves every buffer on the OS's default pages (1 or unset: huge pages; any other value fails
// the import, naming these).
#pragma once
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace gemmalens::ops {

bool huge_pages_enabled();  // GEMMALENS_HUGE_PAGES is not "0" (read once; a ValueError for a value not 0 / 1)

// Asks for huge pages over the 2 MB-aligned part of [p, p + n). Call it before the buffer is first written: pages
// already touched keep their size (the kernel may merge them later, in the background).
inline void advise_huge_pages(void* p, size_t n) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (!p || n < 2 * kHuge || !huge_pages_enabled()) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + n) & ~(kHuge - 1);
#ifdef MADV_HUGEPAGE
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // best effort: an error changes nothing
#endif
}

// Pages straight from the kernel (mmap): n bytes rounded up to whole 2 MB pages, 2 MB-aligned, zero-filled, advised
// for huge pages before anything touches them (what advise_huge_pages cannot promise: posix_memalign and std::vector
// may hand back heap memory that earlier buffers touched, whose 4 KB pages stay 4 KB whatever is advised; a real 270M
// at 32k context on an Intel Xeon, 2026-11-27, had one of its six 16 MB global-layer KV buffers and 9 of the 64 huge
// pages of its int8 weight chunks on 4 KB pages that way). A ResourceError naming `what` when the memory is not there.
void* map_pages(size_t n, const char* what);
void unmap_pages(void* p, size_t n) noexcept;  // p from map_pages(n)
constexpr size_t kMapPagesMin = size_t{4} << 20;  // smaller buffers: the heap (a 2 MB page would be mostly slack)

// v = n copies of value, its storage advised for huge pages before the copies are written (a page_vector's large
// storage comes fresh from map_pages: all of it on huge pages where THP allows).
template <class T, class A>
void assign_huge(std::vector<T, A>& v, size_t n, const T& value) {
  std::vector<T, A>().swap(v);
  v.reserve(n);
  advise_huge_pages(v.data(), n * sizeof(T));
  v.assign(n, value);
}

// The weight arena. A buffer gets 2 MB pages only over whole 2 MB pages of its own range, and a layer's matrices are
// mostly smaller than that can use (a 270M's: 0.65-5.2 MB), so on their own about a fifth of a bf16 270M's weights
// and every int8 layer stayed on 4 KB pages. weight_alloc packs buffers under kWeightOwnMin bytes one after another
// into shared chunks of 2 MB pages (kWeightChunk bytes each, advised before anything is written); a chunk is freed
// when the last buffer in it is, so a freed model gives its memory back but for what another buffer still holds.
// Measured 2026-11-27 on an Intel Xeon (2 threads, real 270M decode at context 128): bf16 50.5-51.0 -> 53.1-53.9
// tok/s, int8 82.5-82.7 -> 91.5-91.6. GEMMALENS_HUGE_PAGES=0: plain buffers. 64-byte aligned; a ResourceError when
// the memory is not there. Thread-safe.
constexpr size_t kWeightChunk = size_t{32} << 20;
constexpr size_t kWeightOwnMin = size_t{16} << 20;  // larger buffers: map_pages of their own
void* weight_alloc(size_t n);
void weight_free(void* p) noexcept;
size_t weight_arena_chunks();  // chunks held now (tests)

// std::vector storage from an allocate / free pair of byte counts (Pages: static allocate(bytes), free(p, bytes)).
template <class T, class Pages>
struct BytesAllocator {
  using value_type = T;
  BytesAllocator() = default;
  template <class U>
  BytesAllocator(const BytesAllocator<U, Pages>&) {}
  T* allocate(size_t n) {
    if (n > SIZE_MAX / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(Pages::allocate(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { Pages::free(p, n * sizeof(T)); }
  template <class U>
  bool operator==(const BytesAllocator<U, Pages>&) const { return true; }
  template <class U>
  bool operator!=(const BytesAllocator<U, Pages>&) const { return false; }
};

struct WeightPages {  // the weight arena
  static void* allocate(size_t n) { return weight_alloc(n); }
  static void free(void* p, size_t) noexcept { weight_free(p); }
};
template <class T>
using weight_vector = std::vector<T, BytesAllocator<T, WeightPages>>;

struct MappedPages {  // map_pages from kMapPagesMin bytes on, the heap below (the KV cache, the bandwidth probe)
  static void* allocate(size_t n) { return n >= kMapPagesMin ? map_pages(n, "a buffer") : ::operator new(n, std::align_val_t{64}); }
  static void free(void* p, size_t n) noexcept {
    if (n >= kMapPagesMin)
      unmap_pages(p, n);
    else
      ::operator delete(p, std::align_val_t{64});
  }
};
template <class T>
using page_vector = std::vector<T, BytesAllocator<T, MappedPages>>;

}  // namespace gemmalens::ops
