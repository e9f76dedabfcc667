// The Gemma 3 forward pass, in the order of HF transformers' Gemma3ForCausalLM / Gemma3DecoderLayer.
// Activations are f32 throughout. In bfloat16 mode the weights are bf16, matmul inputs are rounded to
// bf16 (f32 accumulation) and K/V are rounded to bf16 (the cache's dtype); norms, RoPE, softmax and the
// residual stream stay f32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "model/gemma3.h"
#include "ops/kernels.h"

namespace gemmalens {

void Gemma3Model::embed(const int32_t* tokens, int64_t M, float* x) const {
  const int D = cfg_.hidden_size;
  // HF Gemma3TextScaledWordEmbedding: embed(ids) * embed_scale.to(weight.dtype) -- the normalizer
  // sqrt(D) is cast to the compute dtype (bf16: 25.25 for D = 640, 34.0 for D = 1152) and so is the product.
  float normalizer = static_cast<float>(std::sqrt(static_cast<double>(D)));
  if (dtype_ == DType::BF16) normalizer = round_bf16(normalizer);
  if (w_.embed.is_quantized()) {
#pragma omp parallel for if (M > 8)
    for (int64_t m = 0; m < M; ++m) {
      float* xr = x + m * D;
      w_.embed.row(tokens[m], xr);
      for (int d = 0; d < D; ++d) xr[d] = dtype_ == DType::BF16 ? round_bf16(xr[d] * normalizer) : xr[d] * normalizer;
    }
    return;
  }
  const void* table = w_.embed.plain_data();
#pragma omp parallel for if (M > 8)
  for (int64_t m = 0; m < M; ++m) {
    const int64_t row = static_cast<int64_t>(tokens[m]) * D;
    float* xr = x + m * D;
    if (dtype_ == DType::F32) {
      const float* e = static_cast<const float*>(table) + row;
      for (int d = 0; d < D; ++d) xr[d] = e[d] * normalizer;
    } else {
      const uint16_t* e = static_cast<const uint16_t*>(table) + row;
      for (int d = 0; d < D; ++d) xr[d] = round_bf16(bf16_to_f32(e[d]) * normalizer);
    }
  }
}

void Gemma3Model::forward(const ForwardArgs& a) {
  std::lock_guard<std::mutex> lock(mu_);
  if (threads > 0) ops::set_num_threads(threads);
  const Gemma3Config& c = cfg_;
  const int B = a.B, T = a.T;
  const int64_t M = static_cast<int64_t>(B) * T;
  const int D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads,
            Hd = c.head_dim, V = c.vocab_size;
  const int QKV = (H + 2 * KV) * Hd;
  const float eps = static_cast<float>(c.rms_norm_eps);
  KVCache* cache = a.cache;
  const int64_t past = cache ? cache->seq_len() : 0;

  // ---- validate everything before touching the cache ----
  if (B <= 0 || T <= 0) throw ValueError("forward: empty input (batch " + std::to_string(B) + ", positions " + std::to_string(T) + ")");
  for (int64_t m = 0; m < M; ++m)
    if (a.tokens[m] < 0 || a.tokens[m] >= V)
      throw ValueError("forward: token id " + std::to_string(a.tokens[m]) + " at flat index " + std::to_string(m) +
                       " is out of range [0, vocab_size = " + std::to_string(V) + ")");
  std::vector<int32_t> row_start(B, 0);
  if (!a.allow_longer && past + T > c.max_position_embeddings)
    throw ValueError("forward: " + std::to_string(past + T) + " positions exceed the model's max_position_embeddings = " +
                     std::to_string(c.max_position_embeddings) + " (RoPE was never trained there); shorten the input, or pass "
                     "allow_longer=True to run anyway");
  if (cache) {
    if (!cache->made_for(c))
      throw ValueError("forward: the KV cache was made for another model (its layers, heads, head_dim or window differ); "
                       "make one with this model's new_cache()");
    if (cache->batch() != B)
      throw ValueError("forward: the cache was made for batch " + std::to_string(cache->batch()) + ", input has batch " + std::to_string(B));
    if (cache->dtype() != dtype_) throw ValueError("forward: the cache dtype differs from the model dtype");
    if (past + T > cache->max_seq_len())
      throw ValueError("forward: " + std::to_string(past) + " cached + " + std::to_string(T) + " new positions exceed the cache's max_seq_len = " +
                       std::to_string(cache->max_seq_len()) + "; create a cache with a larger max_seq_len");
    if (past > 0) row_start = cache->row_start();
  }
  if (a.row_start) {
    for (int b = 0; b < B; ++b) {
      if (a.row_start[b] < 0 || a.row_start[b] >= past + T)
        throw ValueError("forward: row " + std::to_string(b) + " has no real token (padding count " + std::to_string(a.row_start[b]) + ")");
      if (past > 0 && a.row_start[b] != row_start[b])
        throw ValueError("forward: the attention mask's padding differs from the cached one (row " + std::to_string(b) + ")");
      row_start[b] = a.row_start[b];
    }
  }

  if (a.stop_at_layer >= 0 && cache)
    throw ValueError("forward: stop_at_layer cannot be combined with a KV cache (the cache would hold only part of the layers)");
  if (a.stop_at_layer > c.num_hidden_layers)
    throw ValueError("forward: stop_at_layer = " + std::to_string(a.stop_at_layer) + " exceeds num_hidden_layers = " +
                     std::to_string(c.num_hidden_layers));
  if (a.hooks && a.hooks->n_layers() != c.num_hidden_layers) throw ValueError("forward: the hook set was made for another model");

  // ---- hook views (TransformerLens shapes over the internal buffers; strides in floats) ----
  HookSet* hk = a.hooks;
  auto on = [&](Site st, int layer) { return hk && hk->active(st, layer); };
  auto fire = [&](Site st, int layer, float* p, std::vector<int64_t> shape, std::vector<int64_t> strides, int pos_axis = 1) {
    hk->run(st, layer, ActView{p, std::move(shape), std::move(strides), pos_axis});
  };
  auto resid_view = [&](Site st, int layer, float* p, int64_t width, int64_t ld) {  // [B, T, width], row stride ld
    if (on(st, layer)) fire(st, layer, p, {B, T, width}, {T * ld, ld, 1});
  };
  auto heads_view = [&](Site st, int layer, float* p, int64_t nh, int64_t ld) {     // [B, T, nh, Hd]
    if (on(st, layer)) fire(st, layer, p, {B, T, nh, Hd}, {T * ld, ld, Hd, 1});
  };

  // ---- positions and RoPE tables (sliding: local base; full: rope_theta with linear scaling) ----
  std::vector<int32_t> pos(M);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T; ++t) pos[b * T + t] = static_cast<int32_t>(std::max<int64_t>(0, past + t - row_start[b]));
  const int half = Hd / 2;
  std::vector<float> cos_l(M * half), sin_l(M * half), cos_g(M * half), sin_g(M * half);
  ops::rope_tables(pos.data(), M, Hd, c.rope_local_base_freq, 1.0, cos_l.data(), sin_l.data());
  ops::rope_tables(pos.data(), M, Hd, c.rope_theta, c.rope_scaling_factor, cos_g.data(), sin_g.data());

