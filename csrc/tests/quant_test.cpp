// Block quantisation (ops/quant.h): int8 and int4 round trips within each format's bound, the byte layout the
// header documents, quantising in pieces, and quant_matmul against the exact sum over the quantised blocks and
// against the f32 matmul of the dequantised weights.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "ops/quant.h"
#include "tests/test.h"

namespace gemmalens::ops {
namespace {

// N rows of K (K % 64 == 0) that a block quantiser must get right: rows of very different scales, an all-zero
// block, a block with one outlier 100x the rest, a block whose extreme value is negative, a constant block.
std::vector<float> awkward_rows(int64_t N, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> w(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    const float row_scale = n % 3 == 0 ? 1e-3f : n % 3 == 1 ? 1.f : 50.f;
    for (int64_t k = 0; k < K; ++k) w[n * K + k] = row_scale * normal(rng);
  }
  std::fill_n(w.begin() + 32, 32, 0.f);                   // row 0, block 1: zeros
  w[K + 5] = 100.f;                                        // row 1, block 0: an outlier
  w[2 * K + 40] = -400.f;                                  // row 2, block 1: the extreme is negative
  std::fill_n(w.begin() + 3 * K + 64, 32, 0.37f);          // row 3, block 2: constant
  return w;
}

double block_amax(const float* x) {
  double m = 0;
  for (int j = 0; j < 32; ++j) m = std::max(m, std::fabs(static_cast<double>(x[j])));
  return m;
}

// The stored integer of weight (n, k), read from the tiled layout quant.h documents, and its block scale.
int stored_q(const QuantWeights& q, int64_t n, int64_t k) {
  const int64_t t = n / 16, r = n % 16;
  if (q.bits == 8) return static_cast<int>(q.q[t * 16 * q.K + (k / 4) * 64 + r * 4 + k % 4]) - 128;
  const uint8_t byte = q.q[t * 8 * q.K + (k / 64) * 512 + (k % 32 / 4) * 64 + r * 4 + k % 4];
  return (k % 64 < 32 ? byte & 15 : byte >> 4) - 8;
}
float stored_d(const QuantWeights& q, int64_t n, int64_t blk) { return q.d[((n / 16) * (q.K / 32) + blk) * 16 + n % 16]; }

constexpr int64_t kN = 7, kK = 128;

// Quantises awkward_rows(seed) at `bits`, checks the storage sizes, that the stored integers are in range and that
// quant_row gives d * q, then hands each block of 32 to check(src, out, amax, d): the weights, quant_row's values,
// max|w| and the block's scale.
template <class Check>
void each_block(int bits, uint32_t seed, Check check) {
  const std::vector<float> w = awkward_rows(kN, kK, seed);
  const QuantWeights q = quant_weights(w.data(), kN, kK, bits);
  // whole tiles of 16 rows: 7 rows take one, its 9 padding rows stored as the value 0 with scale 0
  CHECK_EQ(q.q.size(), static_cast<size_t>(16 * kK * bits / 8));
  CHECK_EQ(q.d.size(), static_cast<size_t>(16 * kK / 32));
  for (int64_t n = kN; n < 16; ++n)
    for (int64_t k = 0; k < kK; ++k) {
      CHECK_EQ(stored_q(q, n, k), 0);
      CHECK_EQ(stored_d(q, n, k / 32), 0.f);
    }
  const int qmin = bits == 8 ? -127 : -8, qmax = bits == 8 ? 127 : 7;
  std::vector<float> out(kK);
  for (int64_t n = 0; n < kN; ++n) {
    quant_row(q, n, out.data());
    for (int64_t blk = 0; blk < kK / 32; ++blk) {
      INFO("bits ", bits, ", row ", n, ", block ", blk);
      const double d = stored_d(q, n, blk);
      for (int j = 0; j < 32; ++j) {
        const int qi = stored_q(q, n, blk * 32 + j);
        CHECK(qi >= qmin && qi <= qmax);
        CHECK_EQ(out[blk * 32 + j], static_cast<float>(d * qi));
      }
      const float* src = w.data() + n * kK + blk * 32;
      check(src, out.data() + blk * 32, block_amax(src), d);
    }
  }
}

}  // namespace

// int8: d = max|w| / 127 per block of 32, |w - d q| <= d / 2 (so zeros stay zero).
TEST(quant_int8_round_trip) {
  each_block(8, 1, [](const float* src, const float* out, double amax, double d) {
    CHECK_NEAR(d, amax / 127, 1e-6 * amax / 127);
    // half a step, plus f32 rounding: of w * (1 / d) before rounding to an integer (up to 127 * 2^-23 steps) and of d * q
    CHECK_CLOSE(out, src, 32, d * (0.5 + 1e-4), 0.0);
  });
}

// int4: values in [-8, 7]; the scale comes from a small search (|d| in [max|w| / 8, max|w| / 6.5]), so every error
// is within max|w| / 8 (half a step, or the clamp at the far end), and the block's squared error is no worse than
// with the plain symmetric scale d = max|w| / 7 (one of the candidates).
TEST(quant_int4_round_trip) {
  each_block(4, 2, [](const float* src, const float* out, double amax, double d) {
    if (amax == 0) {
      CHECK_EQ(d, 0.0);
      CHECK_CLOSE(out, src, 32, 0.0, 0.0);
      return;
    }
    CHECK(std::fabs(d) >= amax / 8 * (1 - 1e-6) && std::fabs(d) <= amax / 6.5 * (1 + 1e-6));
    CHECK_CLOSE(out, src, 32, amax / 8 * (1 + 1e-5), 0.0);
    double sq = 0, sq_plain = 0;
    for (int j = 0; j < 32; ++j) {
      const double plain = amax / 7 * std::min(7.0, std::max(-7.0, std::nearbyint(src[j] / (amax / 7))));
      sq += (out[j] - static_cast<double>(src[j])) * (out[j] - static_cast<double>(src[j]));
      sq_plain += (plain - src[j]) * (plain - src[j]);
    }
    CHECK(sq <= sq_plain * (1 + 1e-4) + 1e-12 * amax * amax);
  });
}

// quant_alloc + quant_rows over pieces of the rows gives the bytes and scales of quant_weights; K % 64 != 0 and
// bits other than 8 / 4 are refused.
TEST(quant_rows_in_pieces) {
  const std::vector<float> w = awkward_rows(kN, kK, 3);
  for (int bits : {8, 4}) {
    INFO("bits ", bits);
    const QuantWeights whole = quant_weights(w.data(), kN, kK, bits);
    QuantWeights parts = quant_alloc(kN, kK, bits);
    quant_rows(parts, w.data(), 0, 3);
    quant_rows(parts, w.data() + 3 * kK, 3, kN - 3);
    CHECK(parts.q == whole.q);
    CHECK(parts.d == whole.d);
    CHECK_EQ(whole.nbytes(), whole.q.size() + whole.d.size() * sizeof(float));
  }
  CHECK_THROWS(quant_alloc(4, 96, 8), InternalError);
  CHECK_THROWS(quant_alloc(4, 128, 5), InternalError);
}

// y = x W^T with W quantised and x quantised on the fly per row and block (d = max|x| / 127): against the exact sum
// over the integer blocks (only the f32 accumulation differs), and against the f32 matmul of the dequantised
// weights, off by at most the activations' rounding: sum_k |w_k| * dx_k / 2. Row counts cover the 8-, 4- and
// 1-row kernels; N = 37 ends in a partial block of 16 weight rows; y has a row stride wider than N.
TEST(quant_matmul) {
  constexpr int64_t N = 37, K = 192, ldy = N + 3;
  if (!quant_supported(K)) SKIP("quant_matmul needs AVX-512 VNNI, which this CPU lacks");
  const std::vector<float> w = awkward_rows(N, K, 4);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int bits : {8, 4}) {
    const QuantWeights q = quant_weights(w.data(), N, K, bits);
    std::vector<float> wd(static_cast<size_t>(N * K));
    for (int64_t n = 0; n < N; ++n) quant_row(q, n, wd.data() + n * K);
    for (int64_t M : {1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17}) {
      INFO("bits ", bits, ", M ", M);
      std::vector<float> x(static_cast<size_t>(M * K));
      for (float& v : x) v = normal(rng);
      std::fill_n(x.begin() + 64, 32, 0.f);  // an all-zero activation block
      std::vector<float> y(static_cast<size_t>(M * ldy), 12345.f);
      quant_matmul(q, x.data(), M, y.data(), ldy);
      std::vector<double> got(static_cast<size_t>(M * N)), exact(got.size()), exact_tol(got.size()), f32(got.size()), f32_tol(got.size());
      int64_t pad_touched = 0;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t c = N; c < ldy; ++c) pad_touched += y[m * ldy + c] != 12345.f;
        for (int64_t n = 0; n < N; ++n) {
          double e = 0, e_abs = 0, f = 0, slack = 0;
          for (int64_t blk = 0; blk < K / 32; ++blk) {
            const float* xb = x.data() + m * K + blk * 32;
            // the activations' quantisation, as quant.cpp's quant_block32 computes it (in f32)
            float amax = 0.f;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
            const float dx = amax / 127.f, idx = dx > 0.f ? 1.f / dx : 0.f;
            int64_t dot = 0;
            for (int j = 0; j < 32; ++j) {
              const int xq = std::min(127, std::max(-127, static_cast<int>(std::nearbyint(xb[j] * idx))));
              dot += static_cast<int64_t>(stored_q(q, n, blk * 32 + j)) * xq;
              const double wv = wd[n * K + blk * 32 + j];
              f += wv * xb[j];
              slack += std::fabs(wv) * dx / 2;
            }
            const double term = static_cast<double>(stored_d(q, n, blk)) * dx * static_cast<double>(dot);
            e += term;
            e_abs += std::fabs(term);
          }
          got[m * N + n] = y[m * ldy + n];
          exact[m * N + n] = e;
          exact_tol[m * N + n] = 1e-5 * e_abs + 1e-30;  // f32 products and sums over K / 32 blocks: ~1e-6 relative
          f32[m * N + n] = f;
          f32_tol[m * N + n] = slack * (1 + 1e-5) + exact_tol[m * N + n];
        }
      }
      CHECK_EQ(pad_touched, 0);  // y's columns past N (row stride ldy)
      CHECK_WITHIN(got.data(), exact.data(), static_cast<int64_t>(got.size()), exact_tol);
      CHECK_WITHIN(got.data(), f32.data(), static_cast<int64_t>(got.size()), f32_tol);
    }
  }
}

}  // namespace gemmalens::ops
