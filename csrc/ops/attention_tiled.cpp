// The fast attention kernels (the function of attention_reference; only the summation order differs):
// - attention_tiled: online softmax (the flash-attention recurrence), AVX-512 or AVX2 by the CPU class. For each
//   (row b, KV head, block of queries) the block's query rows (all heads of the group) meet tiles of 64 keys:
//   S = Q K^T on 6-row register tiles (64 keys in zmm, 16 in ymm), masked online softmax per row, Z += P V on 6-row
//   register tiles (64 dims in zmm, 16 in ymm). f32 throughout; the two ISAs differ only in summation order.
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

constexpr int NK = 64;  // keys per tile


#define GL_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

// S[r][0..NK) = q_r . Kt[:, 0..NK) for `rows` rows (q_r at q[r] with Hd floats). Kt is [Hd][ldk].
// The head dimension is walked in chunks of KD so the chunk of Kt (KD x NK floats, 16 KB) stays in L1 while every
// block of rows passes over it; partial sums wait in S between chunks. Blocks of MR = 6 rows: 24 accumulators, 4 key
// registers and a broadcast (29 of 32 zmm), 10 loads per 24 FMAs (4 rows: 8 per 16).
constexpr int KD = 64;

template <int MR>
GL_AVX512 void scores_rows512(const float* const* q, const float* Kt, int64_t ldk, int d0, int d1, float* S) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = d0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(S + i * NK + 16 * c);
  for (int d = d0; d < d1; ++d) {
    const float* kt = Kt + d * ldk;
    const __m512 k0 = _mm512_loadu_ps(kt), k1 = _mm512_loadu_ps(kt + 16), k2 = _mm512_loadu_ps(kt + 32), k3 = _mm512_loadu_ps(kt + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512 b = _mm512_set1_ps(q[i][d]);
      acc[i][0] = _mm512_fmadd_ps(b, k0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(b, k1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(b, k2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(b, k3, acc[i][3]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(S + i * NK + 16 * c, acc[i][c]);
}

GL_AVX512 void scores_tile(const float* const* q, int rows, const float* Kt, int64_t ldk, int Hd, float* S) {
  for (int d0 = 0; d0 < Hd; d0 += KD) {
    const int d1 = std::min(Hd, d0 + KD);
    row_groups<6>(rows, [&](auto mr, int64_t r) { scores_rows512<decltype(mr)::value>(q + r, Kt, ldk, d0, d1, S + r * NK); });
  }
}

// One row of a score tile, in place: s[c] = exp(x_c - mx) for the visible columns [c_lo, c_hi] (x_c = s[c] * scale,
// soft-capped when softcap > 0), 0 elsewhere; mx = max(m_prev, max x_c). Returns mx, *sum = sum of the exps.
// exp512 (ops/vmath.h) is exp_f32's polynomial in 16 lanes; softmax_row64 (ops/vmath.h, the AVX2 kernel's) is the
// same function in 8 lanes, and takes the rare soft-capped rows (no released Gemma 3 sets it) on its scalar path.
GL_AVX512 float softmax_tile_row(float* s, int c_lo, int c_hi, float scale, float softcap, float m_prev, float* sum) {
  if (softcap > 0.f) return softmax_row64(s, c_lo, c_hi, scale, softcap, m_prev, sum);
  const __m512 sc = _mm512_set1_ps(scale);
  __m512 vmx = _mm512_set1_ps(m_prev);
  __mmask16 vis[NK / 16];
  for (int v = 0; v < NK / 16; ++v) {
    const int c0 = 16 * v;
    const int lo = std::max(c_lo - c0, 0), hi = std::min(c_hi - c0, 15);  // visible lanes [lo, hi]
    vis[v] = lo > hi ? 0 : static_cast<__mmask16>(((1u << (hi + 1)) - 1) & ~((1u << lo) - 1));
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + c0), sc);
    _mm512_storeu_ps(s + c0, x);
    vmx = _mm512_mask_max_ps(vmx, vis[v], vmx, x);
  }
  const float mx = _mm512_reduce_max_ps(vmx);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int v = 0; v < NK / 16; ++v) {
    const __m512 e = _mm512_maskz_mov_ps(vis[v], exp512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * v), m)));
    _mm512_storeu_ps(s + 16 * v, e);
    acc = _mm512_add_ps(acc, e);
  }
  *sum = _mm512_reduce_add_ps(acc);
  return mx;
}