  // ---- activations (workspace buffers; contents are scratch) ----
  auto grow = [](std::vector<float>& buf, int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  };
  float* x = grow(ws_.x, M * D);                  // residual stream [M, D]
  float* normed = grow(ws_.normed, M * D);        // a norm's output [M, D]
  float* qkv = grow(ws_.qkv, M * QKV);            // [M, (H + 2 KV) Hd]
  float* q = grow(ws_.q, M * H * Hd);             // [B, T, H, Hd]
  float* k = grow(ws_.k, M * KV * Hd);            // [B, T, KV, Hd]
  float* v = grow(ws_.v, M * KV * Hd);            // [B, T, KV, Hd]
  float* z = grow(ws_.z, M * H * Hd);             // [B, T, H, Hd], attention output per head
  float* out = grow(ws_.out, M * D);              // a block's output [M, D]
  float* gate_up = grow(ws_.gate_up, M * 2 * F);  // [M, 2F]
  float* act = grow(ws_.act, M * F);              // [M, F]
  // Sliding layers' K/V reach the ring buffers only after the whole pass succeeded.
  struct Pending { int layer; int64_t keep; std::vector<float> k, v; };
  std::vector<Pending> pending;

  embed(a.tokens, M, x);
  resid_view(Site::Embed, -1, x, D, D);

