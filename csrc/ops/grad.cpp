// The forward kernels' VJPs (formulas in ops/grad.h). Plain C++ that GCC vectorises; the reverse pass is not yet
// a hot path, and each kernel is checked against torch autograd (tests/test_grad_ops.py).
#include "ops/grad.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/linear.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

namespace {
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

void rms_scale_grad(const float* x, int64_t ldx, int nh, int W, const float* s_used, int64_t M, const float* gn, int64_t ldg,
                    float* gs) {
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) {
      const float* xr = x + m * ldx + static_cast<int64_t>(h) * W;
      const float* g = gn + m * ldg + static_cast<int64_t>(h) * W;
      double dot = 0.0;
      for (int d = 0; d < W; ++d) dot += static_cast<double>(g[d]) * xr[d];
      const double s = s_used[m * nh + h];
      gs[m * nh + h] = static_cast<float>(-dot / (s * s));
    }
}

void rms_divide_backward(const float* x, int64_t ldx, int nh, int W, float eps, const float* s_used, int64_t M, const float* gn,
                         int64_t ldg, const float* gs, float* dx, int64_t ldd, bool accumulate) {
#pragma omp parallel for if (M > 4)
  for (int64_t m = 0; m < M; ++m)
    for (int h = 0; h < nh; ++h) {
      const float* xr = x + m * ldx + static_cast<int64_t>(h) * W;
      const float* g = gn + m * ldg + static_cast<int64_t>(h) * W;
      float* o = dx + m * ldd + static_cast<int64_t>(h) * W;
      double ss = 0.0;
      for (int d = 0; d < W; ++d) ss += static_cast<double>(xr[d]) * xr[d];
      const double s = std::sqrt(ss / W + eps);  // the unedited scale, whose gradient gs is
      const float r = 1.f / s_used[m * nh + h];
      const float c = static_cast<float>(gs[m * nh + h] / (W * s));
      for (int d = 0; d < W; ++d) {
        const float v = g[d] * r + xr[d] * c;
        o[d] = accumulate ? o[d] + v : v;
      }
    }
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
#pragma omp simd
    for (int f = 0; f < F; ++f) {
      const float x = g[f];
      const float th = tanh_f32(k0 * (x + k1 * x * x * x));  // the forward's own tanh (ops/vmath.h), vectorised
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
    float* g = grad ? grad + m * V : nullptr;
    if (w[m] == 0.f) {
      if (g) std::fill(g, g + V, 0.f);
      continue;
    }
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, x[v]);
    double sum = 0.0;
    for (int64_t v0 = 0; v0 < V; v0 += 1024) {  // blocks of f32 partial sums (vectorised), added up in double
      const int64_t v1 = std::min(V, v0 + 1024);
      float part = 0.f;
      if (g) {
#pragma omp simd reduction(+ : part)
        for (int64_t v = v0; v < v1; ++v) {
          const float e = exp_f32(x[v] - mx);
          g[v] = e;
          part += e;
        }
      } else {
#pragma omp simd reduction(+ : part)
        for (int64_t v = v0; v < v1; ++v) part += exp_f32(x[v] - mx);
      }
      sum += part;
    }
    if (g) {
      const float scale = static_cast<float>(w[m] / sum);
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) g[v] *= scale;
      g[targets[m]] -= w[m];
    }
    total += w[m] * (static_cast<double>(mx) + std::log(sum) - x[targets[m]]);
  }
  return total;
}

// The attention's VJP as matmuls per (row, head) over the chunk [B, T, KV, Hd] (no cache: S = T keys), each
// operand read in place through its strides: dz / q rows of one head sit H * Hd apart, k / v rows of one KV head
// KV * Hd apart.
void attention_apply_backward(const AttentionArgs& a, const float* pattern, const float* dz, float* dpattern, float* dv) {
  if (a.past != 0) throw InternalError("attention_apply_backward: the reverse pass runs over whole sequences (no cache)");
  const int64_t T = a.T, S = a.T, H = a.H, KV = a.KV, Hd = a.Hd, group = a.H / a.KV;
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      const float* dz_h = dz + (b * T * H + h) * Hd;
      const float* p_h = pattern + (b * H + h) * T * S;
      // dP_h [T, S] = dz_h [T, Hd] . V^T, at every key: the gradient at the pattern tensor (hook_pattern's _grad)
      // exists at masked entries too, although nothing flows on from them (P is 0 there, so is dS).
      matmul_f32_strided(dz_h, T, Hd, H * Hd, 1, a.v_new + (b * T * KV + kvh) * Hd, S, 1, KV * Hd, dpattern + (b * H + h) * T * S, S,
                         false);
      // dv_kvh [S, Hd] = sum over the group's heads of P_h^T [S, T] dz_h [T, Hd]
      matmul_f32_strided(p_h, S, T, 1, S, dz_h, Hd, H * Hd, 1, dv + (b * T * KV + kvh) * Hd, KV * Hd, h % group != 0);
    }
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
  const int64_t T = a.T, S = a.T, H = a.H, KV = a.KV, Hd = a.Hd, group = a.H / a.KV;
  std::vector<float> raw(static_cast<size_t>(T * S));
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / group;
      const float* s_h = scores + (b * H + h) * T * S;
      const float* ds_h = dscores + (b * H + h) * T * S;
      // The gradient of the raw product q.k: ds * scale, times softcap' = 1 - (s / cap)^2; masked slots carry none.
#pragma omp parallel for if (T * S > 16384)
      for (int64_t i = 0; i < T * S; ++i) {
        const float sc = s_h[i];
        float g = sc == -std::numeric_limits<float>::infinity() ? 0.f : ds_h[i] * a.scale;
        if (a.softcap > 0.f && g != 0.f) g *= 1.f - (sc / a.softcap) * (sc / a.softcap);
        raw[i] = g;
      }
      // dq_h [T, Hd] = raw [T, S] . K [S, Hd];  dk_kvh [S, Hd] = sum over the group's heads of raw^T [S, T] q_h [T, Hd]
      matmul_f32_strided(raw.data(), T, S, S, 1, a.k_new + (b * T * KV + kvh) * Hd, Hd, KV * Hd, 1, dq + (b * T * H + h) * Hd, H * Hd,
                         false);
      matmul_f32_strided(raw.data(), S, T, 1, S, a.q + (b * T * H + h) * Hd, Hd, H * Hd, 1, dk + (b * T * KV + kvh) * Hd, KV * Hd,
                         h % group != 0);
    }
}

}  // namespace gemmalens::ops
