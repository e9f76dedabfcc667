// Decode attention: a few query positions (T <= 4) over many keys, the one attention a long-context decode step
// runs. The function of attention_reference; only the summation order differs (and, for a bf16 model where the
// vdpbf16ps kernels run, the rounding of q and the probabilities to bf16: see them).
//
// Flash-decoding: the keys each (row, KV head) sees, [first, S), are split in chunks that run in parallel; each
// chunk walks its keys in blocks of NB with the online-softmax recurrence and leaves partials (max, sum,
// unnormalised z), merged at the end with the usual rescaling. What makes it fast at long context:
// - every query row of a KV head's group (group x T rows: 4 on 270m / 1b) meets each key and value row in the same
//   pass, so the cache is read from memory once per step, not once per query head;
// - the chunks cover only the keys some query sees: a sliding layer reads its window, not the whole past, and its
//   window is split across the threads like a global layer's keys;
// - the kernels read the cache in an order the memory system streams (prefetching PD keys ahead, P V in sub-blocks).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu.h"
#include "ops/row_groups.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {

constexpr int NB = 64;  // keys per block: the block's value rows (64 x Hd bf16, 32 KB at Hd 256) stay in L1/L2
static_assert(NB == 64, "the online softmax runs softmax_row64");
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#define GL_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// Widening bf16 cache rows 32 values at a time as 32-bit words: a word holds element 2m in its low half and 2m + 1
// in its high half, so a shift left by 16 gives the even elements as f32 and a mask of the high half the odd ones.
// Two plain integer operations for 32 values, which run beside the FMAs (interleaving with zeros, vpunpck[lh]wd,
// takes a shuffle unit that Zen 4 / 5 share with an FMA pipe). The kernels work in that order throughout
// ("permuted": the low vector holds the even elements of a group of 32, the high one the odd): q is permuted once per
// chunk, z accumulated permuted and put back once per chunk; a dot product does not care. f32 rows (a step's own
// keys) are permuted to match with vpermt2ps. With an f32 cache (or none) nothing is permuted.
// The vdpbf16ps kernels (bf16 models on AVX512_BF16) keep z in another order, the one interleaving two value rows
// word by word leaves (vpunpck[lh]wd): the low vector holds elements 8L + j of a group of 32, the high one
// 8L + 4 + j (L the 128-bit lane, j < 4).
struct Perm32 {
  int lo[16], hi[16];  // element of the group of 32 at each position of the low / high vector
  explicit Perm32(bool interleaved) {
    for (int m = 0; m < 16; ++m) {
      lo[m] = interleaved ? 8 * (m / 4) + m % 4 : 2 * m;
      hi[m] = interleaved ? lo[m] + 4 : 2 * m + 1;
    }
  }
};
const Perm32 kPerm(false), kPermDp(true);

// Elements d .. d + 31 of a key / value row as two f32 vectors, permuted or not (see above).
GL_AVX512 inline void load32(const KVRow& r, int d, bool perm, __m512i ilo, __m512i ihi, __m512& lo, __m512& hi) {
  if (r.q) {  // the int8 cache (never permuted): one block of 32, sign-extended, converted, times its scale
    const __m512 sc = _mm512_set1_ps(r.s[d / kKVBlock]);
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + d)))), sc);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + d + 16)))), sc);
    return;
  }
  if (r.h) {  // the bf16 cache: only in permuted mode
    const __m512i raw = _mm512_loadu_si512(r.h + d);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
  const __m512 a = _mm512_loadu_ps(r.f + d), b = _mm512_loadu_ps(r.f + d + 16);
  lo = perm ? _mm512_permutex2var_ps(a, ilo, b) : a;
  hi = perm ? _mm512_permutex2var_ps(a, ihi, b) : b;
}

// Keys per sub-block of P V, and how far ahead (in keys) both products prefetch. Each pass over a key's row
// prefetches the same part of the row PD keys ahead, in step with its own loads: a decode step's attention streams
// the cache from DRAM, and its natural order (4 key rows read side by side 64 bytes at a time for Q K^T; 4 sweeps
// of 128 bytes per row over a block for P V) is one the hardware prefetchers follow badly. Measured 2026-11-27 on a
// Zen 5 with a test program that only reads 512-byte rows in those orders: 12 GB/s (4 rows side by side) and 16-21 GB/s
// (64 rows in 4 sweeps), against 40 GB/s for a sequential read; 43 and 37-40 GB/s with this prefetch (P V in
// sub-blocks of 8-16 rows). Software prefetch of a whole block ahead, 8 lines per row at once, did not help.
constexpr int SB = 16, PD = 16;

