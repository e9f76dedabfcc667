// The forward kernels' VJPs (formulas in ops/grad.h). Plain C++ that GCC vectorises; the reverse pass is not yet
// a hot path, and each kernel is checked against torch autograd (tests/test_grad_ops.py).
#include "ops/grad.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {
// out [B, T, KV, Hd]: out[b, j, kvh] = sum over the group's heads h and the queries t >= j (causal: only they see
// key j) of w(b, h, t, j) src[b, t, h], src [B, T, H, Hd]. The VJP's sum over queries, for dv and dk.
template <class W>
void sum_over_queries(const AttentionArgs& a, const float* src, W&& w, float* out) {
  const int group = a.H / a.KV;
#pragma omp parallel for collapse(3) schedule(dynamic, 4)
  for (int b = 0; b < a.B; ++b)
    for (int kvh = 0; kvh < a.KV; ++kvh)
      for (int64_t j = 0; j < a.T; ++j) {
        float* o = out + ((static_cast<int64_t>(b) * a.T + j) * a.KV + kvh) * a.Hd;
        std::fill(o, o + a.Hd, 0.f);
        for (int h = kvh * group; h < (kvh + 1) * group; ++h)
          for (int t = static_cast<int>(j); t < a.T; ++t) {
            const float c = w(b, h, t, j);
            if (c != 0.f) axpy_f32(c, src + ((static_cast<int64_t>(b) * a.T + t) * a.H + h) * a.Hd, o, a.Hd);
          }
      }
}

inline void rmsnorm_row_backward(const float* x, const float* w, float eps, int D, const float* dy, float* dx, bool accumulate) {
  // The forward's r exactly as rmsnorm computes it (f32 sum); the gradient's own reduction in double.
  float ss = 0.f;
  double gx = 0.0;
  for (int d = 0; d < D; ++d) {
    ss += x[d] * x[d];
    gx += static_cast<double>(dy[d]) * (1.f + w[d]) * x[d];
  }
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  const float c = static_cast<float>(static_cast<double>(r) * r * r * gx / D);
  for (int d = 0; d < D; ++d) {
    const float g = r * dy[d] * (1.f + w[d]) - x[d] * c;
    dx[d] = accumulate ? dx[d] + g : g;
  }
}
}  // namespace

void rmsnorm_backward(const float* x, int64_t ldx, const float* w, float eps, int64_t M, int D, const float* dy, int64_t ldy,
                      float* dx, int64_t ldd, bool accumulate) {
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m) rmsnorm_row_backward(x + m * ldx, w, eps, D, dy + m * ldy, dx + m * ldd, accumulate);
}

void rmsnorm_heads_backward(const float* x, int64_t ldx, int nh, int Hd, const float* w, float eps, int64_t M, const float* dy,
                            float* dx, int64_t ldd) {
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h)
      rmsnorm_row_backward(x + m * ldx + static_cast<int64_t>(h) * Hd, w, eps, Hd, dy + (m * nh + h) * Hd,
                           dx + m * ldd + static_cast<int64_t>(h) * Hd, false);
}

void gelu_tanh_mul_backward(const float* gate, const float* up, int64_t ld, int64_t M, int F, const float* dout, float* dgate,
                            float* dup, int64_t ldd) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi), the tanh approximation's cubic term
#pragma omp parallel for if (M > 1)
  for (int64_t m = 0; m < M; ++m) {
    const float* g = gate + m * ld;
    const float* u = up + m * ld;
    const float* d = dout + m * static_cast<int64_t>(F);
    float* dg = dgate + m * ldd;
    float* du = dup + m * ldd;
    for (int f = 0; f < F; ++f) {
      const float x = g[f];
      const float th = std::tanh(k0 * (x + k1 * x * x * x));
      const float gelu = 0.5f * x * (1.f + th);
      const float dgelu = 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * k0 * (1.f + 3.f * k1 * x * x);
      dg[f] = d[f] * u[f] * dgelu;
      du[f] = d[f] * gelu;
    }
  }
}

void softcap_backward(const float* y, float* dy, int64_t n, float cap) {
#pragma omp parallel for if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const float t = y[i] / cap;
    dy[i] *= 1.f - t * t;
  }
}

