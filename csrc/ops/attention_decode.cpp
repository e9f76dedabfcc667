// Decode attention: a few query positions (T <= 4) over many keys, the one attention a long-context decode step
// runs. The function of attention_reference; only the summation order differs.
//
// Flash-decoding: the keys each (row, KV head) sees, [first, S), are split in chunks that run in parallel; each
// chunk walks its keys in blocks of NB with the online-softmax recurrence and leaves partials (max, sum,
// unnormalised z), merged at the end with the usual rescaling. What makes it fast at long context:
// - every query row of a KV head's group (group x T rows: 4 on 270m / 1b) meets each key and value row in the same
//   pass, so the cache is read from memory once per step, not once per query head;
// - the chunks cover only the keys some query sees: a sliding layer reads its window, not the whole past, and its
//   window is split across the threads like a global layer's keys.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/attention.h"
#include "ops/cpu.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {

constexpr int NB = 64;  // keys per block: the block's value rows (64 x Hd bf16, 32 KB at Hd 256) stay in L1/L2
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#define GL_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// Widening bf16 cache rows 32 values at a time by interleaving them with zeros (vpunpcklwd / vpunpckhwd: two
// instructions for 32 values, where a shift per 16 takes three) leaves them in a fixed order within each group of
// 32: the low vector holds elements 8L + j, the high one 8L + 4 + j (L the 128-bit lane, j < 4). The kernels work in
// that order throughout ("permuted"): q is permuted once per chunk, z accumulated permuted and put back once per
// chunk; a dot product does not care. f32 rows (a step's own keys) are permuted to match with vpermt2ps. With an f32
// cache (or none) nothing is permuted.
struct Perm32 {
  int lo[16], hi[16];  // element of the group of 32 at each position of the low / high vector
  Perm32() {
    for (int m = 0; m < 16; ++m) lo[m] = 8 * (m / 4) + m % 4, hi[m] = lo[m] + 4;
  }
};
const Perm32 kPerm;

// Elements d .. d + 31 of a key / value row as two f32 vectors, permuted or not (see above).
GL_AVX512 inline void load32(const KVRow& r, int d, bool perm, __m512i ilo, __m512i ihi, __m512& lo, __m512& hi) {
  if (r.h) {  // the bf16 cache: only in permuted mode
    const __m512i raw = _mm512_loadu_si512(r.h + d);
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw));
    return;
  }
  const __m512 a = _mm512_loadu_ps(r.f + d), b = _mm512_loadu_ps(r.f + d + 16);
  lo = perm ? _mm512_permutex2var_ps(a, ilo, b) : a;
  hi = perm ? _mm512_permutex2var_ps(a, ihi, b) : b;
}