// Brings elements [d, d + n) of a row (f32, bf16 or int8 with its scale; none when the row is absent) towards L1
// (or to L2: H). Always inlined: out of line, GCC 12 finds a function of nothing but prefetches free of side effects
// and deletes every call to it (with the int8 branch it stopped inlining this, and the decode kernels lost their
// prefetches: a 256 MB bf16 cache read at 13 instead of 34-40 GB/s, `attention_seconds` on the Zen 4).
template <_mm_hint H = _MM_HINT_T0>
__attribute__((always_inline)) inline void prefetch_part(const KVRow& r, int d, int n) {
  if (r.q) {  // the int8 cache: the part's values and its scale (at the row's end)
    for (int o = 0; o < n; o += 64) _mm_prefetch(reinterpret_cast<const char*>(r.q + d + o), H);
    _mm_prefetch(reinterpret_cast<const char*>(r.s + d / kKVBlock), H);
    return;
  }
  const char* p = r.h ? reinterpret_cast<const char*>(r.h + d) : reinterpret_cast<const char*>(r.f ? r.f + d : nullptr);
  if (!p) return;
  const int bytes = n * (r.h ? 2 : 4);
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(p + o, H);
}
// Besides, each part of a row is asked into L2 kFarKeys ahead (48 KB of keys at Hd 256), in step with the same
// loads: the lines asked into L1 are few at a time per core (its fill buffers), the requests into L2 keep more of the
// stream in flight. The rows that far ahead are resolved like the rest (block_rows: the ring's order, nothing past
// the chunk), so no line outside the keys read is asked for. Measured 2026-11-28 on an Intel Xeon with AMX (2
// threads; `_core._testing.attention_seconds(1, 262144, 4, 1, 256, 0, "bfloat16", 10)`, a 256 MB cache, best of 2,
// alternated with the build before): the vdpbf16ps kernels 20.2 -> 22.7 (64 keys ahead), 23.3-23.7 (80), 23.9-24.4
// (96), 23.5-24.6 GB/s (128); the int8 270M's decode at context 32768 over context 128, 0.67 / 0.68 -> 0.70 / 0.71.
// (Software prefetch of a whole block ahead at once, 8 lines per row into L1, did not help: see above.)
constexpr int kFarKeys = 96;
static_assert(kFarKeys > PD && kFarKeys <= 2 * NB, "the rows kFarKeys ahead lie in the next two blocks (block_rows)");
__attribute__((always_inline)) inline void prefetch_far(const KVRow& r, int d, int n) { prefetch_part<_MM_HINT_T1>(r, d, n); }

