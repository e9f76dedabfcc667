#include "ops/kernels.h"
#include "ops/cpu.h"
#include "ops/pages.h"
#include "ops/vmath.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace gemmalens::ops {

namespace {

// Row-wise ops run their rows in parallel from this many elements: below it a parallel region (a wake-up of the other
// threads, which sleep soon on a busy machine: python/gemmalens/_threads.py) costs more than it saves. A decode step's
// rows (up to 8 x 640 for the 270M) stay on one thread; a prefill's go parallel.
constexpr int64_t kParallelMinElems = int64_t{1} << 15;

// sqrt(mean(x^2) + eps) in f32: the fused norm and the split one (rms_scale) share it, so their outputs agree bit for bit.
inline float rms_of(const float* xr, float eps, int D) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int d = 0; d < D; ++d) ss += xr[d] * xr[d];
  return std::sqrt(ss / static_cast<float>(D) + eps);
}

inline void rmsnorm_row(const float* xr, const float* w, float eps, int D, float* yr) {
  // HF Gemma3RMSNorm: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), then * (1.0 + w), all in f32.
  const float r = 1.f / rms_of(xr, eps, D);
#pragma omp simd
  for (int d = 0; d < D; ++d) yr[d] = (xr[d] * r) * (1.f + w[d]);
}
}  // namespace

void rmsnorm(const float* x, int64_t ldx, const float* w, float eps, int64_t M, int D, float* y, int64_t ldy) {
#pragma omp parallel for if (M * D >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m) rmsnorm_row(x + m * ldx, w, eps, D, y + m * ldy);
}

void rmsnorm_heads(const float* x, int64_t ldx, int nh, int Hd, const float* w, float eps, int64_t M, float* y) {
#pragma omp parallel for if (M * nh * Hd >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) rmsnorm_row(x + m * ldx + static_cast<int64_t>(h) * Hd, w, eps, Hd, y + (m * nh + h) * Hd);
}

void rms_scale(const float* x, int64_t ldx, int nh, int W, float eps, int64_t M, float* scale) {
#pragma omp parallel for if (M * nh * W >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) scale[m * nh + h] = rms_of(x + m * ldx + static_cast<int64_t>(h) * W, eps, W);
}

void rms_divide(const float* x, int64_t ldx, int nh, int W, const float* scale, int64_t M, float* y, int64_t ldy) {
#pragma omp parallel for if (M * nh * W >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) {
      const float* xr = x + m * ldx + static_cast<int64_t>(h) * W;
      float* yr = y + m * ldy + static_cast<int64_t>(h) * W;
      const float r = 1.f / scale[m * nh + h];  // as rmsnorm_row: x * (1 / rms)
#pragma omp simd
      for (int d = 0; d < W; ++d) yr[d] = xr[d] * r;
    }
}

void rms_gain(float* y, int64_t ldy, int nh, int W, const float* w, int64_t M) {
#pragma omp parallel for if (M * nh * W >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) {
      float* yr = y + m * ldy + static_cast<int64_t>(h) * W;
#pragma omp simd
      for (int d = 0; d < W; ++d) yr[d] *= 1.f + w[d];
    }
}

void add_inplace(float* x, const float* y, int64_t n) {
#pragma omp parallel for simd if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void round_bf16_inplace(float* x, int64_t n) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

bool huge_pages_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("GEMMALENS_HUGE_PAGES");
    const std::string v = e ? e : "";
    if (v != "" && v != "0" && v != "1")
      throw ValueError("GEMMALENS_HUGE_PAGES must be 0 (the OS's default pages) or 1 (huge pages for the weights and "
                       "the KV cache, the default), got '" + v + "'; unset it or set one of those");
    return v != "0";
  }();
  return on;
}

namespace {
struct WeightChunk {
  char* base = nullptr;
  size_t used = 0;   // bytes handed out from base (bump allocation)
  int64_t live = 0;  // buffers in it not yet freed
};
struct WeightArena {
  std::mutex mu;
  std::map<uintptr_t, WeightChunk> chunks;  // by base address
  std::map<uintptr_t, size_t> own;          // buffers of their own (kWeightOwnMin bytes and more): their sizes
  WeightChunk* current = nullptr;           // the chunk new buffers go to
};
// Never destroyed: a weight freed during the process's exit still finds it.
WeightArena& arena() {
  static WeightArena* a = new WeightArena;
  return *a;
}

void* aligned_or_throw(size_t align, size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, align, n) != 0)
    throw ResourceError("could not allocate " + std::to_string(n) + " bytes for a weight: out of memory");
  return p;
}
constexpr size_t kHugePage = size_t{1} << 21;
size_t whole_pages(size_t n) { return n > SIZE_MAX - kHugePage ? 0 : (n + kHugePage - 1) & ~(kHugePage - 1); }
}  // namespace

