// Private to the model's .cpp files: the state of one forward call, shared by the forward (gemma3.cpp) and the
// reverse pass (gemma3_grad.cpp), and the intermediates one block keeps for its VJP.
#pragma once
#include <cstdint>
#include <vector>

#include "model/gemma3.h"

namespace gemmalens {

// What the reverse pass needs from one block's forward (filled when Pass::keep is set): the inputs of each op whose
// VJP needs more than the weights.
struct LayerTape {
  std::vector<float> qkv;               // [M, (H + 2 KV) Hd] q/k before their norms, v
  std::vector<float> q, k, v;           // q, k after norm and RoPE (as rounded for a bf16 model), v
  std::vector<float> scores, pattern;   // [B, H, T, T] as the next step used them (after any edit at their sites)
  // Where the forward edited them (interventions at attn_scores / pattern): the values before the edit, which the
  // VJPs of softcap and softmax need. Empty otherwise.
  std::vector<float> scores_in, pattern_in;
  const float* scores_before_edit() const { return scores_in.empty() ? scores.data() : scores_in.data(); }
  const float* pattern_before_edit() const { return pattern_in.empty() ? pattern.data() : pattern_in.data(); }
  std::vector<float> attn_proj;         // [M, D] o_proj's output, before post_attention_layernorm
  std::vector<float> x_mid;             // [M, D] resid_mid
  std::vector<float> gate_up;           // [M, 2F]
  std::vector<float> down;              // [M, D] down_proj's output, before post_feedforward_layernorm
  // The scale each norm divided by (its hook_scale after any edit there), kept where the forward took the split
  // path (a hook at hook_scale / hook_normalized), empty otherwise: [M] or [M, heads].
  std::vector<float> s_ln1, s_q, s_k, s_ln1_post, s_ln2, s_ln2_post;
  const float* x_pre = nullptr;         // [M, D] resid_pre (the GradTape's)
  // Scratch of the block's VJP, reused block after block: d of the two post-norms' inputs [M, D], and of the
  // pattern and the scores [B, H, T, T].
  std::vector<float> d_branch, d_pattern, d_scores;
  static void save(std::vector<float>& dst, const float* src, int64_t n) { dst.assign(src, src + n); }
};

// One forward call: its shapes and positions, the RoPE tables, the hook set and the workspace's buffers.
struct Gemma3Model::Pass {
  const ForwardArgs& a;
  int B = 0, T = 0, Hd = 0;
  int64_t M = 0, past = 0;
  int n_layers = 0;                  // blocks to run (stop_at_layer, else all)
  std::vector<int32_t> row_start;    // [B] first real slot of each row
  std::vector<float> cos_local, sin_local, cos_global, sin_global;  // [M, Hd / 2] per RoPE base
  // Activations (workspace buffers; contents are scratch).
  float* x = nullptr;        // residual stream [M, D]
  float* normed = nullptr;   // a norm's output [M, D]
  float* qkv = nullptr;      // [M, (H + 2 KV) Hd]
  float* q = nullptr;        // [B, T, H, Hd]
  float* k = nullptr;        // [B, T, KV, Hd]
  float* v = nullptr;        // [B, T, KV, Hd]
  float* z = nullptr;        // [B, T, H, Hd], attention output per head
  float* out = nullptr;      // a block's output [M, D]
  float* gate_up = nullptr;  // [M, 2F]
  float* act = nullptr;      // [M, F]
  float* scale = nullptr;    // [2, M, H] a norm's scales (and, in the reverse pass, their gradients)
  HookSet* hooks = nullptr;   // the sites' actions (the forward's hooks; the reverse pass's gradient hooks)
  bool replay = false;        // the reverse pass running a block again: hooks apply their edits only
  HookSet* vjp = nullptr;     // the reverse pass: the forward's hooks, whose edits' VJPs follow the gradient hooks
  LayerTape* keep = nullptr;  // set by the reverse pass: the blocks keep what their VJPs need
  // Set by forward_pass for the last block when only each row's last position reaches anything (the next token's
  // logits, or none) and no hook or tape reads the others: past its attention the block runs on those B rows.
  bool last_rows_only = false;

