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
  HookSet* hooks = nullptr;   // the sites' actions (the forward's hooks; the reverse pass's gradient hooks)
  bool replay = false;        // the reverse pass running a block again: hooks apply their edits only
  HookSet* vjp = nullptr;     // the reverse pass: the forward's hooks, whose edits' VJPs follow the gradient hooks
  LayerTape* keep = nullptr;  // set by the reverse pass: the blocks keep what their VJPs need

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
};

}  // namespace gemmalens