// Z[r][c0 .. c0 + 16 NC) of pv_tile for MR rows: NC vectors of 16 dims per row, compile-time counts so that the
// MR x NC accumulators stay in registers (with a run-time count GCC kept them on the stack: 2.5x the time of
// scores_tile). MR = 6, NC = 4: 24 accumulators, 4 value registers and a broadcast.
template <int MR, int NC>
GL_AVX512 void pv_rows512(const float* P, const float* corr, const float* const* v, int nk, int Hd, int c0, float* Z) {
  __m512 acc[MR][NC];
  for (int i = 0; i < MR; ++i) {
    const __m512 cr = _mm512_set1_ps(corr[i]);
    for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_mul_ps(cr, _mm512_loadu_ps(Z + i * Hd + c0 + 16 * c));
  }
  for (int j = 0; j < nk; ++j) {
    const float* vr = v[j] + c0;
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int i = 0; i < MR; ++i) {
      const __m512 p = _mm512_set1_ps(P[i * NK + j]);
      for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(Z + i * Hd + c0 + 16 * c, acc[i][c]);
}

template <int NC>
GL_AVX512 void pv_slice(const float* P, const float* corr, int rows, const float* const* v, int nk, int Hd, int c0, float* Z) {
  row_groups<6>(rows, [&](auto mr, int64_t r) {
    pv_rows512<decltype(mr)::value, NC>(P + r * NK, corr + r, v, nk, Hd, c0, Z + r * Hd);
  });
}

// Z[r][:] = Z[r][:] * corr[r] + sum_j P[r][j] V[j][:] for `rows` rows, `nk` keys; V rows at v[j] (Hd floats).
// Hd is a multiple of 16: slices of 64 dims, the last one of 16 to 64.
GL_AVX512 void pv_tile(const float* P, const float* corr, int rows, const float* const* v, int nk, int Hd, float* Z) {
  for (int c0 = 0; c0 < Hd; c0 += 64) {
    switch (std::min(64, Hd - c0) / 16) {
      case 4: pv_slice<4>(P, corr, rows, v, nk, Hd, c0, Z); break;
      case 3: pv_slice<3>(P, corr, rows, v, nk, Hd, c0, Z); break;
      case 2: pv_slice<2>(P, corr, rows, v, nk, Hd, c0, Z); break;
      default: pv_slice<1>(P, corr, rows, v, nk, Hd, c0, Z); break;
    }
  }
}

// --- AVX2 (16 ymm registers): the same three steps on narrower tiles ---

// scores_tile on AVX2: MR rows x 16 keys (2 MR accumulators) per pass, a pass per 16 of the tile's keys. MR = 6
// gives 12 accumulators, 2 key registers and a broadcast (15 of 16 ymm), 8 loads per 12 FMAs (4 rows: 6 per 8).
template <int MR>
void scores_rows_avx2(const float* const* q, const float* kt, int64_t ldk, int Hd, float* S) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int d = 0; d < Hd; ++d) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * ldk), k1 = _mm256_loadu_ps(kt + d * ldk + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(q[i] + d);
      acc[i][0] = _mm256_fmadd_ps(b, k0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(b, k1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(S + i * NK, acc[i][0]);
    _mm256_storeu_ps(S + i * NK + 8, acc[i][1]);
  }
}

// Only the passes that hold one of the tile's nk keys: the tile that reaches the diagonal is often partly empty.
void scores_tile_avx2(const float* const* q, int rows, const float* Kt, int64_t ldk, int Hd, int nk, float* S) {
  for (int c0 = 0; c0 < nk; c0 += 16) {
    row_groups<6>(rows, [&](auto mr, int64_t r) {
      scores_rows_avx2<decltype(mr)::value>(q + r, Kt + c0, ldk, Hd, S + r * NK + c0);
    });
  }
}

// pv_tile on AVX2: MR rows x 16 dims (2 MR accumulators) per pass over the keys; MR = 6 as in scores_rows_avx2.
template <int MR>
void pv_rows_avx2(const float* P, const float* corr, const float* const* v, int nk, int Hd, int c0, float* Z) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) {
    const __m256 cr = _mm256_set1_ps(corr[i]);
    acc[i][0] = _mm256_mul_ps(cr, _mm256_loadu_ps(Z + i * Hd + c0));
    acc[i][1] = _mm256_mul_ps(cr, _mm256_loadu_ps(Z + i * Hd + c0 + 8));
  }
  for (int j = 0; j < nk; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v[j] + c0), v1 = _mm256_loadu_ps(v[j] + c0 + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 p = _mm256_broadcast_ss(P + i * NK + j);
      acc[i][0] = _mm256_fmadd_ps(p, v0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(p, v1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(Z + i * Hd + c0, acc[i][0]);
    _mm256_storeu_ps(Z + i * Hd + c0 + 8, acc[i][1]);
  }
}

void pv_tile_avx2(const float* P, const float* corr, int rows, const float* const* v, int nk, int Hd, float* Z) {
  for (int c0 = 0; c0 < Hd; c0 += 16) {
    row_groups<6>(rows, [&](auto mr, int64_t r) {
      pv_rows_avx2<decltype(mr)::value>(P + r * NK, corr + r, v, nk, Hd, c0, Z + r * Hd);
    });
  }
}

}  // namespace