  explicit Pass(const ForwardArgs& args) : a(args), hooks(args.hooks) {}
  // The RoPE tables of a layer: sliding layers use the local base, full layers the global one.
  const float* rope_cos(bool sliding) const { return sliding ? cos_local.data() : cos_global.data(); }
  const float* rope_sin(bool sliding) const { return sliding ? sin_local.data() : sin_global.data(); }
  void interrupt() const {
    if (a.interrupt_check) a.interrupt_check();
  }
  // Hook sites: TransformerLens shapes as views over the internal buffers (strides in floats).
  bool on(Site st, int layer) const { return (hooks && hooks->active(st, layer)) || (vjp && vjp->active(st, layer)); }
  void fire(Site st, int layer, float* p, std::vector<int64_t> shape, std::vector<int64_t> strides, int pos_axis = 1) const {
    const ActView v{p, std::move(shape), std::move(strides), pos_axis};
    if (vjp && vjp->active(st, layer)) vjp->run_inject(st, layer, v);  // readers of the site (a transcoder's input)
    if (hooks && hooks->active(st, layer)) hooks->run(st, layer, v, replay);
    if (vjp && vjp->active(st, layer)) vjp->run_vjp(st, layer, v);
  }
  void resid(Site st, int layer, float* p, int64_t width, int64_t ld) const {  // [B, T, width], row stride ld
    if (on(st, layer)) fire(st, layer, p, {B, T, width}, {T * ld, ld, 1});
  }
  void heads(Site st, int layer, float* p, int64_t nh, int64_t ld) const {  // [B, T, nh, Hd], row stride ld
    if (on(st, layer)) fire(st, layer, p, {B, T, nh, Hd}, {T * ld, ld, Hd, 1});
  }
  // The same buffer in TransformerLens's layout for q/k after their norms: [B, nh, T, Hd] (position axis 2).
  void heads_bhtd(Site st, int layer, float* p, int64_t nh, int64_t ld) const {
    if (on(st, layer)) fire(st, layer, p, {B, nh, T, Hd}, {T * ld, Hd, ld, 1}, 2);
  }
};

// One RMSNorm application and its three hook sites (hooks.h). Rows: token m, head h at x + m * ldx + h * W (nh = 1
// for the residual stream's norms); the sites see [Bv, Tv, .] or, per_head, [Bv, nh, Tv, .]. kept_scale: where a
// gradient run's tape keeps the scale the forward divided by (Gemma3Model::norm), null outside gradient runs.
struct NormCall {
  NormSites sites;
  const float* w = nullptr;  // [W] raw weight, applied as (1 + w)
  int W = 0, nh = 1;
  bool per_head = false;
  int Bv = 0, Tv = 0;
  std::vector<float>* kept_scale = nullptr;
  int64_t rows() const { return static_cast<int64_t>(Bv) * Tv; }
};

constexpr NormSites kLn1{Site::Ln1Scale, Site::Ln1Normalized, Site::Ln1Out};
constexpr NormSites kQNorm{Site::QNormScale, Site::QNormNormalized, Site::QNormOut};
constexpr NormSites kKNorm{Site::KNormScale, Site::KNormNormalized, Site::KNormOut};
constexpr NormSites kLn1Post{Site::Ln1PostScale, Site::Ln1PostNormalized, Site::Ln1PostOut};
constexpr NormSites kLn2{Site::Ln2Scale, Site::Ln2Normalized, Site::Ln2Out};
constexpr NormSites kLn2Post{Site::Ln2PostScale, Site::Ln2PostNormalized, Site::Ln2PostOut};
constexpr NormSites kLnFinal{Site::LnFinalScale, Site::LnFinalNormalized, Site::LnFinalOut};

// A norm over the residual stream's rows [B, T, W] / one per head of q or k.
inline NormCall resid_norm(NormSites s, const std::vector<float>& w, int B, int T, std::vector<float>* keep) {
  NormCall n;
  n.sites = s;
  n.w = w.data();
  n.W = static_cast<int>(w.size());
  n.Bv = B;
  n.Tv = T;
  n.kept_scale = keep;
  return n;
}
inline NormCall head_norm(NormSites s, const std::vector<float>& w, int nh, int B, int T, std::vector<float>* keep) {
  NormCall n = resid_norm(s, w, B, T, keep);
  n.nh = nh;
  n.per_head = true;
  return n;
}

}  // namespace gemmalens