// Brings a row (Hd elements, bf16 or f32; none when both pointers are null) towards L1.
inline void prefetch_row(const KVRow& r, int Hd) {
  const char* p = r.h ? reinterpret_cast<const char*>(r.h) : reinterpret_cast<const char*>(r.f);
  if (!p) return;
  const int bytes = Hd * (r.h ? 2 : 4);
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// S[i][j] = q_i . k_j for NR query rows and NC keys: NR x NC independent accumulators over the head dimension
// (Hd % 32 == 0), each key row loaded and widened once for all NR rows.
template <int NR, int NC>
GL_AVX512 void scores_block(const float* const* q, const KVRow* k, int Hd, bool perm, float* S) {
  const __m512i ilo = _mm512_loadu_si512(kPerm.lo), ihi = _mm512_loadu_si512(kPerm.hi);
  __m512 acc[NR][NC];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < Hd; d += 32) {
    __m512 klo[NC], khi[NC];
    for (int j = 0; j < NC; ++j) load32(k[j], d, perm, ilo, ihi, klo[j], khi[j]);
    for (int i = 0; i < NR; ++i) {
      const __m512 qlo = _mm512_loadu_ps(q[i] + d), qhi = _mm512_loadu_ps(q[i] + d + 16);
      for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(qhi, khi[j], _mm512_fmadd_ps(qlo, klo[j], acc[i][j]));
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NC; ++j) S[i * NB + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// pf: rows to prefetch, one per key (the first pass over the rows only).
template <int NR>
GL_AVX512 void scores_rows(const float* const* q, const KVRow* k, const KVRow* pf, int nk, int Hd, bool perm, float* S) {
  int c = 0;
  for (; c + 4 <= nk; c += 4) {
    if (pf)
      for (int j = 0; j < 4; ++j) prefetch_row(pf[c + j], Hd);
    scores_block<NR, 4>(q, k + c, Hd, perm, S + c);
  }
  for (; c < nk; ++c) {
    if (pf) prefetch_row(pf[c], Hd);
    scores_block<NR, 1>(q, k + c, Hd, perm, S + c);
  }
}

// S[r][c] = q_r . k_c for `rows` rows (4 at a time) and nk keys.
GL_AVX512 void scores_avx512(const float* const* q, int rows, const KVRow* k, const KVRow* pf, int nk, int Hd, bool perm,
                             float* S) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    float* Sr = S + r0 * NB;
    const KVRow* p = r0 == 0 ? pf : nullptr;
    switch (std::min(4, rows - r0)) {
      case 4: scores_rows<4>(q + r0, k, p, nk, Hd, perm, Sr); break;
      case 3: scores_rows<3>(q + r0, k, p, nk, Hd, perm, Sr); break;
      case 2: scores_rows<2>(q + r0, k, p, nk, Hd, perm, Sr); break;
      default: scores_rows<1>(q + r0, k, p, nk, Hd, perm, Sr); break;
    }
  }
}

// Z[i][:] = Z[i][:] * corr[i] + sum_j P[i][j] v_j for NR rows and nk keys (Hd % 64 == 0): slices of 64 dims, NR x 4
// accumulators, each value row's slice loaded and widened once for all NR rows.
template <int NR>
GL_AVX512 void pv_rows(const float* P, const float* corr, const KVRow* v, const KVRow* pf, int nk, int Hd, bool perm, float* Z) {
  const __m512i ilo = _mm512_loadu_si512(kPerm.lo), ihi = _mm512_loadu_si512(kPerm.hi);
  for (int c0 = 0; c0 < Hd; c0 += 64) {
    __m512 acc[NR][4];
    for (int i = 0; i < NR; ++i) {
      const __m512 cr = _mm512_set1_ps(corr[i]);
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_mul_ps(cr, _mm512_loadu_ps(Z + i * Hd + c0 + 16 * c));
    }
    for (int j = 0; j < nk; ++j) {
      if (pf && c0 == 0) prefetch_row(pf[j], Hd);
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

GL_AVX512 void pv_avx512(const float* P, const float* corr, int rows, const KVRow* v, const KVRow* pf, int nk, int Hd, bool perm,
                         float* Z) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const float* Pr = P + r0 * NB;
    float* Zr = Z + static_cast<size_t>(r0) * Hd;
    const KVRow* p = r0 == 0 ? pf : nullptr;
    switch (std::min(4, rows - r0)) {
      case 4: pv_rows<4>(Pr, corr + r0, v, p, nk, Hd, perm, Zr); break;
      case 3: pv_rows<3>(Pr, corr + r0, v, p, nk, Hd, perm, Zr); break;
      case 2: pv_rows<2>(Pr, corr + r0, v, p, nk, Hd, perm, Zr); break;
      default: pv_rows<1>(Pr, corr + r0, v, p, nk, Hd, perm, Zr); break;
    }
  }
}

// Rows of Hd (a multiple of 32) between the natural and the permuted order.
void permute_row(const float* x, int Hd, float* y) {
  for (int g = 0; g < Hd; g += 32)
    for (int m = 0; m < 16; ++m) y[g + m] = x[g + kPerm.lo[m]], y[g + 16 + m] = x[g + kPerm.hi[m]];
}
void unpermute_row(float* y, int Hd) {
  float t[32];
  for (int g = 0; g < Hd; g += 32) {
    for (int m = 0; m < 16; ++m) t[kPerm.lo[m]] = y[g + m], t[kPerm.hi[m]] = y[g + 16 + m];
    std::copy(t, t + 32, y + g);
  }
}

// The same two steps for any head_dim and CPU class (the loops vectorise at the build's baseline, AVX2): keys
// outer, rows inner, so a key / value row is read from memory once and from L1 for the other rows.
void scores_portable(const float* const* q, int rows, const KVRow* k, int nk, int Hd, float* S) {
  for (int c = 0; c < nk; ++c)
    for (int r = 0; r < rows; ++r) S[r * NB + c] = k[c].f ? dot_f32(q[r], k[c].f, Hd) : dot_bf16(q[r], k[c].h, Hd);
}
void pv_portable(const float* P, const float* corr, int rows, const KVRow* v, int nk, int Hd, float* Z) {
  for (int r = 0; r < rows; ++r)
    for (int d = 0; d < Hd; ++d) Z[r * Hd + d] *= corr[r];
  for (int j = 0; j < nk; ++j)
    for (int r = 0; r < rows; ++r) {
      const float p = P[r * NB + j];
      if (p == 0.f) continue;
      if (v[j].f)
        axpy_f32(p, v[j].f, Z + r * Hd, Hd);
      else
        axpy_bf16(p, v[j].h, Z + r * Hd, Hd);
    }
}

}  // namespace

void attention_decode_splitk(const AttentionArgs& a) {
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd;
  const int group = H / KV;
  const int rows = group * T;  // query rows per (b, kvh): (position, head of the group)
  const int64_t S = a.past + T;
  const bool w512 = use_avx512() && Hd % 64 == 0;
  // The bf16 cache's rows are widened in the permuted order (see Perm32).
  const bool perm = w512 && a.past > 0 && a.cache.dtype == DType::BF16;
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
    std::vector<const float*> qrow(rows);
    std::vector<int64_t> lo(rows), hi(rows);
    KVRow krow[NB], vrow[NB], knext[NB], vnext[NB];
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
            const SlotRange vis = visible_range(a, b, a.past + t);
            lo[r] = vis.lo;
            hi[r] = vis.hi;
            m[r] = kNegInf;
            l[r] = 0.f;
          }
          for (int64_t jb = j0; jb < j1; jb += NB) {
            const int nk = static_cast<int>(std::min<int64_t>(NB, j1 - jb));
            // Every slot here is visible to some query of the row, so the ring holds it (the window fits the ring).
            for (int c2 = 0; c2 < nk; ++c2) {
              krow[c2] = key_row(a, b, kvh, jb + c2);
              vrow[c2] = value_row(a, b, kvh, jb + c2);
            }
            // The next block's rows, prefetched while this block's are computed, a row per key (the hardware
            // prefetcher alone left a long decode step well below the streaming bandwidth).
            const int nk_next = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(NB, j1 - jb - NB)));
            for (int c2 = 0; c2 < NB; ++c2) {
              knext[c2] = c2 < nk_next ? key_row(a, b, kvh, jb + NB + c2) : KVRow{};
              vnext[c2] = c2 < nk_next ? value_row(a, b, kvh, jb + NB + c2) : KVRow{};
            }
            if (w512)
              scores_avx512(qrow.data(), rows, krow, knext, nk, Hd, perm, Sc.data());
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
              float mx = m[r];
              for (int c2 = c_lo; c2 <= c_hi; ++c2) {
                float x = s[c2] * a.scale;
                if (a.softcap > 0.f) x = a.softcap * tanh_f32(x / a.softcap);
                s[c2] = x;
                mx = std::max(mx, x);
              }
              float sum = 0.f;
#pragma omp simd reduction(+ : sum)
              for (int c2 = 0; c2 < NB; ++c2) {
                const bool out = c2 < c_lo || c2 > c_hi;  // a slot of the block no query sees: not in the sum
                const float e = exp_f32(out ? -100.f : s[c2] - mx);
                s[c2] = out ? 0.f : e;
                sum += s[c2];
              }
              const float cr = m[r] == kNegInf ? 0.f : exp_f32(m[r] - mx);
              l[r] = l[r] * cr + sum;
              m[r] = mx;
              corr[r] = cr;
            }
            if (w512)
              pv_avx512(Sc.data(), corr.data(), rows, vrow, vnext, nk, Hd, perm, Z);
            else
              pv_portable(Sc.data(), corr.data(), rows, vrow, nk, Hd, Z);
          }
          for (int r = 0; r < rows; ++r) {
            pm[slot0 + r] = m[r];
            pl[slot0 + r] = l[r];
            if (perm) unpermute_row(Z + static_cast<size_t>(r) * Hd, Hd);
          }
        }
  }
  // Merge the chunks.
#pragma omp parallel for collapse(3) if (B * KV * rows > 1)
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
