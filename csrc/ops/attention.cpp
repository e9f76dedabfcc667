// The attention dispatcher, the direct reference kernel and the materialised path (scores, softmax, apply) that
// the attn_scores / pattern hooks read and edit. The fast variants live in attention_tiled.cpp and
// attention_bf16.cpp; the shared rules (visible keys, where a row lives) in attention.h.
#include "ops/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A raw score -> the logit softmax sees: scaled, then soft-capped when the config asks.
inline float score_logit(const AttentionArgs& a, float s) {
  s *= a.scale;
  return a.softcap > 0.f ? a.softcap * tanh_f32(s / a.softcap) : s;
}
}  // namespace

void kv_int8_quantize(const float* x, int Hd, int8_t* q) {
  float* scales = reinterpret_cast<float*>(q + Hd);
  for (int g = 0; g < Hd; g += kKVBlock) {
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < kKVBlock; ++i) {
      finite = finite && std::isfinite(x[g + i]);
      amax = std::max(amax, std::fabs(x[g + i]));
    }
    if (!finite) {
      // a NaN or inf in the block (an intervention's, say) stays visible downstream: the block reads back as NaN
      for (int i = 0; i < kKVBlock; ++i) q[g + i] = 0;
      scales[g / kKVBlock] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float d = amax / 127.f;
    scales[g / kKVBlock] = d;
    for (int i = 0; i < kKVBlock; ++i) {
      const float t = d > 0.f ? std::nearbyint(x[g + i] / d) : 0.f;
      q[g + i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, t)));
    }
  }
}

void attention(const AttentionArgs& a) {
  // Decode steps (a few new positions) over a long context: split-K over the keys, straight from the cache.
  if (a.T <= 4 && a.past > 0 && static_cast<int64_t>(a.B) * a.KV < 2 * omp_get_max_threads() * 4) {
    attention_decode_splitk(a);
    return;
  }
  if (a.compute == DType::BF16 && a.T >= 64 && attention_bf16_matmul(a)) return;
  if (attention_tiled_ok(a))
    attention_tiled(a);
  else
    attention_reference(a);
}

void attention_reference(const AttentionArgs& a) {
  const int B = a.B, T = a.T, H = a.H, Hd = a.Hd, group = a.H / a.KV;
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(a.past + T));
#pragma omp for collapse(3) schedule(dynamic, 4)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < T; ++t) {
          const int kvh = h / group;
          const SlotRange vis = visible_range(a, b, a.past + t);
          const float* q = a.q + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
          float* z = a.z + ((static_cast<int64_t>(b) * T + t) * H + h) * Hd;
          std::fill(z, z + Hd, 0.f);
          if (vis.lo > vis.hi) continue;  // a padding query: nothing to attend to
          const int64_t n = vis.hi - vis.lo + 1;
          float mx = kNegInf;
          for (int64_t j = vis.lo; j <= vis.hi; ++j) {
            const float s = score_logit(a, kv_dot(q, key_row(a, b, kvh, j), Hd));
            p[j - vis.lo] = s;
            mx = std::max(mx, s);
          }
          float sum = 0.f;
          float* pp = p.data();
#pragma omp simd reduction(+ : sum)
          for (int64_t r = 0; r < n; ++r) {
            pp[r] = exp_f32(pp[r] - mx);
            sum += pp[r];
          }
          const float inv = 1.f / sum;
          for (int64_t j = vis.lo; j <= vis.hi; ++j) kv_axpy(p[j - vis.lo] * inv, value_row(a, b, kvh, j), z, Hd);
        }
  }
}

void attention_scores(const AttentionArgs& a, float* scores) {
  const int64_t S = a.past + a.T;
  const int group = a.H / a.KV;
  // Per (row, KV head): keys transposed once (Kt [Hd][S], f32; slots the ring no longer holds stay absent), then
  // each query row is an axpy over the visible key range: s[j] += q[d] * Kt[d][j] (vectorises over j).
  std::vector<float> Kt(static_cast<size_t>(a.Hd) * S);
  std::vector<char> held(S);
  for (int b = 0; b < a.B; ++b)
    for (int kvh = 0; kvh < a.KV; ++kvh) {
#pragma omp parallel
      {
        std::vector<float> kr(a.Hd);  // a key row as f32
#pragma omp for
        for (int64_t j = 0; j < S; ++j) {
          const KVRow k = key_row(a, b, kvh, j);
          held[j] = k.held() ? 1 : 0;
          kv_row_f32(k, a.Hd, kr.data());
          for (int d = 0; d < a.Hd; ++d) Kt[d * S + j] = kr[d];
        }
      }
#pragma omp parallel for collapse(2) schedule(dynamic, 8)  // causal rows: later queries see more keys
      for (int g = 0; g < group; ++g)
        for (int t = 0; t < a.T; ++t) {
          const int h = kvh * group + g;
          const SlotRange vis = visible_range(a, b, a.past + t);
          const float* q = a.q + ((static_cast<int64_t>(b) * a.T + t) * a.H + h) * a.Hd;
          float* s = scores + ((static_cast<int64_t>(b) * a.H + h) * a.T + t) * S;
          std::fill(s, s + S, 0.f);
          for (int d = 0; d < a.Hd && vis.lo <= vis.hi; ++d) {
            const float qd = q[d];
            const float* kr = Kt.data() + static_cast<int64_t>(d) * S;
#pragma omp simd
            for (int64_t j = vis.lo; j <= vis.hi; ++j) s[j] += qd * kr[j];
          }
          for (int64_t j = 0; j < S; ++j) s[j] = (j < vis.lo || j > vis.hi || !held[j]) ? kNegInf : score_logit(a, s[j]);
        }
    }
}

void softmax_rows(const float* scores, int64_t rows, int64_t S, float* pattern) {
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = scores + r * S;
    float* p = pattern + r * S;
    float mx = kNegInf;
    for (int64_t j = 0; j < S; ++j) mx = std::max(mx, s[j]);
    if (!(mx > kNegInf)) {
      std::fill(p, p + S, 0.f);
      continue;
    }
    float sum = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      p[j] = s[j] == kNegInf ? 0.f : exp_f32(s[j] - mx);
      sum += p[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < S; ++j) p[j] *= inv;
  }
}

void attention_apply(const AttentionArgs& a, const float* pattern, float* z) {
  const int64_t S = a.past + a.T;
  const int group = a.H / a.KV;
#pragma omp parallel for collapse(3) schedule(dynamic, 8)
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.H; ++h)
      for (int t = 0; t < a.T; ++t) {
        const float* p = pattern + ((static_cast<int64_t>(b) * a.H + h) * a.T + t) * S;
        float* zr = z + ((static_cast<int64_t>(b) * a.T + t) * a.H + h) * a.Hd;
        std::fill(zr, zr + a.Hd, 0.f);
        for (int64_t j = 0; j < S; ++j)
          if (p[j] != 0.f) kv_axpy(p[j], value_row(a, b, h / group, j), zr, a.Hd);
      }
}

}  // namespace gemmalens::ops
