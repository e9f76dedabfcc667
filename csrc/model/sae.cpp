#include "model/sae.h"

#include <algorithm>
#include <numeric>

namespace gemmalens {

namespace {
std::vector<float> transpose(const float* a, int64_t rows, int64_t cols) {  // [rows, cols] -> [cols, rows]
  std::vector<float> t(static_cast<size_t>(rows) * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}
}  // namespace

SAE::Arch SAE::parse_arch(const std::string& name) {
  if (name == "jumprelu") return Arch::JumpReLU;
  if (name == "relu") return Arch::ReLU;
  if (name == "topk") return Arch::TopK;
  if (name == "jumprelu_signed") return Arch::JumpReLUSigned;
  throw ValueError("SAE: unknown architecture '" + name + "' (jumprelu, relu, topk or jumprelu_signed)");
}

namespace {
// d_in, d_sae, d_out from W_enc [d_in, d_sae] and W_dec [d_sae, d_out], every other shape checked against them.
void check_shapes(const SAE::Weights& w) {
  const auto& E = w.W_enc.shape;
  const auto& Dc = w.W_dec.shape;
  if (E.size() != 2 || Dc.size() != 2) throw ValueError("SAE: W_enc [d_in, d_sae] and W_dec [d_sae, d_out] must be 2-D");
  for (int64_t n : {E[0], E[1], Dc[1]})
    if (n < 1 || n > (1 << 24))
      throw ValueError("SAE: d_in, d_sae and d_out must be in [1, 2^24], got W_enc " + std::to_string(E[0]) + " x " +
                       std::to_string(E[1]) + ", W_dec ... x " + std::to_string(Dc[1]));
  const int64_t d_in = E[0], d_sae = E[1], d_out = Dc[1];
  if (Dc[0] != d_sae) throw ValueError("SAE: W_dec has " + std::to_string(Dc[0]) + " rows, W_enc " + std::to_string(d_sae) + " columns");
  if (numel(w.b_enc.shape) != d_sae || numel(w.b_dec.shape) != d_out) throw ValueError("SAE: b_enc must be [d_sae], b_dec [d_out]");
  if (w.threshold.data && numel(w.threshold.shape) != d_sae) throw ValueError("SAE: threshold must be [d_sae]");
  if (w.W_skip.data && w.W_skip.shape != std::vector<int64_t>{d_in, d_out})
    throw ValueError("SAE: affine_skip_connection must be [d_in, d_out]");
}
}  // namespace

SAE::SAE(const Weights& w, Arch arch_, int k_, bool apply_b_dec, DType dtype) : k(k_), arch(arch_), apply_b_dec_to_input(apply_b_dec) {
  check_shapes(w);
  d_in = static_cast<int>(w.W_enc.shape[0]);
  d_sae = static_cast<int>(w.W_enc.shape[1]);
  d_out = static_cast<int>(w.W_dec.shape[1]);
  if (apply_b_dec && d_in != d_out) throw ValueError("SAE: apply_b_dec_to_input needs d_in == d_out");
  if (arch == Arch::TopK && (k <= 0 || k > d_sae)) throw ValueError("SAE: topk needs 0 < k <= d_sae, got k = " + std::to_string(k));
  auto we = transpose(w.W_enc.data, d_in, d_sae);  // Linear wants [out, in]
  enc_ = ops::Linear(we.data(), d_sae, d_in, dtype);
  auto wd = transpose(w.W_dec.data, d_sae, d_out);
  dec_ = ops::Linear(wd.data(), d_out, d_sae, dtype);
  if (w.W_skip.data) {
    auto ws = transpose(w.W_skip.data, d_in, d_out);
    skip_ = ops::Linear(ws.data(), d_out, d_in, dtype);
    has_skip_ = true;
  }
  b_enc_.assign(w.b_enc.data, w.b_enc.data + d_sae);
  b_dec_.assign(w.b_dec.data, w.b_dec.data + d_out);
  if (w.threshold.data) threshold_.assign(w.threshold.data, w.threshold.data + d_sae);
  if ((arch == Arch::JumpReLU || arch == Arch::JumpReLUSigned) && threshold_.empty())
    throw ValueError("SAE: jumprelu needs a threshold");
}

void SAE::activate(float* pre, int64_t M) {
#pragma omp parallel for if (M > 1)
  for (int64_t m = 0; m < M; ++m) {
    float* p = pre + m * d_sae;
    for (int j = 0; j < d_sae; ++j) p[j] += b_enc_[j];
    if (arch == Arch::JumpReLU) {
      for (int j = 0; j < d_sae; ++j) p[j] = (p[j] > threshold_[j] && p[j] > 0.f) ? p[j] : 0.f;
    } else if (arch == Arch::JumpReLUSigned) {  // circuit-tracer: x * (x > threshold)
      for (int j = 0; j < d_sae; ++j) p[j] = p[j] > threshold_[j] ? p[j] : 0.f;
    } else if (arch == Arch::ReLU) {
      for (int j = 0; j < d_sae; ++j) p[j] = p[j] > 0.f ? p[j] : 0.f;
    } else {  // TopK: the k largest pre-activations, then ReLU; the rest 0
      std::vector<int> order(d_sae);
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      std::vector<float> keep(d_sae, 0.f);
      for (int i = 0; i < k; ++i) keep[order[i]] = std::max(p[order[i]], 0.f);
      std::copy(keep.begin(), keep.end(), p);
    }
  }
}

void SAE::encode(const float* x, int64_t M, float* acts) {
  if (apply_b_dec_to_input) {
    std::vector<float> xc(x, x + M * d_in);
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < d_in; ++j) xc[m * d_in + j] -= b_dec_[j];
    enc_.forward(xc.data(), M, acts);
  } else {
    enc_.forward(x, M, acts);
  }
  activate(acts, M);
}

void SAE::decode(const float* acts, int64_t M, const float* x, float* out) {
  dec_.forward(acts, M, out);
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < d_out; ++j) out[m * d_out + j] += b_dec_[j];
  if (has_skip_) {
    if (!x) throw ValueError("SAE.decode: this transcoder has an affine skip connection and needs its input x");
    std::vector<float> s(static_cast<size_t>(M) * d_out);
    skip_.forward(x, M, s.data());
    for (size_t i = 0; i < s.size(); ++i) out[i] += s[i];
  }
}