// out lane L = the sum of v[L]'s 16 lanes, for 16 vectors at once: a tree of shuffles and adds (45 instructions)
// where 16 horizontal reductions take ~130. Each level adds the two halves of a pair of vectors into one: 256-bit
// halves, then 128-bit quarters (shuffle_f32x4), then pairs and single lanes within 128 bits (shuffle_ps). Traced
// through, the tree leaves the sum of its input a[m] in lane L for m = kTree[L]; feeding a[kTree[L]] = v[L] puts
// v[L]'s sum in lane L.
GL_AVX512 inline __m512 reduce16(const __m512* v) {
  constexpr int kTree[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
  __m512 a[16], x[8], y[4], z[2];
  for (int L = 0; L < 16; ++L) a[kTree[L]] = v[L];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x88), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[i], y[i + 2], 0x44), _mm512_shuffle_ps(y[i], y[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

// S[i * NB + j] = the sum of acc[i][j]'s lanes. 4 x 4 (the common case): one reduce16 tree for all 16 sums, a row of
// 4 per 128 bits.
template <int NR, int NC>
GL_AVX512 inline void store_scores(const __m512 (&acc)[NR][NC], float* S) {
  if constexpr (NR == 4 && NC == 4) {
    const __m512 s = reduce16(&acc[0][0]);
    _mm_storeu_ps(S, _mm512_extractf32x4_ps(s, 0));
    _mm_storeu_ps(S + NB, _mm512_extractf32x4_ps(s, 1));
    _mm_storeu_ps(S + 2 * NB, _mm512_extractf32x4_ps(s, 2));
    _mm_storeu_ps(S + 3 * NB, _mm512_extractf32x4_ps(s, 3));
  } else {
    for (int i = 0; i < NR; ++i)
      for (int j = 0; j < NC; ++j) S[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// S[i][j] = q_i . k_j for NR query rows and NC keys: NR x NC independent accumulators over the head dimension
// (Hd % 32 == 0), each key row loaded and widened once for all NR rows.
// pf: the NC rows PD keys ahead (or null), prefetched a part per step in step with the loads; pf + kFarKeys - PD: the
// rows kFarKeys ahead, asked into L2 (prefetch_far).
template <int NR, int NC>
GL_AVX512 void scores_block(const float* const* q, const KVRow* k, const KVRow* pf, int Hd, bool perm, float* S) {
  const __m512i ilo = _mm512_loadu_si512(kPerm.lo), ihi = _mm512_loadu_si512(kPerm.hi);
  __m512 acc[NR][NC];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < Hd; d += 32) {
    if (pf)
      for (int j = 0; j < NC; ++j) prefetch_part(pf[j], d, 32), prefetch_far(pf[j + kFarKeys - PD], d, 32);
    __m512 klo[NC], khi[NC];
    for (int j = 0; j < NC; ++j) load32(k[j], d, perm, ilo, ihi, klo[j], khi[j]);
    for (int i = 0; i < NR; ++i) {
      const __m512 qlo = _mm512_loadu_ps(q[i] + d), qhi = _mm512_loadu_ps(q[i] + d + 16);
      for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(qhi, khi[j], _mm512_fmadd_ps(qlo, klo[j], acc[i][j]));
    }
  }
  store_scores<NR, NC>(acc, S);
}

// pf: prefetch PD keys ahead (the first pass over the rows only).
template <int NR>
GL_AVX512 void scores_rows(const float* const* q, const KVRow* k, bool pf, int nk, int Hd, bool perm, float* S) {
  int c = 0;
  for (; c + 4 <= nk; c += 4) scores_block<NR, 4>(q, k + c, pf ? k + c + PD : nullptr, Hd, perm, S + c);
  for (; c < nk; ++c) scores_block<NR, 1>(q, k + c, pf ? k + c + PD : nullptr, Hd, perm, S + c);
}

// S[r][c] = q_r . k_c for `rows` rows (4 at a time) and nk keys; k: this block's NB rows and the next two blocks'
// (empty past the chunk).
GL_AVX512 void scores_avx512(const float* const* q, int rows, const KVRow* k, int nk, int Hd, bool perm, float* S) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    scores_rows<decltype(nr)::value>(q + r0, k, r0 == 0, nk, Hd, perm, S + r0 * NB);
  });
}

// Z[i][:] = Z[i][:] * corr[i] + sum_j P[i][j] v_j for NR rows and nk keys (Hd % 64 == 0): sub-blocks of SB keys,
// each in slices of 64 dims, NR x 4 accumulators, each value row's slice loaded and widened once for all NR rows;
// v: this block's NB rows and the next two blocks', prefetched PD keys ahead (and into L2 kFarKeys ahead) when pf.
template <int NR>
GL_AVX512 void pv_rows(const float* P, const float* corr, const KVRow* v, bool pf, int nk, int Hd, bool perm, float* Z) {
  const __m512i ilo = _mm512_loadu_si512(kPerm.lo), ihi = _mm512_loadu_si512(kPerm.hi);
  for (int j0 = 0; j0 < nk; j0 += SB) {
    const int j1 = std::min(nk, j0 + SB);
    for (int c0 = 0; c0 < Hd; c0 += 64) {
      __m512 acc[NR][4];
      for (int i = 0; i < NR; ++i) {
        const __m512 cr = _mm512_set1_ps(j0 == 0 ? corr[i] : 1.f);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_mul_ps(cr, _mm512_loadu_ps(Z + i * Hd + c0 + 16 * c));
      }
      for (int j = j0; j < j1; ++j) {
        if (pf) prefetch_part(v[j + PD], c0, 64), prefetch_far(v[j + kFarKeys], c0, 64);
        __m512 vv[4];
        load32(v[j], c0, perm, ilo, ihi, vv[0], vv[1]);
        load32(v[j], c0 + 32, perm, ilo, ihi, vv[2], vv[3]);
        for (int i = 0; i < NR; ++i) {
          const __m512 p = _mm512_set1_ps(P[i * NB + j]);
          for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
        }
      }
      for (int i = 0; i < NR; ++i)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(Z + i * Hd + c0 + 16 * c, acc[i][c]);
    }
  }
}

GL_AVX512 void pv_avx512(const float* P, const float* corr, int rows, const KVRow* v, int nk, int Hd, bool perm, float* Z) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    pv_rows<decltype(nr)::value>(P + r0 * NB, corr + r0, v, r0 == 0, nk, Hd, perm, Z + r0 * Hd);
  });
}

// --- bf16 models on AVX512_BF16 (and AMX) but for Intel's (cpu.h, attention_decode_vdpbf16ps): vdpbf16ps ---
// A bf16 model's attention may round q and the probabilities to bf16 (AttentionArgs::compute; as the AMX prefill
// path does, and as HF's bf16 attention does: q, k, v in bf16, the softmax's output cast to bf16 before P V). Then
// both products run as vdpbf16ps, which multiplies bf16 pairs exactly and sums them in f32: half the instructions of
// widening the cache's rows for f32 FMAs, and no widening at all. Q K^T: q rows in bf16 against the key rows as
// stored, pairs along the head dimension. P V: pairs along the keys: two value rows interleaved word by word
// (vpunpck[lh]wd) against a broadcast pair of probabilities (p_j, p_j+1), so z comes out in kPermDp's order.
#define GL_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma")))

// pf: the NC rows PD keys ahead (or null), a line of each prefetched per step of 32 dims, in step with the loads;
// pf + kFarKeys - PD: the rows kFarKeys ahead, asked into L2.
template <int NR, int NC>
GL_BF16 void scores_block_dp(const uint16_t* const* q, const KVRow* k, const KVRow* pf, int Hd, float* S) {
  __m512 acc[NR][NC];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < Hd; d += 32) {
    if (pf)
      for (int j = 0; j < NC; ++j) prefetch_part(pf[j], d, 32), prefetch_far(pf[j + kFarKeys - PD], d, 32);
    __m512i kv[NC];
    for (int j = 0; j < NC; ++j) kv[j] = _mm512_loadu_si512(k[j].h + d);
    for (int i = 0; i < NR; ++i) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q[i] + d);
      for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], qv, (__m512bh)kv[j]);
    }
  }
  store_scores<NR, NC>(acc, S);
}

