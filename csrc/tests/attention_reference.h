// The attention test problem and its naive double-precision reference, shared by the attention and KV cache tests:
// random q, k, v for a geometry, the cache filled as the model fills it, and the definition of attention written out
// (not from visible_range / kv_row).
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ops/attention.h"
#include "tests/test.h"

namespace gemmalens::ops::testing {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// One attention call's geometry. The chunk's T positions are slots past .. past + T - 1; slots before `past` live
// in a KV cache of `cap` slots (slot s at s % cap: a ring when cap < past).
struct Shape {
  int B, T, H, KV, Hd;
  int64_t past = 0, cap = 0, window = 0;
  float softcap = 0.f, scale;
  DType cache = DType::F32;
  std::vector<int32_t> row_start;  // empty: no left padding
  int64_t poison = 0;              // slots [0, poison) hold NaN keys and values (slots no query may read)

  Shape(int B_, int T_, int H_, int KV_, int Hd_) : B(B_), T(T_), H(H_), KV(KV_), Hd(Hd_), scale(1.5f / std::sqrt(float(Hd_))) {}
  Shape& cached(int64_t p, int64_t c, DType d) { past = p, cap = c, cache = d; return *this; }
  Shape& sliding(int64_t w) { window = w; return *this; }
  Shape& capped(float c, float s) { softcap = c, scale = s; return *this; }
  Shape& padded(std::vector<int32_t> rs) { row_start = std::move(rs); return *this; }
  Shape& poisoned(int64_t n) { poison = n; return *this; }
  std::string describe() const {
    std::string rs;
    for (int32_t r : row_start) rs += (rs.empty() ? "" : ",") + std::to_string(r);
    return test::str("B=", B, " T=", T, " H=", H, " KV=", KV, " Hd=", Hd, " past=", past, " cap=", cap, " cache=", dtype_name(cache),
                     " window=", window, " softcap=", softcap, " scale=", scale, " row_start=[", rs, "] poison=", poison);
  }
};

// Random q, k, v for a Shape; the cache filled the way the model fills it (slot by slot, the ring overwriting its
// oldest slots), and the whole key / value sequence kept aside as the reference reads it.
struct Problem {
  Shape s;
  int64_t S;
  std::vector<float> q;             // [B, T, H, Hd]
  std::vector<float> k_new, v_new;  // [B, T, KV, Hd]
  std::vector<float> k_all, v_all;  // [B, S, KV, Hd]: slot j as stored (a bf16 cache's slots rounded to bf16)
  std::vector<float> ring_f[2];     // k, v [B, KV, cap, Hd] (f32 cache)
  std::vector<uint16_t> ring_h[2];  // k, v [B, KV, cap, Hd] (bf16 cache)

  Problem(const Shape& shape, uint32_t seed) : s(shape), S(shape.past + shape.T) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    auto randn = [&](size_t n) {
      std::vector<float> x(n);
      for (float& v : x) v = normal(rng);
      return x;
    };
    const size_t row = static_cast<size_t>(s.KV) * s.Hd;
    q = randn(static_cast<size_t>(s.B) * s.T * s.H * s.Hd);
    k_all = randn(s.B * S * row);
    v_all = randn(s.B * S * row);
    // Poisoned slots (far outside every query's window): a kernel that reads one, even to mask it, gets NaN in z.
    for (int b = 0; b < s.B; ++b)
      for (auto* all : {&k_all, &v_all}) std::fill_n(all->data() + b * S * row, std::min(s.poison, S) * row, kNaN);
    // Ring positions no slot has reached yet (past < cap) hold NaN: reading one poisons z.
    const size_t ring_n = static_cast<size_t>(s.B) * s.KV * s.cap * s.Hd;
    for (int kv = 0; kv < 2; ++kv) {
      std::vector<float>& all = kv ? v_all : k_all;
      if (s.cache == DType::F32)
        ring_f[kv].assign(ring_n, kNaN);
      else
        ring_h[kv].assign(ring_n, f32_to_bf16(kNaN));
      for (int b = 0; b < s.B; ++b)
        for (int64_t j = 0; j < s.past; ++j)  // in slot order: a ring keeps the last cap slots
          for (int h = 0; h < s.KV; ++h) {
            float* x = all.data() + (b * S + j) * row + h * s.Hd;
            const size_t at = ((static_cast<size_t>(b) * s.KV + h) * s.cap + j % s.cap) * s.Hd;
            for (int d = 0; d < s.Hd; ++d) {
              if (s.cache == DType::F32) {
                ring_f[kv][at + d] = x[d];
              } else {
                ring_h[kv][at + d] = f32_to_bf16(x[d]);
                x[d] = bf16_to_f32(ring_h[kv][at + d]);
              }
            }
          }
    }
    for (int kv = 0; kv < 2; ++kv) {
      std::vector<float>& dst = kv ? v_new : k_new;
      const std::vector<float>& all = kv ? v_all : k_all;
      dst.resize(static_cast<size_t>(s.B) * s.T * row);
      for (int b = 0; b < s.B; ++b)
        std::copy_n(all.data() + (b * S + s.past) * row, s.T * row, dst.data() + static_cast<size_t>(b) * s.T * row);
    }
  }