void* map_pages(size_t n, const char* what) {
  const size_t len = whole_pages(std::max<size_t>(n, 1));
  auto fail = [&] { return ResourceError("could not allocate " + std::to_string(n) + " bytes for " + what + ": out of memory"); };
  if (len == 0 || len > SIZE_MAX - kHugePage) throw fail();
  // One page more than asked, then the slack before the first 2 MB boundary and after the last page given back.
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw fail();
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw), a = (r + kHugePage - 1) & ~(kHugePage - 1);
  if (a > r) munmap(raw, a - r);
  if (r + len + kHugePage > a + len) munmap(reinterpret_cast<void*>(a + len), r + len + kHugePage - (a + len));
#ifdef MADV_HUGEPAGE
  if (huge_pages_enabled()) madvise(reinterpret_cast<void*>(a), len, MADV_HUGEPAGE);  // best effort
#endif
  return reinterpret_cast<void*>(a);
}

void unmap_pages(void* p, size_t n) noexcept {
  if (p) munmap(p, whole_pages(std::max<size_t>(n, 1)));
}

void* weight_alloc(size_t n) {
  constexpr size_t kHuge = size_t{1} << 21;
  n = (std::max<size_t>(n, 64) + 63) & ~size_t{63};
  if (!huge_pages_enabled()) return aligned_or_throw(n >= (size_t{4} << 20) ? kHuge : 64, n);
  WeightArena& A = arena();
  if (n >= kWeightOwnMin) {  // a buffer of its own, fresh pages
    void* p = map_pages(n, "a weight");
    try {
      std::lock_guard<std::mutex> lock(A.mu);
      A.own[reinterpret_cast<uintptr_t>(p)] = n;
    } catch (...) {
      unmap_pages(p, n);
      throw;
    }
    return p;
  }
  std::lock_guard<std::mutex> lock(A.mu);
  if (!A.current || A.current->used + n > kWeightChunk) {
    char* base = static_cast<char*>(map_pages(kWeightChunk, "a weight"));  // advised before any byte is written
    A.current = &A.chunks[reinterpret_cast<uintptr_t>(base)];
    A.current->base = base;
  }
  void* p = A.current->base + A.current->used;
  A.current->used += n;
  ++A.current->live;
  return p;
}

void weight_free(void* p) noexcept {
  if (!p) return;
  {
    WeightArena& A = arena();
    std::lock_guard<std::mutex> lock(A.mu);
    auto it = A.chunks.upper_bound(reinterpret_cast<uintptr_t>(p));
    if (it != A.chunks.begin()) {
      --it;
      WeightChunk& c = it->second;
      if (static_cast<char*>(p) < c.base + kWeightChunk) {
        if (--c.live == 0) {  // the chunk's last buffer: its memory goes back (the next buffer starts a new one)
          if (&c == A.current) A.current = nullptr;
          unmap_pages(c.base, kWeightChunk);
          A.chunks.erase(it);
        }
        return;
      }
    }
    auto own = A.own.find(reinterpret_cast<uintptr_t>(p));
    if (own != A.own.end()) {  // a buffer of its own
      unmap_pages(p, own->second);
      A.own.erase(own);
      return;
    }
  }
  std::free(p);  // GEMMALENS_HUGE_PAGES=0: a plain buffer
}

size_t weight_arena_chunks() {
  WeightArena& A = arena();
  std::lock_guard<std::mutex> lock(A.mu);
  return A.chunks.size();
}

double measure_read_bandwidth(int64_t nbytes, int reps) {
  const int64_t n = nbytes / 4;
  page_vector<float> buf;
  assign_huge(buf, static_cast<size_t>(n), 0.f);  // the pages the weights and the KV cache get
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(i & 1023);
  double best = 0;
  volatile float sink = 0;
  // Each repetition reads the buffer twice, plainly and asking for the lines 2 KB ahead (_MM_HINT_T0, as the decode
  // kernels do): the best of either is the rate the weights can stream at. On an Intel Xeon (2026-11-27, 2 threads, a
  // test program of the same loops) 27.6 and 31.6 GB/s: a core's stream is bound by the misses it has in flight.
  for (int r = 0; r < 2 * reps; ++r) {
    const bool ahead = r % 2 == 1;
    const double t0 = omp_get_wtime();
    float total = 0.f;
#pragma omp parallel reduction(+ : total)
    {
      // 64 independent partial sums: vectorised and not bound by the add latency.
      float acc[64] = {0};
      const int nt = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t chunk = (n / 64 + nt - 1) / nt * 64;
      const int64_t lo = std::min<int64_t>(n, id * chunk), hi = std::min<int64_t>(n, lo + chunk);
      for (int64_t i = lo; i + 64 <= hi; i += 64) {
        if (ahead)
          for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(buf.data() + i + 512 + 16 * l), _MM_HINT_T0);
        for (int k = 0; k < 64; ++k) acc[k] += buf[i + k];
      }
      for (int k = 0; k < 64; ++k) total += acc[k];
    }
    const double dt = omp_get_wtime() - t0;
    sink = sink + total;
    best = std::max(best, static_cast<double>(n) * 4 / dt);
  }
  (void)sink;
  return best;
}