template <int NR>
GL_BF16 void scores_rows_dp(const uint16_t* const* q, const KVRow* k, bool pf, int nk, int Hd, float* S) {
  int c = 0;
  for (; c + 4 <= nk; c += 4) scores_block_dp<NR, 4>(q, k + c, pf ? k + c + PD : nullptr, Hd, S + c);
  for (; c < nk; ++c) scores_block_dp<NR, 1>(q, k + c, pf ? k + c + PD : nullptr, Hd, S + c);
}

// q: the rows in bf16; k: every row bf16 (the step's own rows converted, see block_rows), this block's NB and the
// next two blocks' (empty past the chunk): the first pass over them prefetches PD and kFarKeys ahead.
GL_BF16 void scores_dp(const uint16_t* const* q, int rows, const KVRow* k, int nk, int Hd, float* S) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    scores_rows_dp<decltype(nr)::value>(q + r0, k, r0 == 0, nk, Hd, S + r0 * NB);
  });
}

// Z[i][:] = Z[i][:] * corr[i] + sum_j P[i][j] v_j, P as bf16 pairs (Pp[i * NB / 2 + j / 2] = p_j | p_j+1 << 16, the
// pair past an odd nk's last key 0), v_j for j < nk rounded up to even with `zero` (a row of Hd zeros). As pv_rows:
// sub-blocks of SB keys in slices of 64 dims, v this block's rows and the next two blocks', prefetched PD keys ahead
// (and into L2 kFarKeys ahead).
template <int NR>
GL_BF16 void pv_rows_dp(const uint32_t* Pp, const float* corr, const KVRow* v, bool pf, int nk, int Hd,
                        const uint16_t* zero, float* Z) {
  for (int j0 = 0; j0 < nk; j0 += SB) {
    const int j1 = std::min(nk, j0 + SB);
    for (int c0 = 0; c0 < Hd; c0 += 64) {
      __m512 acc[NR][4];
      for (int i = 0; i < NR; ++i) {
        const __m512 cr = _mm512_set1_ps(j0 == 0 ? corr[i] : 1.f);
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_mul_ps(cr, _mm512_loadu_ps(Z + i * Hd + c0 + 16 * c));
      }
      for (int j = j0; j < j1; j += 2) {
        if (pf) {
          prefetch_part(v[j + PD], c0, 64), prefetch_part(v[j + PD + 1], c0, 64);
          prefetch_far(v[j + kFarKeys], c0, 64), prefetch_far(v[j + kFarKeys + 1], c0, 64);
        }
        const uint16_t* r0 = v[j].h + c0;
        const uint16_t* r1 = j + 1 < nk ? v[j + 1].h + c0 : zero;
        const __m512i a0 = _mm512_loadu_si512(r0), b0 = _mm512_loadu_si512(r1);
        const __m512i a1 = _mm512_loadu_si512(r0 + 32), b1 = _mm512_loadu_si512(r1 + 32);
        const __m512bh vv[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0), (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                                (__m512bh)_mm512_unpacklo_epi16(a1, b1), (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
        for (int i = 0; i < NR; ++i) {
          const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(Pp[i * (NB / 2) + j / 2]));
          for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], vv[c], p);
        }
      }
      for (int i = 0; i < NR; ++i)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(Z + i * Hd + c0 + 16 * c, acc[i][c]);
    }
  }
}

// v: this block's NB rows and the next two blocks' (empty past the chunk).
GL_BF16 void pv_dp(const uint32_t* Pp, const float* corr, int rows, const KVRow* v, int nk, int Hd,
                   const uint16_t* zero, float* Z) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    pv_rows_dp<decltype(nr)::value>(Pp + r0 * (NB / 2), corr + r0, v, r0 == 0, nk, Hd, zero, Z + r0 * Hd);
  });
}

// n f32 values to bf16 (round to nearest even), n % 32 == 0: y in natural order.
GL_BF16 void to_bf16(const float* x, int n, uint16_t* y) {
  for (int i = 0; i < n; i += 32)
    _mm512_storeu_si512(y + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
}

// Rows of Hd (a multiple of 32) between the natural and a permuted order.
void permute_row(const float* x, int Hd, float* y) {
  for (int g = 0; g < Hd; g += 32)
    for (int m = 0; m < 16; ++m) y[g + m] = x[g + kPerm.lo[m]], y[g + 16 + m] = x[g + kPerm.hi[m]];
}
void unpermute_row(float* y, int Hd, const Perm32& pm) {
  float t[32];
  for (int g = 0; g < Hd; g += 32) {
    for (int m = 0; m < 16; ++m) t[pm.lo[m]] = y[g + m], t[pm.hi[m]] = y[g + 16 + m];
    std::copy(t, t + 32, y + g);
  }
}

// The same two steps for any head_dim and CPU class (the loops vectorise at the build's baseline, AVX2): keys
// outer, rows inner, so a key / value row is read from memory once and from L1 for the other rows.
void scores_portable(const float* const* q, int rows, const KVRow* k, int nk, int Hd, float* S) {
  for (int c = 0; c < nk; ++c)
    for (int r = 0; r < rows; ++r) S[r * NB + c] = kv_dot(q[r], k[c], Hd);
}
void pv_portable(const float* P, const float* corr, int rows, const KVRow* v, int nk, int Hd, float* Z) {
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < Hd; ++d) Z[r * Hd + d] *= corr[r];
  for (int j = 0; j < nk; ++j)
    for (int r = 0; r < rows; ++r) {
      const float p = P[r * NB + j];
      if (p != 0.f) kv_axpy(p, v[j], Z + r * Hd, Hd);
    }
}