void attention_tiled(const AttentionArgs& a) {
  const bool w512 = use_avx512();
  const int B = a.B, T = a.T, H = a.H, KV = a.KV, Hd = a.Hd;
  const int group = H / KV;
  const int QB = std::max(1, std::min(T, 64 / group));  // query tokens per block: ~64 rows
  const int nqb = (T + QB - 1) / QB;
  const int R = QB * group;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  // Every key slot any query may see, gathered once: keys transposed (Kt [B][KV][Hd][ld]) and values
  // in f32 (Vf [B][KV][n][Hd]), slot s_lo + c at column c. ld is padded so a tile never reads past the end.
  int64_t s_lo = a.past;  // the first query (slot past) has the lowest visible range
  for (int b = 0; b < B; ++b) s_lo = std::min(s_lo, visible_range(a, b, a.past).lo);
  const int64_t n = a.past + T - s_lo;
  const int64_t ld = (n + NK - 1) / NK * NK + NK;
  // Kept between calls (a prefill makes one per layer) while they are small: fresh pages every call cost their
  // page faults and zeroing, ~2% of a 512-token call.
  // (The parallel regions below reach them through these references: a thread_local named there would be each
  // worker's own.)
  thread_local std::vector<float> kt_keep, vf_keep;
  std::vector<float>& Kt = kt_keep;
  std::vector<float>& Vf = vf_keep;
  const size_t kt_size = static_cast<size_t>(B) * KV * Hd * ld, vf_size = static_cast<size_t>(B) * KV * n * Hd;
  if (Kt.size() < kt_size) Kt.resize(kt_size);
  if (Vf.size() < vf_size) Vf.resize(vf_size);
  // In blocks of NK keys, so every thread takes part even with one row and one KV head.
  const int64_t nblk = (n + NK - 1) / NK;
#pragma omp parallel for collapse(3) schedule(static)
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KV; ++kvh)
      for (int64_t blk = 0; blk < nblk; ++blk) {
      float* kt = Kt.data() + (static_cast<size_t>(b) * KV + kvh) * Hd * ld;
      float* vf = Vf.data() + (static_cast<size_t>(b) * KV + kvh) * n * Hd;
      for (int64_t c = blk * NK; c < std::min(n, (blk + 1) * NK); ++c) {
        const KVRow k = key_row(a, b, kvh, s_lo + c), v = value_row(a, b, kvh, s_lo + c);
        float* vd = vf + c * Hd;
        if (k.f) {
          for (int d = 0; d < Hd; ++d) kt[d * ld + c] = k.f[d];
          std::copy(v.f, v.f + Hd, vd);
        } else if (k.h) {  // the bf16 cache
          for (int d = 0; d < Hd; ++d) {
            kt[d * ld + c] = bf16_to_f32(k.h[d]);
            vd[d] = bf16_to_f32(v.h[d]);
          }
        } else if (k.q) {  // the int8 cache
          for (int d = 0; d < Hd; ++d) kt[d * ld + c] = static_cast<float>(k.q[d]) * k.s[d / kKVBlock];
          kv_row_f32(v, Hd, vd);
        } else {  // not held by the ring (never visible: the window fits the ring)
          std::fill(vd, vd + Hd, 0.f);
        }
      }
      if (blk == nblk - 1)  // the padding columns [n, ld): read by the last tile's scores, then masked
        for (int d = 0; d < Hd; ++d) std::fill(kt + d * ld + n, kt + (d + 1) * ld, 0.f);
    }