  const int n_run = a.stop_at_layer >= 0 ? a.stop_at_layer : c.num_hidden_layers;
  for (int l = 0; l < n_run; ++l) {
    if (a.interrupt_check) a.interrupt_check();
    LayerWeights& L = w_.layers[l];
    const bool sliding = c.is_sliding(l);
    const float* cs = sliding ? cos_l.data() : cos_g.data();
    const float* sn = sliding ? sin_l.data() : sin_g.data();

    resid_view(Site::ResidPre, l, x, D, D);
    // --- self-attention ---
    ops::rmsnorm(x, D, L.input_layernorm.data(), eps, M, D, normed, D);
    resid_view(Site::Ln1, l, normed, D, D);
    L.qkv.forward(normed, M, qkv);
    heads_view(Site::Q, l, qkv, H, QKV);
    heads_view(Site::K, l, qkv + H * Hd, KV, QKV);
    heads_view(Site::V, l, qkv + (H + KV) * Hd, KV, QKV);
    ops::rmsnorm_heads(qkv, QKV, H, Hd, L.q_norm.data(), eps, M, q);            // q_norm before RoPE
    ops::rmsnorm_heads(qkv + H * Hd, QKV, KV, Hd, L.k_norm.data(), eps, M, k);  // k_norm before RoPE
    heads_view(Site::QNorm, l, q, H, H * Hd);
    heads_view(Site::KNorm, l, k, KV, KV * Hd);
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(v + m * KV * Hd, qkv + m * QKV + (H + KV) * Hd, sizeof(float) * KV * Hd);
    ops::rope_apply(q, M, H, Hd, cs, sn);
    ops::rope_apply(k, M, KV, Hd, cs, sn);
    heads_view(Site::RotQ, l, q, H, H * Hd);
    heads_view(Site::RotK, l, k, KV, KV * Hd);
    if (dtype_ == DType::BF16) {  // K/V as the bf16 cache will hold them: chunked == one pass
      ops::round_bf16_inplace(k, M * KV * Hd);
      ops::round_bf16_inplace(v, M * KV * Hd);
    }
    ops::AttentionArgs at;
    at.B = B; at.T = T; at.H = H; at.KV = KV; at.Hd = Hd;
    at.q = q; at.k_new = k; at.v_new = v;
    if (cache && past > 0) {
      const auto& cl = cache->layer(l);
      at.k_past = cl.k.data(); at.v_past = cl.v.data(); at.past_dtype = cache->dtype(); at.cap = cl.cap;
    }
    at.past = past;
    at.row_start = row_start.data();
    at.window = sliding ? c.sliding_window : 0;          // window counts the current token
    at.scale = static_cast<float>(std::pow(c.query_pre_attn_scalar, -0.5));
    at.softcap = static_cast<float>(c.attn_logit_softcapping);
    at.z = z;
    at.compute = dtype_;
    if (on(Site::AttnScores, l) || on(Site::Pattern, l)) {
      // Materialised path: scores and pattern exist as tensors, hooks may read and edit them.
      const int64_t S = past + T;
      std::vector<float> scores(static_cast<size_t>(B) * H * T * S), pattern(scores.size());
      ops::attention_scores(at, scores.data());
      if (on(Site::AttnScores, l)) fire(Site::AttnScores, l, scores.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
      ops::softmax_rows(scores.data(), static_cast<int64_t>(B) * H * T, S, pattern.data());
      if (on(Site::Pattern, l)) fire(Site::Pattern, l, pattern.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
      ops::attention_apply(at, pattern.data(), z);
    } else {
      ops::attention(at);
    }
    heads_view(Site::Z, l, z, H, H * Hd);
    if (a.interrupt_check) a.interrupt_check();  // attention of a long prefill can take a while: check again
    if (cache) {
      if (sliding) {
        const int64_t keep = std::min<int64_t>(T, cache->layer(l).cap);
        Pending p{l, keep, std::vector<float>(static_cast<size_t>(B) * keep * KV * Hd), std::vector<float>(static_cast<size_t>(B) * keep * KV * Hd)};
        for (int b = 0; b < B; ++b) {
          const int64_t src = (static_cast<int64_t>(b) * T + (T - keep)) * KV * Hd, dst = static_cast<int64_t>(b) * keep * KV * Hd;
          std::memcpy(p.k.data() + dst, k + src, sizeof(float) * keep * KV * Hd);
          std::memcpy(p.v.data() + dst, v + src, sizeof(float) * keep * KV * Hd);
        }
        pending.push_back(std::move(p));
      } else {
        cache->write(l, k, v, T, past);  // slots past..past+T-1, beyond seq_len until advance()
      }
    }
    L.o_proj.forward(z, M, out);
    ops::rmsnorm(out, D, L.post_attention_layernorm.data(), eps, M, D, out, D);
    resid_view(Site::Ln1Post, l, out, D, D);
    resid_view(Site::AttnOut, l, out, D, D);
    ops::add_inplace(x, out, M * D);
    resid_view(Site::ResidMid, l, x, D, D);

    // --- MLP: down(gelu_tanh(gate(m)) * up(m)) ---
    if (a.interrupt_check) a.interrupt_check();
    ops::rmsnorm(x, D, L.pre_feedforward_layernorm.data(), eps, M, D, normed, D);
    resid_view(Site::Ln2, l, normed, D, D);
    L.gate_up.forward(normed, M, gate_up);
    resid_view(Site::MlpPre, l, gate_up, F, 2 * F);
    resid_view(Site::MlpPreLinear, l, gate_up + F, F, 2 * F);
    ops::gelu_tanh_mul(gate_up, gate_up + F, 2 * F, M, F, act);
    resid_view(Site::MlpPost, l, act, F, F);
    L.down_proj.forward(act, M, out);
    ops::rmsnorm(out, D, L.post_feedforward_layernorm.data(), eps, M, D, out, D);
    resid_view(Site::Ln2Post, l, out, D, D);
    resid_view(Site::MlpOut, l, out, D, D);
    ops::add_inplace(x, out, M * D);
    resid_view(Site::ResidPost, l, x, D, D);
  }

  if (a.stop_at_layer >= 0) {  // TransformerLens: the residual stream before block stop_at_layer
    if (a.resid_out) std::memcpy(a.resid_out, x, sizeof(float) * M * D);
    return;
  }

  if (cache) {
    for (auto& p : pending) cache->write(p.layer, p.k.data(), p.v.data(), p.keep, past + T - p.keep);
    if (past == 0) cache->set_row_start(row_start);
    cache->advance(T);
  }

  // ---- final norm and tied LM head ----
  if (a.logits_mode == LogitsMode::None && !on(Site::LnFinal, -1)) return;
  int64_t rows = M;
  if (a.logits_mode == LogitsMode::Last) {
    rows = B;
    for (int b = 0; b < B; ++b)
      ops::rmsnorm(x + (static_cast<int64_t>(b) * T + T - 1) * D, D, w_.final_norm.data(), eps, 1, D, normed + b * D, D);
    if (on(Site::LnFinal, -1)) fire(Site::LnFinal, -1, normed, {B, 1, D}, {D, D, 1});
  } else {
    ops::rmsnorm(x, D, w_.final_norm.data(), eps, M, D, normed, D);
    resid_view(Site::LnFinal, -1, normed, D, D);
  }
  if (a.logits_mode == LogitsMode::None) return;
  w_.embed.forward(normed, rows, a.logits);
  if (c.final_logit_softcapping > 0) ops::softcap_inplace(a.logits, rows * V, static_cast<float>(c.final_logit_softcapping));
}

void Gemma3Model::unembed(const float* x, int64_t M, float* logits) {
  std::lock_guard<std::mutex> lock(mu_);
  if (threads > 0) ops::set_num_threads(threads);
  const int D = cfg_.hidden_size;
  std::vector<float> normed(static_cast<size_t>(M) * D);
  ops::rmsnorm(x, D, w_.final_norm.data(), static_cast<float>(cfg_.rms_norm_eps), M, D, normed.data(), D);
  w_.embed.forward(normed.data(), M, logits);
  if (cfg_.final_logit_softcapping > 0)
    ops::softcap_inplace(logits, M * cfg_.vocab_size, static_cast<float>(cfg_.final_logit_softcapping));
}

}  // namespace gemmalens