// The same two on AVX2 (the build's baseline) for Hd % 32 == 0: what runs where no AVX-512 kernel does (the avx2
// classes, and head dims the AVX-512 ones do not take). As the AVX-512 kernels, each key / value row is loaded and
// widened once for every query row of the group (NR x NC accumulators in registers), a bf16 row by the same two
// integer operations (see Perm32: q and z in kPerm's order), and the rows are prefetched PD keys ahead into L1 and
// kFarKeys ahead into L2. The kernels before widened each key row once per query row (vpmovzxwd, a shuffle) and had
// no prefetch: on an Intel Xeon (2026-11-28, forced to avx2, 2 threads), a 256 MB bf16 cache was read at 10 GB/s and
// the int8 270M decoded at context 32768 at 0.50 of its speed at 128.
// Values d .. d + 15 of a row (half h of the group of 32 from g = d - 16 h) as two f32 vectors x0, x1, which pair
// with q and z at g + o0 and g + o1 (half_offsets): in kPerm's order the even and the odd values of the half (a bf16
// row always, an f32 row permuted by shuffles), else (an f32 cache, perm false) the half's two 8s as stored.
inline void load16_avx2(const KVRow& r, int d, bool perm, __m256& x0, __m256& x1) {
  if (r.q) {  // the int8 cache (never permuted): half a block, times its scale
    const __m256 sc = _mm256_set1_ps(r.s[d / kKVBlock]);
    x0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.q + d)))), sc);
    x1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r.q + d + 8)))), sc);
    return;
  }
  if (r.h) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.h + d));
    x0 = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    x1 = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    return;
  }
  const __m256 a = _mm256_loadu_ps(r.f + d), b = _mm256_loadu_ps(r.f + d + 8);
  if (!perm) {
    x0 = a, x1 = b;
    return;
  }
  // shuffle_ps takes lanes 0, 2 (0x88) or 1, 3 (0xDD) of each 128 bits of a and b: a0 a2 b0 b2 | a4 a6 b4 b6; the
  // 64-bit permute (0xD8: 0, 2, 1, 3) puts a's pairs before b's.
  x0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  x1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}
inline void half_offsets(int h, bool perm, int& o0, int& o1) {
  o0 = perm ? 8 * h : 16 * h;
  o1 = perm ? 16 + 8 * h : 16 * h + 8;
}

// S[i][j] = q_i . k_j for NR query rows and NC keys; pf: the NC rows PD keys ahead (or null), pf + kFarKeys - PD the
// rows kFarKeys ahead.
template <int NR, int NC>
void scores_block_avx2(const float* const* q, const KVRow* k, const KVRow* pf, int Hd, bool perm, float* S) {
  __m256 acc[NR][NC];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int g = 0; g < Hd; g += 32) {
    if (pf)
      for (int j = 0; j < NC; ++j) prefetch_part(pf[j], g, 32), prefetch_far(pf[j + kFarKeys - PD], g, 32);
    for (int h = 0; h < 2; ++h) {
      int o0, o1;
      half_offsets(h, perm, o0, o1);
      __m256 x0[NC], x1[NC];
      for (int j = 0; j < NC; ++j) load16_avx2(k[j], g + 16 * h, perm, x0[j], x1[j]);
      for (int i = 0; i < NR; ++i) {
        const __m256 q0 = _mm256_loadu_ps(q[i] + g + o0), q1 = _mm256_loadu_ps(q[i] + g + o1);
        for (int j = 0; j < NC; ++j) acc[i][j] = _mm256_fmadd_ps(q1, x1[j], _mm256_fmadd_ps(q0, x0[j], acc[i][j]));
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) S[i * NB + j] = hsum8(acc[i][j]);
}
template <int NR>
void scores_rows_avx2(const float* const* q, const KVRow* k, bool pf, int nk, int Hd, bool perm, float* S) {
  int c = 0;
  for (; c + 2 <= nk; c += 2) scores_block_avx2<NR, 2>(q, k + c, pf ? k + c + PD : nullptr, Hd, perm, S + c);
  for (; c < nk; ++c) scores_block_avx2<NR, 1>(q, k + c, pf ? k + c + PD : nullptr, Hd, perm, S + c);
}
// k: this block's NB rows and the next two blocks' (empty past the chunk).
void scores_avx2(const float* const* q, int rows, const KVRow* k, int nk, int Hd, bool perm, float* S) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    scores_rows_avx2<decltype(nr)::value>(q + r0, k, r0 == 0, nk, Hd, perm, S + r0 * NB);
  });
}