#pragma omp parallel
  {
    std::vector<float> S(static_cast<size_t>(R) * NK), Z(static_cast<size_t>(R) * Hd), m(R), l(R), corr(R);
    std::vector<const float*> qrow(R), vrow(NK);
    std::vector<int64_t> lo(R), hi(R);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int b = 0; b < B; ++b)
      for (int kvh = 0; kvh < KV; ++kvh)
        for (int qb_rev = 0; qb_rev < nqb; ++qb_rev) {
          const int qb = nqb - 1 - qb_rev;  // the longest blocks (the last queries, the most keys) first: balance
          const int t0 = qb * QB, nt = std::min(QB, T - t0), rows = nt * group;
          const float* kt = Kt.data() + (static_cast<size_t>(b) * KV + kvh) * Hd * ld;
          const float* vf = Vf.data() + (static_cast<size_t>(b) * KV + kvh) * n * Hd;
          for (int r = 0; r < rows; ++r) {
            const int t = t0 + r / group, h = kvh * group + r % group;
            qrow[r] = a.q + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
            const SlotRange vis = visible_range(a, b, a.past + t);
            lo[r] = vis.lo;
            hi[r] = vis.hi;
            m[r] = neg_inf;
            l[r] = 0.f;
          }
          std::fill(Z.begin(), Z.begin() + static_cast<size_t>(rows) * Hd, 0.f);
          const int64_t j_begin = *std::min_element(lo.begin(), lo.begin() + rows);
          const int64_t j_end = a.past + t0 + nt;  // exclusive
          for (int64_t j0 = j_begin; j0 < j_end; j0 += NK) {
            const int nk = static_cast<int>(std::min<int64_t>(NK, j_end - j0));
            for (int jj = 0; jj < nk; ++jj) vrow[jj] = vf + (j0 - s_lo + jj) * Hd;
            if (w512)
              scores_tile(qrow.data(), rows, kt + (j0 - s_lo), ld, Hd, S.data());
            else
              scores_tile_avx2(qrow.data(), rows, kt + (j0 - s_lo), ld, Hd, nk, S.data());
            // Masked online softmax, row by row.
            for (int r = 0; r < rows; ++r) {
              float* s = S.data() + static_cast<size_t>(r) * NK;
              const int64_t a_lo = std::max<int64_t>(lo[r], j0), a_hi = std::min<int64_t>(hi[r], j0 + nk - 1);
              if (a_lo > a_hi) {  // nothing visible in this tile
                corr[r] = 1.f;
                std::fill(s, s + NK, 0.f);
                continue;
              }
              const int c_lo = static_cast<int>(a_lo - j0), c_hi = static_cast<int>(a_hi - j0);
              float sum;
              const float mx = w512 ? softmax_tile_row(s, c_lo, c_hi, a.scale, a.softcap, m[r], &sum)
                                    : softmax_row64(s, c_lo, c_hi, a.scale, a.softcap, m[r], &sum);
              const float cr = m[r] == neg_inf ? 0.f : exp_f32(m[r] - mx);
              l[r] = l[r] * cr + sum;
              m[r] = mx;
              corr[r] = cr;
            }
            if (w512)
              pv_tile(S.data(), corr.data(), rows, vrow.data(), nk, Hd, Z.data());
            else
              pv_tile_avx2(S.data(), corr.data(), rows, vrow.data(), nk, Hd, Z.data());
          }
          for (int r = 0; r < rows; ++r) {
            const int t = t0 + r / group, h = kvh * group + r % group;
            float* z = a.z + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // padding rows (no visible key): z = 0
            for (int d = 0; d < Hd; ++d) z[d] = Z[static_cast<size_t>(r) * Hd + d] * inv;
          }
        }
  }
  if ((Kt.size() + Vf.size()) * sizeof(float) > (size_t{32} << 20)) {  // a long context's: not kept
    std::vector<float>().swap(Kt);
    std::vector<float>().swap(Vf);
  }
}

bool attention_tiled_ok(const AttentionArgs& a) {
  return a.Hd % 16 == 0;  // every CPU class has a kernel (AVX-512 or AVX2)
}

}  // namespace gemmalens::ops