void SAE::encode_topk(const float* x, int64_t M, int kk, int32_t* idx, float* val) {
  if (kk <= 0 || kk > d_sae) throw ValueError("encode_topk: k must be in [1, d_sae = " + std::to_string(d_sae) + "]");
  const int64_t chunk = 64;  // rows encoded at a time: only [chunk, d_sae] is ever dense
  std::vector<float> acts(static_cast<size_t>(chunk) * d_sae);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t n = std::min(chunk, M - m0);
    encode(x + m0 * d_in, n, acts.data());
    for (int64_t r = 0; r < n; ++r) {
      const float* a = acts.data() + r * d_sae;
      std::vector<int> order(d_sae);
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + kk, order.end(), [&](int p, int q) { return a[p] > a[q] || (a[p] == a[q] && p < q); });
      for (int i = 0; i < kk; ++i) {
        idx[(m0 + r) * kk + i] = order[i];
        val[(m0 + r) * kk + i] = a[order[i]];
      }
    }
  }
}

void SAE::decode_vjp(const float* g_out, int64_t M, float* g_acts) const { dec_.backward_input(g_out, M, g_acts); }

void SAE::encode_vjp(const float* g_pre, int64_t M, float* g_x) const { enc_.backward_input(g_pre, M, g_x); }

void SAE::export_weights(float* W_enc, float* W_dec) const {
  std::vector<float> w(static_cast<size_t>(d_sae) * std::max(d_in, d_out));
  enc_.to_rowmajor(w.data());  // [d_sae, d_in]
  auto e = transpose(w.data(), d_sae, d_in);
  std::copy(e.begin(), e.end(), W_enc);
  dec_.to_rowmajor(w.data());  // [d_out, d_sae]
  auto d = transpose(w.data(), d_out, d_sae);
  std::copy(d.begin(), d.end(), W_dec);
}

}  // namespace gemmalens