// Z[i][:] = Z[i][:] * corr[i] + sum_j P[i][j] v_j for NR rows: sub-blocks of SB keys, each in halves of 32-value
// groups (NR x 2 accumulators); z's order per element is pv_rows' (corr first, then the keys in order).
template <int NR>
void pv_rows_avx2(const float* P, const float* corr, const KVRow* v, bool pf, int nk, int Hd, bool perm, float* Z) {
  for (int j0 = 0; j0 < nk; j0 += SB) {
    const int j1 = std::min(nk, j0 + SB);
    for (int g = 0; g < Hd; g += 32)
      for (int h = 0; h < 2; ++h) {
        int o0, o1;
        half_offsets(h, perm, o0, o1);
        __m256 acc[NR][2];
        for (int i = 0; i < NR; ++i) {
          const __m256 cr = _mm256_set1_ps(j0 == 0 ? corr[i] : 1.f);
          acc[i][0] = _mm256_mul_ps(cr, _mm256_loadu_ps(Z + i * Hd + g + o0));
          acc[i][1] = _mm256_mul_ps(cr, _mm256_loadu_ps(Z + i * Hd + g + o1));
        }
        for (int j = j0; j < j1; ++j) {
          if (pf && h == 0) prefetch_part(v[j + PD], g, 32), prefetch_far(v[j + kFarKeys], g, 32);
          __m256 x0, x1;
          load16_avx2(v[j], g + 16 * h, perm, x0, x1);
          for (int i = 0; i < NR; ++i) {
            const __m256 p = _mm256_set1_ps(P[i * NB + j]);
            acc[i][0] = _mm256_fmadd_ps(p, x0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(p, x1, acc[i][1]);
          }
        }
        for (int i = 0; i < NR; ++i) {
          _mm256_storeu_ps(Z + i * Hd + g + o0, acc[i][0]);
          _mm256_storeu_ps(Z + i * Hd + g + o1, acc[i][1]);
        }
      }
  }
}
// v: this block's NB rows and the next two blocks' (empty past the chunk).
void pv_avx2(const float* P, const float* corr, int rows, const KVRow* v, int nk, int Hd, bool perm, float* Z) {
  row_groups<4>(rows, [&](auto nr, int64_t r0) {
    pv_rows_avx2<decltype(nr)::value>(P + r0 * NB, corr + r0, v, r0 == 0, nk, Hd, perm, Z + r0 * Hd);
  });
}

// Key and value rows of slots [j0, j0 + n) for (b, kvh), k[c] / v[c] for slot j0 + c, empty past n up to NB. The
// ring rule (a division) is applied once per run of consecutive cache slots, the rows of a run a pointer step apart;
// slot by slot only for the step's own rows (j >= past) and slots the ring no longer holds.
// kn / vn (or null): the step's own rows in bf16, [B, T, KV, Hd], for the vdpbf16ps kernels.
void block_rows(const AttentionArgs& a, int b, int kvh, int64_t j0, int n, KVRow* k, KVRow* v, const uint16_t* kn,
                const uint16_t* vn) {
  int c = 0;
  while (c < n) {
    const int64_t j = j0 + c;
    k[c] = key_row(a, b, kvh, j);
    v[c] = value_row(a, b, kvh, j);
    if (j >= a.past && kn) {
      const size_t off = ((static_cast<size_t>(b) * a.T + (j - a.past)) * a.KV + kvh) * a.Hd;
      k[c] = KVRow{nullptr, kn + off};
      v[c] = KVRow{nullptr, vn + off};
    }
    if (j >= a.past || !k[c].held()) {
      ++c;
      continue;
    }
    const int64_t run = std::min<int64_t>({static_cast<int64_t>(n - c), a.cache.cap - j % a.cache.cap, a.past - j});
    const int Hd = a.Hd;
    const size_t st = static_cast<size_t>(a.cache.stride());  // a slot's row: Hd values, or an int8 row's bytes
    for (int r = 1; r < run; ++r) {
      KVRow& kr = k[c + r];
      KVRow& vr = v[c + r];
      kr.f = k[c].f ? k[c].f + r * st : nullptr;
      kr.h = k[c].h ? k[c].h + r * st : nullptr;
      vr.f = v[c].f ? v[c].f + r * st : nullptr;
      vr.h = v[c].h ? v[c].h + r * st : nullptr;
      kr.q = k[c].q ? k[c].q + r * st : nullptr;
      vr.q = v[c].q ? v[c].q + r * st : nullptr;
      kr.s = kr.q ? reinterpret_cast<const float*>(kr.q + Hd) : nullptr;
      vr.s = vr.q ? reinterpret_cast<const float*>(vr.q + Hd) : nullptr;
    }
    c += static_cast<int>(run);
  }
  for (; c < NB; ++c) k[c] = v[c] = KVRow{};
}

}  // namespace