double cross_entropy_grad(const float* logits, int64_t M, int64_t V, const int64_t* targets, const float* w, float* grad) {
  double total = 0.0;
#pragma omp parallel for reduction(+ : total) schedule(dynamic, 1)
  for (int64_t m = 0; m < M; ++m) {
    const float* x = logits + m * V;
    float* g = grad + m * V;
    if (w[m] == 0.f) {
      std::fill(g, g + V, 0.f);
      continue;
    }
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, x[v]);
    double sum = 0.0;
    float part = 0.f;  // blocks of f32 partial sums, added up in double
    for (int64_t v = 0; v < V; ++v) {
      g[v] = exp_f32(x[v] - mx);
      part += g[v];
      if ((v & 1023) == 1023) {
        sum += part;
        part = 0.f;
      }
    }
    sum += part;
    const float scale = static_cast<float>(w[m] / sum);
    for (int64_t v = 0; v < V; ++v) g[v] *= scale;
    g[targets[m]] -= w[m];
    total += w[m] * (static_cast<double>(mx) + std::log(sum) - x[targets[m]]);
  }
  return total;
}

void attention_apply_backward(const AttentionArgs& a, const float* pattern, const float* dz, float* dpattern, float* dv) {
  if (a.past != 0) throw InternalError("attention_apply_backward: the reverse pass runs over whole sequences (no cache)");
  const int64_t S = a.T;
  const int group = a.H / a.KV;
  // dP[b, h, t, j] = dz[b, t, h] . v[b, j, kvh] for every key: the gradient at the pattern tensor (hook_pattern's
  // _grad) exists at masked entries too, although nothing flows on from them (P is 0 there, so is dS).
#pragma omp parallel for collapse(3) schedule(dynamic, 16)
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.H; ++h)
      for (int t = 0; t < a.T; ++t) {
        const float* g = dz + ((static_cast<int64_t>(b) * a.T + t) * a.H + h) * a.Hd;
        float* dp = dpattern + ((static_cast<int64_t>(b) * a.H + h) * a.T + t) * S;
        for (int64_t j = 0; j < S; ++j) dp[j] = dot_f32(g, value_row(a, b, h / group, j).f, a.Hd);
      }
  // dv[b, j, kvh] = sum over the group's heads h and queries t of P[b, h, t, j] dz[b, t, h]
  sum_over_queries(a, dz, [&](int b, int h, int t, int64_t j) { return pattern[((static_cast<int64_t>(b) * a.H + h) * a.T + t) * S + j]; }, dv);
}

void softmax_rows_backward(const float* pattern, const float* dpattern, int64_t rows, int64_t S, float* dscores) {
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = pattern + r * S;
    const float* dp = dpattern + r * S;
    float* ds = dscores + r * S;
    double dot = 0.0;
    for (int64_t j = 0; j < S; ++j) dot += static_cast<double>(p[j]) * dp[j];
    for (int64_t j = 0; j < S; ++j) ds[j] = p[j] * (dp[j] - static_cast<float>(dot));
  }
}

void attention_scores_backward(const AttentionArgs& a, const float* scores, const float* dscores, float* dq, float* dk) {
  if (a.past != 0) throw InternalError("attention_scores_backward: the reverse pass runs over whole sequences (no cache)");
  const int64_t S = a.T;
  const int group = a.H / a.KV;
  // The gradient of the raw product q.k: ds * scale, times softcap' = 1 - (s / cap)^2; masked slots carry none.
  auto raw = [&](int b, int h, int t, int64_t j) {
    const int64_t idx = ((static_cast<int64_t>(b) * a.H + h) * a.T + t) * S + j;
    const float s = scores[idx];
    if (s == -std::numeric_limits<float>::infinity() || dscores[idx] == 0.f) return 0.f;
    float g = dscores[idx] * a.scale;
    if (a.softcap > 0.f) g *= 1.f - (s / a.softcap) * (s / a.softcap);
    return g;
  };
#pragma omp parallel for collapse(3) schedule(dynamic, 16)
  for (int b = 0; b < a.B; ++b)
    for (int h = 0; h < a.H; ++h)
      for (int t = 0; t < a.T; ++t) {
        float* out = dq + ((static_cast<int64_t>(b) * a.T + t) * a.H + h) * a.Hd;
        std::fill(out, out + a.Hd, 0.f);
        const SlotRange vis = visible_range(a, b, t);
        for (int64_t j = vis.lo; j <= vis.hi; ++j) {
          const float g = raw(b, h, t, j);
          if (g != 0.f) axpy_f32(g, key_row(a, b, h / group, j).f, out, a.Hd);
        }
      }
  sum_over_queries(a, a.q, raw, dk);  // dk[b, j, kvh] = sum of raw(b, h, t, j) q[b, t, h]
}

}  // namespace gemmalens::ops
