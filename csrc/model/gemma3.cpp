// The Gemma 3 forward pass, in the order of HF transformers' Gemma3ForCausalLM / Gemma3DecoderLayer.
// Activations are f32 throughout. In bfloat16 mode the weights are bf16, matmul inputs are rounded to
// bf16 (f32 accumulation) and K/V are rounded to bf16 (the cache's dtype); norms, RoPE, softmax and the
// residual stream stay f32.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "model/gemma3.h"
#include "model/pass.h"
#include "ops/attention.h"
#include "ops/kernels.h"

namespace gemmalens {

void Gemma3Model::embed(const int32_t* tokens, int64_t M, float* x) const {
  const int D = cfg_.hidden_size;
  // HF Gemma3TextScaledWordEmbedding: embed(ids) * embed_scale.to(weight.dtype) -- the normalizer
  // sqrt(D) is cast to the compute dtype (bf16: 25.25 for D = 640, 34.0 for D = 1152) and so is the product.
  float normalizer = static_cast<float>(std::sqrt(static_cast<double>(D)));
  if (dtype_ == DType::BF16) normalizer = round_bf16(normalizer);
  // Linear::row reads any of the table's layouts: quantised blocks, row-major, or the LM head's bf16 panels.
  const bool bf16 = dtype_ == DType::BF16;
#pragma omp parallel for if (M > 8)
  for (int64_t m = 0; m < M; ++m) {
    float* xr = x + m * D;
    w_.embed.row(tokens[m], xr);
    for (int d = 0; d < D; ++d) xr[d] = bf16 ? round_bf16(xr[d] * normalizer) : xr[d] * normalizer;
  }
}

std::vector<int32_t> Gemma3Model::validate(const ForwardArgs& a) const {
  const Gemma3Config& c = cfg_;
  const int B = a.B, T = a.T;
  const int64_t M = static_cast<int64_t>(B) * T;
  const KVCache* cache = a.cache;
  const int64_t past = cache ? cache->seq_len() : 0;
  if (B <= 0 || T <= 0) throw ValueError("forward: empty input (batch " + std::to_string(B) + ", positions " + std::to_string(T) + ")");
  for (int64_t m = 0; m < M; ++m)
    if (a.tokens[m] < 0 || a.tokens[m] >= c.vocab_size)
      throw ValueError("forward: token id " + std::to_string(a.tokens[m]) + " at flat index " + std::to_string(m) +
                       " is out of range [0, vocab_size = " + std::to_string(c.vocab_size) + ")");
  std::vector<int32_t> row_start(B, 0);
  if (!a.allow_longer && past + T > c.max_position_embeddings)
    throw ValueError("forward: " + std::to_string(past + T) + " positions exceed the model's max_position_embeddings = " +
                     std::to_string(c.max_position_embeddings) + " (RoPE was never trained there); shorten the input, or pass "
                     "allow_longer=True to run anyway");
  if (cache) {
    if (!cache->made_for(c))
      throw ValueError("forward: the KV cache was made for another model (its layers, heads, head_dim or window differ); "
                       "make one with this model's new_cache()");
    if (a.cache_rows) {
      if (B > cache->batch())
        throw ValueError("forward: " + std::to_string(B) + " rows but the cache has only " + std::to_string(cache->batch()));
      std::vector<char> seen(cache->batch(), 0);
      for (int b = 0; b < B; ++b) {
        const int32_t r = a.cache_rows[b];
        if (r < 0 || r >= cache->batch())
          throw ValueError("forward: cache_rows[" + std::to_string(b) + "] = " + std::to_string(r) + " is out of range [0, " +
                           std::to_string(cache->batch()) + ")");
        if (seen[r]++) throw ValueError("forward: cache row " + std::to_string(r) + " appears twice in cache_rows");
      }
    } else if (cache->batch() != B) {
      throw ValueError("forward: the cache was made for batch " + std::to_string(cache->batch()) + ", input has batch " + std::to_string(B));
    }
    for (int b = 0; b < B; ++b) {
      const int r = a.cache_rows ? a.cache_rows[b] : b;
      if (!cache->row_valid(r))
        throw ValueError("forward: cache row " + std::to_string(r) + " missed positions (a pass with cache_rows left it out); "
                         "fill it with place_row() or truncate(0) the cache");
    }
    if (cache->dtype() != dtype_) throw ValueError("forward: the cache dtype differs from the model dtype");
    if (past + T > cache->max_seq_len())
      throw ValueError("forward: " + std::to_string(past) + " cached + " + std::to_string(T) + " new positions exceed the cache's max_seq_len = " +
                       std::to_string(cache->max_seq_len()) + "; create a cache with a larger max_seq_len");
    if (past > 0)
      for (int b = 0; b < B; ++b) row_start[b] = cache->row_start()[a.cache_rows ? a.cache_rows[b] : b];
  } else if (a.cache_rows) {
    throw ValueError("forward: cache_rows needs a cache");
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
  if (a.hooks) {  // the attention scores / pattern hooks materialise [B, H, T, past + T] per hooked layer: O(T^2)
    bool materialised = false;
    for (int l = 0; l < c.num_hidden_layers; ++l)
      materialised = materialised || a.hooks->active(Site::AttnScores, l) || a.hooks->active(Site::Pattern, l);
    if (materialised)
      check_fits_memory(uint64_t(8) * B * c.num_attention_heads * T * static_cast<uint64_t>(past + T),
                        "forward: hook_attn_scores / hook_pattern over " + std::to_string(T) + " positions (" +
                            std::to_string(past) + " cached) materialise float32 scores and pattern [" + std::to_string(B) + ", " +
                            std::to_string(c.num_attention_heads) + ", " + std::to_string(T) + ", " + std::to_string(past + T) + "], which",
                        "hook a shorter input, or feed it in chunks through a KV cache (each chunk's scores are [chunk, cached + chunk])");
  }
  if (a.tape && (cache || a.stop_at_layer >= 0 || a.logits_mode != LogitsMode::All))
    throw ValueError("forward: a gradient run needs the whole sequence at once: all-position logits, no KV cache, no stop_at_layer");
  return row_start;
}

Gemma3Model::Pass Gemma3Model::prepare(const ForwardArgs& a) {
  const Gemma3Config& c = cfg_;
  Pass p(a);
  p.row_start = validate(a);  // everything checked before the cache or a buffer is touched
  p.B = a.B;
  p.T = a.T;
  p.Hd = c.head_dim;
  p.M = static_cast<int64_t>(a.B) * a.T;
  p.past = a.cache ? a.cache->seq_len() : 0;
  p.n_layers = a.stop_at_layer >= 0 ? a.stop_at_layer : c.num_hidden_layers;

  // Positions (left padding shifts a row's first real token to 0) and RoPE tables: sliding layers use the local
  // base, full layers rope_theta with linear scaling.
  std::vector<int32_t> pos(p.M);
  for (int b = 0; b < p.B; ++b)
    for (int t = 0; t < p.T; ++t) pos[b * p.T + t] = static_cast<int32_t>(std::max<int64_t>(0, p.past + t - p.row_start[b]));
  const int64_t half = c.head_dim / 2;
  for (auto* t : {&p.cos_local, &p.sin_local, &p.cos_global, &p.sin_global}) t->resize(p.M * half);
  ops::rope_tables(pos.data(), p.M, c.head_dim, c.rope_local_base_freq, 1.0, p.cos_local.data(), p.sin_local.data());
  ops::rope_tables(pos.data(), p.M, c.head_dim, c.rope_theta, c.rope_scaling_factor, p.cos_global.data(), p.sin_global.data());

  auto grow = [](std::vector<float>& buf, int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  };
  const int64_t M = p.M, D = c.hidden_size, F = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  p.x = grow(ws_.x, M * D);
  p.normed = grow(ws_.normed, M * D);
  p.qkv = grow(ws_.qkv, M * (H + 2 * KV) * p.Hd);
  p.q = grow(ws_.q, M * H * p.Hd);
  p.k = grow(ws_.k, M * KV * p.Hd);
  p.v = grow(ws_.v, M * KV * p.Hd);
  p.z = grow(ws_.z, M * H * p.Hd);
  p.out = grow(ws_.out, M * D);
  p.gate_up = grow(ws_.gate_up, M * 2 * F);
  p.act = grow(ws_.act, M * F);
  p.scale = grow(ws_.scale, 2 * M * H);
  return p;
}

void Gemma3Model::forward(const ForwardArgs& a) {
  std::lock_guard<std::mutex> lock(mu_);
  if (threads > 0) ops::set_num_threads(threads);
  if (chunked(a))
    forward_chunks(a);
  else
    forward_pass(a);
}

bool Gemma3Model::chunked(const ForwardArgs& a) const {
  return prefill_chunk > 0 && a.T > prefill_chunk && !a.hooks && !a.tape && a.stop_at_layer < 0 &&
         (a.logits_mode == LogitsMode::Last || a.logits_mode == LogitsMode::None) && (!a.cache || a.cache->seq_len() == 0);
}

// A long input (chunked()) as passes of prefill_chunk positions, each appended to the cache as a decoding loop
// appends its steps: the keys and values a chunk's queries meet are the cache's (bf16-rounded in a bf16 model, as one
// pass rounds them too), so only the order of the attention's sums differs from one pass. Only into an empty cache:
// a pass abandoned part-way (an error, Ctrl-C) truncates it back to empty, leaving it as it was.
void Gemma3Model::forward_chunks(const ForwardArgs& a) {
  const std::vector<int32_t> row_start = validate(a);  // the whole input, before any chunk runs
  std::unique_ptr<KVCache> own;
  KVCache* cache = a.cache;
  if (!cache) {
    own = std::make_unique<KVCache>(cfg_, a.B, a.T, dtype_);
    cache = own.get();
  }
  // The first chunk reaches every row's first real token (a pass needs one per row).
  int64_t first = prefill_chunk;
  for (int32_t r : row_start) first = std::max<int64_t>(first, static_cast<int64_t>(r) + 1);
  std::vector<int32_t> tok;
  try {
    for (int64_t t0 = 0; t0 < a.T;) {
      const int64_t n = std::min<int64_t>(t0 == 0 ? first : prefill_chunk, a.T - t0);
      tok.resize(static_cast<size_t>(a.B) * n);
      for (int b = 0; b < a.B; ++b)
        std::memcpy(tok.data() + b * n, a.tokens + static_cast<int64_t>(b) * a.T + t0, sizeof(int32_t) * n);
      ForwardArgs c = a;
      c.tokens = tok.data();
      c.T = static_cast<int>(n);
      c.row_start = row_start.data();
      c.cache = cache;
      c.logits_mode = t0 + n == a.T ? a.logits_mode : LogitsMode::None;
      forward_pass(c);
      t0 += n;
    }
  } catch (...) {
    cache->truncate(0);
    throw;
  }
}

void Gemma3Model::forward_pass(const ForwardArgs& a) {
  Pass p = prepare(a);  // validation, positions, RoPE tables, buffers
  const int D = cfg_.hidden_size;

  embed(a.tokens, p.M, p.x);
  p.resid(Site::Embed, -1, p.x, D, D);
  if (a.tape) {
    a.tape->ready = false;
    a.tape->resid.resize(p.n_layers + 1);
    a.tape->layers.clear();
    const Gemma3Config& c = cfg_;
    const int64_t QKV = static_cast<int64_t>(c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
    const int64_t per_layer = 4 * (p.M * (2 * QKV + 4 * D + 2 * static_cast<int64_t>(c.intermediate_size)) +
                                   2 * static_cast<int64_t>(p.B) * c.num_attention_heads * p.T * p.T);
    if (per_layer * p.n_layers <= a.tape->keep_bytes)
      for (int l = 0; l < p.n_layers; ++l) a.tape->layers.push_back(std::make_shared<LayerTape>());
  }
  // The last block past its attention, where only each row's last position goes on (logits "last" or "none", no
  // hooks, no tape, every block): its o_proj and MLP on those B rows, as llama.cpp's and HF's last-position prefill
  // do (4.6% of a 270M prefill's matmuls). The cache still gets every position's keys and values.
  const int T_in = p.T;
  const bool trim_last = (a.logits_mode == LogitsMode::Last || a.logits_mode == LogitsMode::None) && !a.hooks &&
                         !a.tape && a.stop_at_layer < 0 && p.T > 1;
  for (int l = 0; l < p.n_layers; ++l) {
    p.last_rows_only = trim_last && l == p.n_layers - 1;
    p.interrupt();
    p.resid(Site::ResidPre, l, p.x, D, D);
    if (a.tape) LayerTape::save(a.tape->resid[l], p.x, p.M * D);
    p.keep = a.tape && !a.tape->layers.empty() ? a.tape->layers[l].get() : nullptr;  // a reverse pass's intermediates
    attention_block(l, p);  // x += post_attention_norm(o_proj(attention(input_norm(x))))
    p.interrupt();
    mlp_block(l, p);        // x += post_feedforward_norm(down(gelu_tanh(gate(m)) * up(m))), m = pre_feedforward_norm(x)
    p.keep = nullptr;
  }
  if (a.stop_at_layer >= 0) {  // TransformerLens: the residual stream before block stop_at_layer
    if (a.resid_out) std::memcpy(a.resid_out, p.x, sizeof(float) * p.M * D);
    return;
  }
  if (a.cache) a.cache->commit(T_in, p.row_start, a.cache_rows);  // every layer ran: the new positions join the cache
  if (a.tape) {
    LayerTape::save(a.tape->resid[p.n_layers], p.x, p.M * D);
    a.tape->B = p.B;
    a.tape->T = p.T;
    a.tape->tokens.assign(a.tokens, a.tokens + p.M);
    a.tape->row_start = p.row_start;
    a.tape->ready = true;
  }
  final(p);
}

void Gemma3Model::attention_block(int l, Pass& p) {
  const Gemma3Config& c = cfg_;
  LayerWeights& L = w_.layers[l];
  const int D = c.hidden_size, H = c.num_attention_heads, KV = c.num_key_value_heads, Hd = c.head_dim, QKV = (H + 2 * KV) * Hd;
  const int64_t M = p.M;
  const bool sliding = c.is_sliding(l);

  norm(l, p, resid_norm(kLn1, L.input_layernorm, p.B, p.T, p.keep ? &p.keep->s_ln1 : nullptr), p.x, D, p.normed, D);
  L.qkv.forward(p.normed, M, p.qkv);
  p.heads(Site::Q, l, p.qkv, H, QKV);
  p.heads(Site::K, l, p.qkv + H * Hd, KV, QKV);
  p.heads(Site::V, l, p.qkv + (H + KV) * Hd, KV, QKV);
  if (p.keep) LayerTape::save(p.keep->qkv, p.qkv, M * QKV);  // as edited at hook_q / k / v: the norms' inputs
  // q_norm and k_norm before RoPE, per head
  norm(l, p, head_norm(kQNorm, L.q_norm, H, p.B, p.T, p.keep ? &p.keep->s_q : nullptr), p.qkv, QKV, p.q, H * Hd);
  p.heads_bhtd(Site::QNormed, l, p.q, H, H * Hd);
  norm(l, p, head_norm(kKNorm, L.k_norm, KV, p.B, p.T, p.keep ? &p.keep->s_k : nullptr), p.qkv + H * Hd, QKV, p.k, KV * Hd);
  p.heads_bhtd(Site::KNormed, l, p.k, KV, KV * Hd);
  for (int64_t m = 0; m < M; ++m) std::memcpy(p.v + m * KV * Hd, p.qkv + m * QKV + (H + KV) * Hd, sizeof(float) * KV * Hd);
  ops::rope_apply(p.q, M, H, Hd, p.rope_cos(sliding), p.rope_sin(sliding));
  ops::rope_apply(p.k, M, KV, Hd, p.rope_cos(sliding), p.rope_sin(sliding));
  p.heads(Site::RotQ, l, p.q, H, H * Hd);
  p.heads(Site::RotK, l, p.k, KV, KV * Hd);
  if (dtype_ == DType::BF16) {  // K/V as the bf16 cache will hold them: chunked == one pass
    ops::round_bf16_inplace(p.k, M * KV * Hd);
    ops::round_bf16_inplace(p.v, M * KV * Hd);
  }
  if (p.keep) {
    LayerTape::save(p.keep->q, p.q, M * H * Hd);
    LayerTape::save(p.keep->k, p.k, M * KV * Hd);
    LayerTape::save(p.keep->v, p.v, M * KV * Hd);
  }
  attend(l, p);
  p.heads(Site::Z, l, p.z, H, H * Hd);
  p.interrupt();  // attention of a long prefill can take a while: check again
  if (p.a.cache) p.a.cache->stage(l, p.k, p.v, p.T, p.a.cache_rows, p.B);
  if (p.last_rows_only) {  // from here on, row b's last position only (forward_pass): z's and x's rows b*T + T-1 -> b
    const int64_t HZ = static_cast<int64_t>(H) * Hd;
    for (int64_t b = 0; b < p.B; ++b) {  // row b's source b*T + T-1 >= b: moving in increasing b never overwrites one
      const int64_t src = b * p.T + p.T - 1;
      std::memmove(p.z + b * HZ, p.z + src * HZ, sizeof(float) * HZ);
      std::memmove(p.x + b * D, p.x + src * D, sizeof(float) * D);
    }
    p.T = 1;
    p.M = p.B;
  }

  L.o_proj.forward(p.z, p.M, p.out);
  if (p.keep) LayerTape::save(p.keep->attn_proj, p.out, M * D);
  join_residual(l, p, resid_norm(kLn1Post, L.post_attention_layernorm, p.B, p.T, p.keep ? &p.keep->s_ln1_post : nullptr),
                Site::AttnOut, Site::ResidMid);
}

void Gemma3Model::join_residual(int l, Pass& p, const NormCall& post_norm, Site out_site, Site resid_site) {
  const int D = cfg_.hidden_size;
  norm(l, p, post_norm, p.out, D, p.out, D);
  p.resid(out_site, l, p.out, D, D);
  ops::add_inplace(p.x, p.out, p.M * D);
  p.resid(resid_site, l, p.x, D, D);
}

void Gemma3Model::norm(int l, Pass& p, const NormCall& n, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int64_t M = n.rows(), nh = n.nh, W = n.W, B = n.Bv, T = n.Tv;
  const bool split = p.on(n.sites.scale, l) || p.on(n.sites.normalized, l);
  if (!split) {
    if (n.per_head)
      ops::rmsnorm_heads(x, ldx, n.nh, n.W, n.w, eps, M, y);  // y [M, nh, W] contiguous (ldy = nh W)
    else
      ops::rmsnorm(x, ldx, n.w, eps, M, n.W, y, ldy);
    if (n.kept_scale) n.kept_scale->clear();
  } else {  // TransformerLens's steps, each a hook site (with the scale unedited: the fused kernel's values exactly)
    ops::rms_scale(x, ldx, n.nh, n.W, eps, M, p.scale);
    if (n.per_head)
      p.fire(n.sites.scale, l, p.scale, {B, nh, T, 1}, {T * nh, 1, nh, 1}, 2);
    else
      p.fire(n.sites.scale, l, p.scale, {B, T, 1}, {T, 1, 1});
    if (n.kept_scale) n.kept_scale->assign(p.scale, p.scale + M * nh);  // the reverse pass divides by it again
    ops::rms_divide(x, ldx, n.nh, n.W, p.scale, M, y, ldy);
    if (n.per_head)
      p.fire(n.sites.normalized, l, y, {B, nh, T, W}, {T * ldy, W, ldy, 1}, 2);
    else
      p.fire(n.sites.normalized, l, y, {B, T, W}, {T * ldy, ldy, 1});
    ops::rms_gain(y, ldy, n.nh, n.W, n.w, M);
  }
  if (!p.on(n.sites.out, l)) return;
  if (n.per_head)
    p.fire(n.sites.out, l, y, {B, nh, T, W}, {T * ldy, W, ldy, 1}, 2);
  else
    p.fire(n.sites.out, l, y, {B, T, W}, {T * ldy, ldy, 1});
}

void Gemma3Model::attend(int l, Pass& p) {
  const Gemma3Config& c = cfg_;
  ops::AttentionArgs at;
  at.B = p.B; at.T = p.T; at.H = c.num_attention_heads; at.KV = c.num_key_value_heads; at.Hd = c.head_dim;
  at.q = p.q; at.k_new = p.k; at.v_new = p.v;
  if (p.a.cache && p.past > 0) at.cache = p.a.cache->view(l, p.a.cache_rows);
  at.past = p.past;
  at.row_start = p.row_start.data();
  at.window = c.is_sliding(l) ? c.sliding_window : 0;  // the window counts the current token
  at.scale = static_cast<float>(std::pow(c.query_pre_attn_scalar, -0.5));
  at.softcap = static_cast<float>(c.attn_logit_softcapping);
  at.z = p.z;
  at.compute = dtype_;
  if (!p.on(Site::AttnScores, l) && !p.on(Site::Pattern, l)) {
    ops::attention(at);  // the fast path, as in any forward (a gradient run's logits equal a plain run's)
    if (p.keep) {        // the reverse pass needs the scores and the pattern: computed beside it
      const size_t n = static_cast<size_t>(p.B) * at.H * p.T * (p.past + p.T);
      p.keep->scores.resize(n);
      p.keep->pattern.resize(n);
      p.keep->scores_in.clear();
      p.keep->pattern_in.clear();
      ops::attention_scores(at, p.keep->scores.data());
      ops::softmax_rows(p.keep->scores.data(), static_cast<int64_t>(p.B) * at.H * p.T, p.past + p.T, p.keep->pattern.data());
    }
    return;
  }
  // Materialised path: scores and pattern exist as tensors [B, H, T, S], hooks may read and edit them.
  const int64_t B = p.B, H = at.H, T = p.T, S = p.past + p.T;
  // (the reverse pass keeps them in its tape, whose buffers are reused block after block)
  std::vector<float> own_scores, own_pattern;
  std::vector<float>& scores = p.keep ? p.keep->scores : own_scores;
  std::vector<float>& pattern = p.keep ? p.keep->pattern : own_pattern;
  scores.resize(static_cast<size_t>(B * H * T * S));
  pattern.resize(scores.size());
  ops::attention_scores(at, scores.data());
  if (p.keep) p.keep->scores_in.clear();
  if (p.on(Site::AttnScores, l)) {
    if (p.keep) p.keep->scores_in = scores;  // the replay applies edits here: keep what they edited
    p.fire(Site::AttnScores, l, scores.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
  }
  ops::softmax_rows(scores.data(), B * H * T, S, pattern.data());
  if (p.keep) p.keep->pattern_in.clear();
  if (p.on(Site::Pattern, l)) {
    if (p.keep) p.keep->pattern_in = pattern;
    p.fire(Site::Pattern, l, pattern.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
  }
  ops::attention_apply(at, pattern.data(), p.z);
}

void Gemma3Model::mlp_block(int l, Pass& p) {
  const Gemma3Config& c = cfg_;
  LayerWeights& L = w_.layers[l];
  const int D = c.hidden_size, F = c.intermediate_size;
  const int64_t M = p.M;
  if (p.keep) LayerTape::save(p.keep->x_mid, p.x, M * D);
  norm(l, p, resid_norm(kLn2, L.pre_feedforward_layernorm, p.B, p.T, p.keep ? &p.keep->s_ln2 : nullptr), p.x, D, p.normed, D);
  L.gate_up.forward(p.normed, M, p.gate_up);
  p.resid(Site::MlpPre, l, p.gate_up, F, 2 * F);
  p.resid(Site::MlpPreLinear, l, p.gate_up + F, F, 2 * F);
  if (p.keep) LayerTape::save(p.keep->gate_up, p.gate_up, M * 2 * F);  // as edited at hook_pre / hook_pre_linear
  ops::gelu_tanh_mul(p.gate_up, p.gate_up + F, 2 * F, M, F, p.act);
  p.resid(Site::MlpPost, l, p.act, F, F);
  L.down_proj.forward(p.act, M, p.out);
  if (p.keep) LayerTape::save(p.keep->down, p.out, M * D);
  join_residual(l, p, resid_norm(kLn2Post, L.post_feedforward_layernorm, p.B, p.T, p.keep ? &p.keep->s_ln2_post : nullptr),
                Site::MlpOut, Site::ResidPost);
}

void Gemma3Model::final(Pass& p) {
  const Gemma3Config& c = cfg_;
  const ForwardArgs& a = p.a;
  const int D = c.hidden_size;
  if (a.logits_mode == LogitsMode::None && !p.on(Site::LnFinalScale, -1) && !p.on(Site::LnFinalNormalized, -1) &&
      !p.on(Site::LnFinalOut, -1))
    return;
  std::vector<float>* keep = a.tape ? &a.tape->final_scale : nullptr;
  int64_t rows = p.M;
  if (a.logits_mode == LogitsMode::Last) {  // each row's last position only: rows b at x + ((b + 1) T - 1) D
    rows = p.B;
    norm(-1, p, resid_norm(kLnFinal, w_.final_norm, p.B, 1, keep), p.x + static_cast<int64_t>(p.T - 1) * D,
         static_cast<int64_t>(p.T) * D, p.normed, D);
  } else {
    norm(-1, p, resid_norm(kLnFinal, w_.final_norm, p.B, p.T, keep), p.x, D, p.normed, D);
  }
  if (a.logits_mode == LogitsMode::None) return;
  w_.embed.forward(p.normed, rows, a.logits);  // the tied LM head
  if (c.final_logit_softcapping > 0) ops::softcap_inplace(a.logits, rows * c.vocab_size, static_cast<float>(c.final_logit_softcapping));
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