AttentionDecodePath attention_decode_path(const AttentionArgs& a) {
  if (!use_avx512() || a.Hd % 64 != 0) return AttentionDecodePath::Portable;
  const bool dp = a.decode_kernel == DecodeKernelChoice::Vdpbf16ps ? cpu_class() >= CpuClass::Avx512Bf16
                                                                    : attention_decode_vdpbf16ps();
  if (a.compute == DType::BF16 && a.past > 0 && a.cache.dtype == DType::BF16 && !a.cache.int8 && dp)
    return AttentionDecodePath::Vdpbf16ps;
  return AttentionDecodePath::Avx512;
}

void attention_decode_splitk(const AttentionArgs& a) {
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd;
  const int group = H / KV;
  const int rows = group * T;  // query rows per (b, kvh): (position, head of the group)
  const int64_t S = a.past + T;
  const bool w512 = attention_decode_path(a) != AttentionDecodePath::Portable;
  // A bf16 model with a bf16 cache on a class with vdpbf16ps: the bf16 kernels (q and the probabilities in bf16).
  const bool dp = attention_decode_path(a) == AttentionDecodePath::Vdpbf16ps;
  // The AVX2 kernels where no AVX-512 one runs, for Hd % 32 == 0 (the portable loops for the rest). Both widen the
  // bf16 cache's rows in the permuted order (see Perm32).
  const bool avx2 = !w512 && Hd % 32 == 0;
  const bool perm = !dp && (w512 || avx2) && a.past > 0 && a.cache.dtype == DType::BF16 && !a.cache.int8;
  // The step's own rows in bf16 for the bf16 kernels (a bf16 model's are bf16 values already: exact).
  std::vector<uint16_t> kn_bf, vn_bf;
  if (dp) {
    kn_bf.resize(static_cast<size_t>(B) * T * KV * Hd);
    vn_bf.resize(kn_bf.size());
    to_bf16(a.k_new, static_cast<int>(kn_bf.size()), kn_bf.data());
    to_bf16(a.v_new, static_cast<int>(vn_bf.size()), vn_bf.data());
  }
  const uint16_t* kn = dp ? kn_bf.data() : nullptr;
  const uint16_t* vn = dp ? vn_bf.data() : nullptr;
  // The first slot any query of row b sees (S: none, a row of padding); the chunks cover [first, S) only.
  std::vector<int64_t> first(B, S);
  int64_t n_max = 0;
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const SlotRange vis = visible_range(a, b, a.past + t);
      if (vis.lo <= vis.hi) first[b] = std::min(first[b], vis.lo);
    }
    n_max = std::max(n_max, S - first[b]);
  }
  // About two chunks per thread for the longest row, whole blocks each.
  const int nthr = omp_get_max_threads();
  const int64_t per = (n_max + 2 * nthr - 1) / (2 * nthr);
  const int64_t chunk = std::max<int64_t>(NB, (per + NB - 1) / NB * NB);
  const int64_t nchunk = std::max<int64_t>(1, (n_max + chunk - 1) / chunk);
  const size_t nslot = static_cast<size_t>(B) * KV * nchunk * rows;
  std::vector<float> pm(nslot, kNegInf), pl(nslot, 0.f), pz(nslot * Hd, 0.f);