  AttentionArgs args(float* z, DType compute = DType::F32) const {
    AttentionArgs a;
    a.B = s.B, a.T = s.T, a.H = s.H, a.KV = s.KV, a.Hd = s.Hd;
    a.q = q.data(), a.k_new = k_new.data(), a.v_new = v_new.data();
    if (s.cap > 0) {
      a.cache.k = s.cache == DType::F32 ? static_cast<const void*>(ring_f[0].data()) : ring_h[0].data();
      a.cache.v = s.cache == DType::F32 ? static_cast<const void*>(ring_f[1].data()) : ring_h[1].data();
      a.cache.dtype = s.cache, a.cache.KV = s.KV, a.cache.Hd = s.Hd, a.cache.cap = s.cap;
    }
    a.past = s.past;
    a.row_start = s.row_start.empty() ? nullptr : s.row_start.data();
    a.window = s.window, a.scale = s.scale, a.softcap = s.softcap;
    a.z = z;
    a.compute = compute;
    return a;
  }
  int64_t z_size() const { return static_cast<int64_t>(s.B) * s.T * s.H * s.Hd; }
  int64_t scores_size() const { return static_cast<int64_t>(s.B) * s.H * s.T * S; }
};

// The definition, in double: query slot i = past + t of row b sees slot j iff row_start[b] <= j <= i and (with a
// window) i - j < window; logits q.k * scale, soft-capped; softmax; z = sum p v; z = 0 when nothing is visible.
struct Reference {
  std::vector<double> scores, pattern;  // [B, H, T, S]; scores -inf where not visible
  std::vector<double> z;                // [B, T, H, Hd]
  std::vector<char> no_key;             // [B, T]: the query sees nothing (left padding)
};

inline Reference reference(const Problem& p, bool bf16_inputs = false) {
  const Shape& s = p.s;
  const int64_t S = p.S;
  auto in = [&](float x) { return static_cast<double>(bf16_inputs ? round_bf16(x) : x); };
  Reference r;
  r.scores.assign(p.scores_size(), kNegInf);
  r.pattern.assign(p.scores_size(), 0.0);
  r.z.assign(p.z_size(), 0.0);
  r.no_key.assign(static_cast<size_t>(s.B) * s.T, 1);
  for (int b = 0; b < s.B; ++b)
    for (int t = 0; t < s.T; ++t)
      for (int h = 0; h < s.H; ++h) {
        const int kvh = h / (s.H / s.KV);
        const int64_t i = s.past + t;
        const float* q = p.q.data() + ((static_cast<int64_t>(b) * s.T + t) * s.H + h) * s.Hd;
        double* sc = r.scores.data() + ((static_cast<int64_t>(b) * s.H + h) * s.T + t) * S;
        double* pa = r.pattern.data() + ((static_cast<int64_t>(b) * s.H + h) * s.T + t) * S;
        double mx = kNegInf;
        for (int64_t j = 0; j <= i; ++j) {
          if (!s.row_start.empty() && j < s.row_start[b]) continue;
          if (s.window > 0 && i - j >= s.window) continue;
          if (j < s.past - s.cap) test::fail(__FILE__, __LINE__, test::str("bad test shape: slot ", j, " is visible but the ring no longer holds it"));
          if (j < s.poison) test::fail(__FILE__, __LINE__, test::str("bad test shape: slot ", j, " is visible but poisoned"));
          const float* k = p.k_all.data() + ((b * S + j) * s.KV + kvh) * s.Hd;
          double dot = 0;
          for (int d = 0; d < s.Hd; ++d) dot += in(q[d]) * in(k[d]);
          double x = dot * s.scale;
          if (s.softcap > 0) x = s.softcap * std::tanh(x / s.softcap);
          sc[j] = x;
          mx = std::max(mx, x);
        }
        if (mx == kNegInf) continue;  // nothing visible: pattern 0, z 0
        r.no_key[static_cast<size_t>(b) * s.T + t] = 0;
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += pa[j] = sc[j] == kNegInf ? 0.0 : std::exp(sc[j] - mx);
        double* z = r.z.data() + ((static_cast<int64_t>(b) * s.T + t) * s.H + h) * s.Hd;
        for (int64_t j = 0; j < S; ++j) {
          pa[j] /= sum;
          if (pa[j] == 0) continue;
          const float* v = p.v_all.data() + ((b * S + j) * s.KV + kvh) * s.Hd;
          for (int d = 0; d < s.Hd; ++d) z[d] += pa[j] * in(v[d]);
        }
      }
  return r;
}

// Tolerances of the f32 kernels against the double reference. |q|, |k|, |v| ~ N(0, 1) and logits of a few units:
// f32 dot products over Hd <= 256 terms and exp_f32 (relative error ~2e-7): measured at most 2.2e-6 on z (|z| < ~3),
// 4e-6 on the logits, 6e-7 on the probabilities. 2e-5 leaves a 10x margin and still catches a slot read from the
// wrong place (errors of order 0.1 to 1).
constexpr double kZTol = 2e-5;
constexpr double kScoreTol = 2e-5;  // logits up to ~8: absolute plus relative

// z of one variant: close to the reference, and exactly 0 for every query with no visible key.
inline void check_z(const Problem& p, const Reference& r, const std::vector<float>& z, double atol) {
  CHECK_CLOSE(z.data(), r.z.data(), p.z_size(), atol, 0.0);
  int64_t nonzero = 0;
  for (int b = 0; b < p.s.B; ++b)
    for (int t = 0; t < p.s.T; ++t)
      if (r.no_key[static_cast<size_t>(b) * p.s.T + t]) {
        const float* zr = z.data() + (static_cast<int64_t>(b) * p.s.T + t) * p.s.H * p.s.Hd;
        for (int64_t e = 0; e < static_cast<int64_t>(p.s.H) * p.s.Hd; ++e) nonzero += zr[e] != 0.f;
      }
  CHECK_EQ(nonzero, 0);  // values of z on queries that see no key (left padding), which must be exactly 0
}

}  // namespace gemmalens::ops::testing
