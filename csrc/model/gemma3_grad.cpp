// The reverse pass: the vector-Jacobian product of the forward in gemma3.cpp, block by block in reverse order.
// The forward kept the residual stream entering each block (GradTape); each block is run again with Pass::keep set
// (its intermediates kept), then its VJP runs. Gradients are f32 whatever the weights' dtype; matmul VJPs go
// through the weights as stored (ops::Linear::backward_input). bf16 roundings of activations count as identity.
// Each hook site fires on the gradient arriving there (TransformerLens's backward hooks): a capture records it,
// an edit changes what flows on.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "model/gemma3.h"
#include "model/pass.h"
#include "ops/grad.h"
#include "ops/kernels.h"
#include "ops/linear.h"

namespace gemmalens {

void Gemma3Model::backward(const BackwardArgs& g) {
  std::lock_guard<std::mutex> lock(mu_);
  if (threads > 0) ops::set_num_threads(threads);
  const Gemma3Config& c = cfg_;
  GradTape* tape = g.tape;
  if (!tape || !tape->ready) throw ValueError("backward: no forward pass was recorded for it (run the forward with a tape first)");
  if (!g.dlogits) throw ValueError("backward: dMetric/dLogits is missing");
  const size_t resid_size = static_cast<size_t>(tape->B) * tape->T * c.hidden_size;
  bool fits = tape->resid.size() == static_cast<size_t>(c.num_hidden_layers) + 1 && tape->tokens.size() == static_cast<size_t>(tape->B) * tape->T;
  for (const auto& r : tape->resid) fits = fits && r.size() == resid_size;
  if (!fits) throw ValueError("backward: the tape was recorded by another model (its layers or hidden size differ)");
  if (c.final_logit_softcapping > 0 && !g.logits)
    throw ValueError("backward: this model soft-caps its logits; the forward's logits are needed for the reverse pass");
  for (HookSet* h : {g.grad_hooks, g.forward_hooks})
    if (h && h->n_layers() != c.num_hidden_layers) throw ValueError("backward: the hook set was made for another model");

  ForwardArgs fa;  // the recorded forward again, one block at a time, with the gradient hooks at its sites
  fa.tokens = tape->tokens.data();
  fa.B = tape->B;
  fa.T = tape->T;
  fa.row_start = tape->row_start.data();
  fa.allow_longer = true;  // checked when the tape was recorded
  fa.hooks = g.grad_hooks;
  fa.interrupt_check = g.interrupt_check;
  Pass p = prepare(fa);
  p.vjp = g.forward_hooks;
  const int D = c.hidden_size;
  const int64_t M = p.M, V = c.vocab_size;
  std::vector<float> dx(static_cast<size_t>(M) * D), dl;
  struct ReleaseScratch {  // the widened-weights buffer goes back when the pass ends, normally or not
    ~ReleaseScratch() { ops::release_backward_scratch(); }
  } release_scratch;

  // ---- final norm and the tied LM head: logits = softcap(final_norm(x) E^T) ----
  const float* dlogits = g.dlogits;
  if (c.final_logit_softcapping > 0) {
    dl.assign(g.dlogits, g.dlogits + M * V);
    ops::softcap_backward(g.logits, dl.data(), M * V, static_cast<float>(c.final_logit_softcapping));
    dlogits = dl.data();
  }
  w_.embed.backward_input(dlogits, M, p.normed);  // d final_norm output [M, D]
  const float* x_final = tape->resid[c.num_hidden_layers].data();
  norm_backward(-1, p, resid_norm(kLnFinal, w_.final_norm, p.B, p.T, &tape->final_scale), x_final, D, p.normed, D, dx.data(), D,
                false);

  // ---- the blocks, last to first: each one's VJP from the intermediates the forward kept or, where it kept none,
  // from the block run again from its recorded input (the forward's edits replayed, no captures or gradient hooks) --
  bool kept = tape->layers.size() == static_cast<size_t>(c.num_hidden_layers);
  for (const auto& lt : tape->layers) kept = kept && lt != nullptr;
  LayerTape scratch;
  for (int l = c.num_hidden_layers - 1; l >= 0; --l) {
    p.interrupt();
    p.resid(Site::ResidPost, l, dx.data(), D, D);
    LayerTape& t = kept ? *tape->layers[l] : scratch;
    t.x_pre = tape->resid[l].data();
    if (!kept) {
      std::memcpy(p.x, t.x_pre, sizeof(float) * M * D);
      p.hooks = g.forward_hooks;
      p.replay = true;
      p.vjp = nullptr;
      p.keep = &t;
      attention_block(l, p);
      mlp_block(l, p);
    }
    p.keep = nullptr;
    p.hooks = g.grad_hooks;
    p.replay = false;
    p.vjp = g.forward_hooks;
    mlp_block_backward(l, p, t, dx.data());
    attention_block_backward(l, p, t, dx.data());
    if (kept) tape->layers[l].reset();  // done with: its memory goes back now
  }
  tape->layers.clear();  // a second reverse pass over this tape recomputes the blocks
  p.resid(Site::Embed, -1, dx.data(), D, D);
}

void Gemma3Model::norm_backward(int l, Pass& p, const NormCall& n, const float* x, int64_t ldx, float* gy, int64_t ldy, float* dx,
                                int64_t ldd, bool accumulate) {
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const int64_t M = n.rows(), nh = n.nh, W = n.W, B = n.Bv, T = n.Tv;
  auto fire = [&](Site st, float* ptr, int64_t width, int64_t ld) {  // the forward's views (Gemma3Model::norm)
    if (!p.on(st, l)) return;
    if (n.per_head)
      p.fire(st, l, ptr, {B, nh, T, width}, {T * ld, width, ld, 1}, 2);
    else
      p.fire(st, l, ptr, {B, T, width}, {T * ld, ld, 1});
  };
  fire(n.sites.out, gy, W, ldy);
  if (!p.on(n.sites.scale, l) && !p.on(n.sites.normalized, l)) {  // the fused VJP
    if (n.per_head)
      ops::rmsnorm_heads_backward(x, ldx, n.nh, n.W, n.w, eps, M, gy, dx, ldd);  // gy [M, nh, W] contiguous
    else
      ops::rmsnorm_backward(x, ldx, n.w, eps, M, n.W, gy, ldy, dx, ldd, accumulate);
    return;
  }
  // y = (x / s_used) (1 + w), s = sqrt(mean(x^2) + eps) edited at hook_scale into s_used
  ops::rms_gain(gy, ldy, n.nh, n.W, n.w, M);  // the gradient at hook_normalized
  fire(n.sites.normalized, gy, W, ldy);
  float* s_used = p.scale;
  float* gs = p.scale + M * nh;
  if (n.kept_scale && static_cast<int64_t>(n.kept_scale->size()) == M * nh)
    s_used = n.kept_scale->data();  // what the forward divided by, after the edits at hook_scale
  else
    ops::rms_scale(x, ldx, n.nh, n.W, eps, M, s_used);
  ops::rms_scale_grad(x, ldx, n.nh, n.W, s_used, M, gy, ldy, gs);
  if (n.per_head)
    p.fire(n.sites.scale, l, gs, {B, nh, T, 1}, {T * nh, 1, nh, 1}, 2);
  else
    p.fire(n.sites.scale, l, gs, {B, T, 1}, {T, 1, 1});
  ops::rms_divide_backward(x, ldx, n.nh, n.W, eps, s_used, M, gy, ldy, gs, dx, ldd, accumulate);
}

void Gemma3Model::mlp_block_backward(int l, Pass& p, LayerTape& t, float* dx) {
  const Gemma3Config& c = cfg_;
  LayerWeights& L = w_.layers[l];
  const int D = c.hidden_size, F = c.intermediate_size;
  const int64_t M = p.M;
  // x_post = x_mid + post_ffw_norm(down(gelu(gate) * up)), gate | up = gate_up(pre_ffw_norm(x_mid))
  std::memcpy(p.out, dx, sizeof(float) * M * D);  // d mlp_out
  p.resid(Site::MlpOut, l, p.out, D, D);  // the reverse of the forward's order at one buffer
  t.d_branch.resize(static_cast<size_t>(M) * D);
  norm_backward(l, p, resid_norm(kLn2Post, L.post_feedforward_layernorm, p.B, p.T, &t.s_ln2_post), t.down.data(), D, p.out, D,
                t.d_branch.data(), D, false);
  L.down_proj.backward_input(t.d_branch.data(), M, p.act);  // d act [M, F]
  p.resid(Site::MlpPost, l, p.act, F, F);
  ops::gelu_tanh_mul_backward(t.gate_up.data(), t.gate_up.data() + F, 2 * F, M, F, p.act, p.gate_up, p.gate_up + F, 2 * F);
  p.resid(Site::MlpPreLinear, l, p.gate_up + F, F, 2 * F);
  p.resid(Site::MlpPre, l, p.gate_up, F, 2 * F);
  L.gate_up.backward_input(p.gate_up, M, p.normed);  // d ln2 output
  norm_backward(l, p, resid_norm(kLn2, L.pre_feedforward_layernorm, p.B, p.T, &t.s_ln2), t.x_mid.data(), D, p.normed, D, dx, D,
                true);
  p.resid(Site::ResidMid, l, dx, D, D);
}

void Gemma3Model::attention_block_backward(int l, Pass& p, LayerTape& t, float* dx) {
  const Gemma3Config& c = cfg_;
  LayerWeights& L = w_.layers[l];
  const int D = c.hidden_size, H = c.num_attention_heads, KV = c.num_key_value_heads, Hd = c.head_dim, QKV = (H + 2 * KV) * Hd;
  const int64_t M = p.M, B = p.B, T = p.T;
  const bool sliding = c.is_sliding(l);
  // x_mid = x_pre + post_attn_norm(o_proj(z)), z = attention(rope(q_norm(q)), rope(k_norm(k)), v), q|k|v = qkv(ln1(x_pre))
  std::memcpy(p.out, dx, sizeof(float) * M * D);  // d attn_out
  p.resid(Site::AttnOut, l, p.out, D, D);
  t.d_branch.resize(static_cast<size_t>(M) * D);
  norm_backward(l, p, resid_norm(kLn1Post, L.post_attention_layernorm, p.B, p.T, &t.s_ln1_post), t.attn_proj.data(), D, p.out, D,
                t.d_branch.data(), D, false);
  L.o_proj.backward_input(t.d_branch.data(), M, p.z);  // d z [B, T, H, Hd]
  p.heads(Site::Z, l, p.z, H, H * Hd);

  ops::AttentionArgs at;
  at.B = p.B; at.T = p.T; at.H = H; at.KV = KV; at.Hd = Hd;
  at.q = t.q.data(); at.k_new = t.k.data(); at.v_new = t.v.data();
  at.row_start = p.row_start.data();
  at.window = sliding ? c.sliding_window : 0;
  at.scale = static_cast<float>(std::pow(c.query_pre_attn_scalar, -0.5));
  at.softcap = static_cast<float>(c.attn_logit_softcapping);
  const int64_t S = T;
  std::vector<float>& d_pattern = t.d_pattern;
  std::vector<float>& d_scores = t.d_scores;
  d_pattern.resize(static_cast<size_t>(B * H * T * S));
  d_scores.resize(d_pattern.size());
  ops::attention_apply_backward(at, t.pattern.data(), p.z, d_pattern.data(), p.v);  // d v [B, T, KV, Hd]
  if (p.on(Site::Pattern, l)) p.fire(Site::Pattern, l, d_pattern.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
  ops::softmax_rows_backward(t.pattern_before_edit(), d_pattern.data(), B * H * T, S, d_scores.data());
  if (p.on(Site::AttnScores, l)) p.fire(Site::AttnScores, l, d_scores.data(), {B, H, T, S}, {H * T * S, T * S, S, 1}, 2);
  ops::attention_scores_backward(at, t.scores_before_edit(), d_scores.data(), p.q, p.k);
  p.heads(Site::RotK, l, p.k, KV, KV * Hd);
  p.heads(Site::RotQ, l, p.q, H, H * Hd);
  ops::rope_apply(p.q, M, H, Hd, p.rope_cos(sliding), p.rope_sin(sliding), /*inverse=*/true);
  ops::rope_apply(p.k, M, KV, Hd, p.rope_cos(sliding), p.rope_sin(sliding), /*inverse=*/true);
  // k_norm, then q_norm (the forward's order reversed), each writing its part of the fused qkv gradient
  p.heads_bhtd(Site::KNormed, l, p.k, KV, KV * Hd);
  norm_backward(l, p, head_norm(kKNorm, L.k_norm, KV, p.B, p.T, &t.s_k), t.qkv.data() + H * Hd, QKV, p.k, KV * Hd,
                p.qkv + H * Hd, QKV, false);
  p.heads_bhtd(Site::QNormed, l, p.q, H, H * Hd);
  norm_backward(l, p, head_norm(kQNorm, L.q_norm, H, p.B, p.T, &t.s_q), t.qkv.data(), QKV, p.q, H * Hd, p.qkv, QKV, false);
  for (int64_t m = 0; m < M; ++m) std::memcpy(p.qkv + m * QKV + (H + KV) * Hd, p.v + m * KV * Hd, sizeof(float) * KV * Hd);
  p.heads(Site::V, l, p.qkv + (H + KV) * Hd, KV, QKV);
  p.heads(Site::K, l, p.qkv + H * Hd, KV, QKV);
  p.heads(Site::Q, l, p.qkv, H, QKV);
  L.qkv.backward_input(p.qkv, M, p.normed);  // d ln1 output
  norm_backward(l, p, resid_norm(kLn1, L.input_layernorm, p.B, p.T, &t.s_ln1), t.x_pre, D, p.normed, D, dx, D, true);
  p.resid(Site::ResidPre, l, dx, D, D);
}

}  // namespace gemmalens