#pragma omp parallel
  {
    std::vector<float> Sc(static_cast<size_t>(rows) * NB), m(rows), l(rows), corr(rows);
    std::vector<float> qp(perm ? static_cast<size_t>(rows) * Hd : 0);  // q permuted
    std::vector<uint16_t> qb(dp ? static_cast<size_t>(rows) * Hd : 0), zero(dp ? Hd : 0, 0);  // q in bf16; a zero row
    std::vector<const uint16_t*> qbrow(rows);
    std::vector<uint32_t> Pp(dp ? static_cast<size_t>(rows) * NB / 2 : 0);  // probabilities as bf16 pairs
    std::vector<const float*> qrow(rows);
    std::vector<int64_t> lo(rows), hi(rows);
    KVRow kb[3 * NB], vb[3 * NB];  // this block's rows, then the next two blocks' (the prefetches' targets)
    KVRow *krow = kb, *vrow = vb, *knext = kb + NB, *vnext = vb + NB;
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int b = 0; b < B; ++b)
      for (int kvh = 0; kvh < KV; ++kvh)
        for (int64_t c = 0; c < nchunk; ++c) {
          const int64_t j0 = first[b] + c * chunk, j1 = std::min(S, j0 + chunk);
          if (j0 >= j1) continue;  // past this row's keys (its partials stay empty: max -inf)
          const size_t slot0 = ((static_cast<size_t>(b) * KV + kvh) * nchunk + c) * rows;
          float* Z = pz.data() + slot0 * Hd;  // this chunk's partial z, accumulated in place
          for (int r = 0; r < rows; ++r) {
            const int t = r / group, h = kvh * group + r % group;
            qrow[r] = a.q + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
            if (perm) {
              permute_row(qrow[r], Hd, qp.data() + static_cast<size_t>(r) * Hd);
              qrow[r] = qp.data() + static_cast<size_t>(r) * Hd;
            }
            if (dp) {
              to_bf16(qrow[r], Hd, qb.data() + static_cast<size_t>(r) * Hd);
              qbrow[r] = qb.data() + static_cast<size_t>(r) * Hd;
            }
            const SlotRange vis = visible_range(a, b, a.past + t);
            lo[r] = vis.lo;
            hi[r] = vis.hi;
            m[r] = kNegInf;
            l[r] = 0.f;
          }
          // Every slot here is visible to some query of the row, so the ring holds it (the window fits the ring).
          block_rows(a, b, kvh, j0, static_cast<int>(std::min<int64_t>(NB, j1 - j0)), krow, vrow, kn, vn);
          block_rows(a, b, kvh, j0 + NB, static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(NB, j1 - j0 - NB))), knext,
                     vnext, kn, vn);
          for (int64_t jb = j0; jb < j1; jb += NB) {
            const int nk = static_cast<int>(std::min<int64_t>(NB, j1 - jb));
            // The rows two blocks on beside this block's and the next: the kernels prefetch PD keys ahead (into the
            // next block) and kFarKeys ahead.
            const int nk_after = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(NB, j1 - jb - 2 * NB)));
            block_rows(a, b, kvh, jb + 2 * NB, nk_after, kb + 2 * NB, vb + 2 * NB, kn, vn);
            if (dp)
              scores_dp(qbrow.data(), rows, krow, nk, Hd, Sc.data());
            else if (w512)
              scores_avx512(qrow.data(), rows, krow, nk, Hd, perm, Sc.data());
            else if (avx2)
              scores_avx2(qrow.data(), rows, krow, nk, Hd, perm, Sc.data());
            else
              scores_portable(qrow.data(), rows, krow, nk, Hd, Sc.data());
            // Masked online softmax, row by row: logits scaled (soft-capped), probabilities 0 outside [lo, hi].
            for (int r = 0; r < rows; ++r) {
              float* s = Sc.data() + static_cast<size_t>(r) * NB;
              const int64_t a_lo = std::max(lo[r], jb), a_hi = std::min<int64_t>(hi[r], jb + nk - 1);
              if (a_lo > a_hi) {  // nothing of this block visible to this query
                corr[r] = 1.f;
                std::fill(s, s + NB, 0.f);
                continue;
              }
              const int c_lo = static_cast<int>(a_lo - jb), c_hi = static_cast<int>(a_hi - jb);
              float sum;  // slots of the block no query sees get 0, not in the sum (ops/vmath.h)
              const float mx = softmax_row64(s, c_lo, c_hi, a.scale, a.softcap, m[r], &sum);
              const float cr = m[r] == kNegInf ? 0.f : exp_f32(m[r] - mx);
              l[r] = l[r] * cr + sum;
              m[r] = mx;
              corr[r] = cr;
            }
            if (dp) {
              for (int r = 0; r < rows; ++r)
                to_bf16(Sc.data() + static_cast<size_t>(r) * NB, NB, reinterpret_cast<uint16_t*>(Pp.data() + static_cast<size_t>(r) * (NB / 2)));
              pv_dp(Pp.data(), corr.data(), rows, vrow, nk, Hd, zero.data(), Z);
            } else if (w512)
              pv_avx512(Sc.data(), corr.data(), rows, vrow, nk, Hd, perm, Z);
            else if (avx2)
              pv_avx2(Sc.data(), corr.data(), rows, vrow, nk, Hd, perm, Z);
            else
              pv_portable(Sc.data(), corr.data(), rows, vrow, nk, Hd, Z);
            std::copy(kb + NB, kb + 3 * NB, kb);
            std::copy(vb + NB, vb + 3 * NB, vb);
          }
          for (int r = 0; r < rows; ++r) {
            pm[slot0 + r] = m[r];
            pl[slot0 + r] = l[r];
            if (perm || dp) unpermute_row(Z + static_cast<size_t>(r) * Hd, Hd, dp ? kPermDp : kPerm);
          }
        }
  }
  // Merge the chunks: on this thread when that is a few microseconds of work (a batch-1 step: rows x nchunk axpys of
  // Hd), which waking the other threads for a second parallel region would cost again.
  const bool merge_parallel = static_cast<int64_t>(B) * KV * rows * nchunk * Hd >= (int64_t{1} << 18);
#pragma omp parallel for collapse(3) if (merge_parallel)
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KV; ++kvh)
      for (int r = 0; r < rows; ++r) {
        const int t = r / group, h = kvh * group + r % group;
        float* z = a.z + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
        std::fill(z, z + Hd, 0.f);
        const size_t base = (static_cast<size_t>(b) * KV + kvh) * nchunk * rows + r;
        float mx = kNegInf;
        for (int64_t c = 0; c < nchunk; ++c) mx = std::max(mx, pm[base + c * rows]);
        if (mx == kNegInf) continue;  // nothing visible (padding)
        float l = 0.f;
        for (int64_t c = 0; c < nchunk; ++c) {
          const size_t slot = base + c * rows;
          if (pm[slot] == kNegInf) continue;
          const float w = exp_f32(pm[slot] - mx);
          l += w * pl[slot];
          axpy_f32(w, pz.data() + slot * Hd, z, Hd);
        }
        const float inv = 1.f / l;
        for (int d = 0; d < Hd; ++d) z[d] *= inv;
      }
}

}  // namespace gemmalens::ops