void rope_tables(const int32_t* positions, int64_t M, int Hd, double base, double scaling, float* cos_out, float* sin_out) {
  const int half = Hd / 2;
  std::vector<float> inv(half);
  for (int j = 0; j < half; ++j) {
    // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in f32; linear scaling divides inv_freq.
    float e = static_cast<float>(2 * j) / static_cast<float>(Hd);
    float f = 1.f / std::pow(static_cast<float>(base), e);
    inv[j] = scaling != 1.0 ? f / static_cast<float>(scaling) : f;
  }
  for (int64_t m = 0; m < M; ++m) {
    const float p = static_cast<float>(positions[m]);
    for (int j = 0; j < half; ++j) {
      const float ang = p * inv[j];
      cos_out[m * half + j] = std::cos(ang);
      sin_out[m * half + j] = std::sin(ang);
    }
  }
}

void rope_apply(float* x, int64_t M, int nh, int Hd, const float* cos, const float* sin, bool inverse) {
  const int half = Hd / 2;
  const float sg = inverse ? -1.f : 1.f;  // the inverse rotation: sin(-angle)
#pragma omp parallel for if (M * nh * Hd >= kParallelMinElems)
  for (int64_t m = 0; m < M; ++m) {
    const float* c = cos + m * half;
    const float* s = sin + m * half;
    for (int h = 0; h < nh; ++h) {
      float* v = x + (m * nh + h) * Hd;
#pragma omp simd
      for (int j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half], sj = sg * s[j];
        v[j] = a * c[j] - b * sj;
        v[j + half] = b * c[j] + a * sj;
      }
    }
  }
}

namespace {
// One row of gelu_tanh(g) * u in 16 lanes: 0.5 (1 + tanh(z)) = 1 / (1 + exp(-2z)), z = k0 (x + k1 x^3).
__attribute__((target("avx512f,avx512dq,fma"))) void gelu_row_avx512(const float* g, const float* u, int F, float* o) {
  const __m512 k0 = _mm512_set1_ps(-2.f * 0.7978845608028654f), k1 = _mm512_set1_ps(0.044715f), one = _mm512_set1_ps(1.f);
  for (int f = 0; f < F; f += 16) {
    const __mmask16 k = F - f >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (F - f)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(k, g + f);
    const __m512 z = _mm512_mul_ps(k0, _mm512_fmadd_ps(_mm512_mul_ps(k1, x), _mm512_mul_ps(x, x), x));  // -2 z
    const __m512 gl = _mm512_div_ps(x, _mm512_add_ps(one, exp512(z)));
    _mm512_mask_storeu_ps(o + f, k, _mm512_mul_ps(gl, _mm512_maskz_loadu_ps(k, u + f)));
  }
}
}  // namespace

void gelu_tanh_mul(const float* gate, const float* up, int64_t ld, int64_t M, int F, float* out) {
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  const float k1 = 0.044715f;
  if (use_avx512()) {
#pragma omp parallel for if (M * F > 16384)
    for (int64_t m = 0; m < M; ++m) gelu_row_avx512(gate + m * ld, up + m * ld, F, out + m * static_cast<int64_t>(F));
    return;
  }
#pragma omp parallel for if (M * F > 16384)
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gate + m * ld;
    const float* u = up + m * ld;
    float* o = out + m * static_cast<int64_t>(F);
#pragma omp simd
    for (int f = 0; f < F; ++f) {
      const float x = g[f];
      o[f] = 0.5f * x * (1.f + tanh_f32(k0 * (x + k1 * x * x * x))) * u[f];
    }
  }
}

void softcap_inplace(float* x, int64_t n, float cap) {
#pragma omp parallel for simd if (n > 65536)
  for (int64_t i = 0; i < n; ++i) x[i] = cap * tanh_f32(x[i] / cap);
}


}  // namespace gemmalens::ops
