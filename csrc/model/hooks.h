// Hook points: TransformerLens names and placements for Gemma 3, one table (kHookSites) as the single source
// of truth. The forward pass calls HookSet::run at every site; with nothing registered a site costs one branch.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace gemmalens {

// Every RMSNorm has TransformerLens's three sites (as its RMSNorm / TransformerBridge norm components fire them):
// hook_scale = sqrt(mean(x^2) + eps) [..., 1], hook_normalized = x / scale (before the weight), hook_out =
// normalized * (1 + w) (what the next step reads). q_norm / k_norm act per head in TransformerLens's layout
// [B, heads, T, Hd] (as HF applies them, after its transpose), and so do hook_q_normed / hook_k_normed.
enum class Site : int {
  Embed,             // hook_embed                            [B, T, D] (after the sqrt(D) scale)
  ResidPre,          // blocks.i.hook_resid_pre               [B, T, D]
  Ln1Scale,          // blocks.i.ln1.hook_scale               [B, T, 1]
  Ln1Normalized,     // blocks.i.ln1.hook_normalized          [B, T, D]  x / scale
  Ln1Out,            // blocks.i.ln1.hook_out                 [B, T, D]  normalized * (1 + w): input of q/k/v
  Q,                 // blocks.i.attn.hook_q                  [B, T, H, Hd]  (projection, before q_norm)
  K,                 // blocks.i.attn.hook_k                  [B, T, KV, Hd]
  V,                 // blocks.i.attn.hook_v                  [B, T, KV, Hd]
  QNormScale,        // blocks.i.attn.q_norm.hook_scale       [B, H, T, 1]
  QNormNormalized,   // blocks.i.attn.q_norm.hook_normalized  [B, H, T, Hd]
  QNormOut,          // blocks.i.attn.q_norm.hook_out         [B, H, T, Hd]
  QNormed,           // blocks.i.attn.hook_q_normed           [B, H, T, Hd]  (q_norm's output, before RoPE)
  KNormScale,        // blocks.i.attn.k_norm.hook_scale       [B, KV, T, 1]
  KNormNormalized,   // blocks.i.attn.k_norm.hook_normalized  [B, KV, T, Hd]
  KNormOut,          // blocks.i.attn.k_norm.hook_out         [B, KV, T, Hd]
  KNormed,           // blocks.i.attn.hook_k_normed           [B, KV, T, Hd]
  RotQ,              // blocks.i.attn.hook_rot_q              [B, T, H, Hd]  (after RoPE)
  RotK,              // blocks.i.attn.hook_rot_k              [B, T, KV, Hd]
  AttnScores,        // blocks.i.attn.hook_attn_scores        [B, H, T, S]   (S = cached + new keys; masked: -inf)
  Pattern,           // blocks.i.attn.hook_pattern            [B, H, T, S]   (masked: 0)
  Z,                 // blocks.i.attn.hook_z                  [B, T, H, Hd]  (input of o_proj)
  Ln1PostScale,      // blocks.i.ln1_post.hook_scale          [B, T, 1]      (of o_proj's output)
  Ln1PostNormalized, // blocks.i.ln1_post.hook_normalized     [B, T, D]
  Ln1PostOut,        // blocks.i.ln1_post.hook_out            [B, T, D]
  AttnOut,           // blocks.i.hook_attn_out                [B, T, D]      (= ln1_post.hook_out: added to the residual)
  ResidMid,          // blocks.i.hook_resid_mid               [B, T, D]
  Ln2Scale,          // blocks.i.ln2.hook_scale               [B, T, 1]
  Ln2Normalized,     // blocks.i.ln2.hook_normalized          [B, T, D]
  Ln2Out,            // blocks.i.ln2.hook_out                 [B, T, D]      (input of gate/up)
  MlpPre,            // blocks.i.mlp.hook_pre                 [B, T, F]      (gate pre-activation)
  MlpPreLinear,      // blocks.i.mlp.hook_pre_linear          [B, T, F]      (up projection)
  MlpPost,           // blocks.i.mlp.hook_post                [B, T, F]      (gelu(gate) * up)
  Ln2PostScale,      // blocks.i.ln2_post.hook_scale          [B, T, 1]      (of down_proj's output)
  Ln2PostNormalized, // blocks.i.ln2_post.hook_normalized     [B, T, D]
  Ln2PostOut,        // blocks.i.ln2_post.hook_out            [B, T, D]
  MlpOut,            // blocks.i.hook_mlp_out                 [B, T, D]      (= ln2_post.hook_out)
  ResidPost,         // blocks.i.hook_resid_post              [B, T, D]
  LnFinalScale,      // ln_final.hook_scale                   [B, T, 1]
  LnFinalNormalized, // ln_final.hook_normalized              [B, T, D]
  LnFinalOut,        // ln_final.hook_out                     [B, T, D]      (input of the unembedding)
  Count
};

// The three sites of one norm.
struct NormSites {
  Site scale, normalized, out;
};

struct HookSiteInfo {
  Site site;
  const char* suffix;  // full name = suffix (model-level) or "blocks.{i}." + suffix
  bool per_layer;
};
extern const HookSiteInfo kHookSites[static_cast<int>(Site::Count)];

// All hook names in forward order for a model with n_layers blocks.
std::vector<std::string> hook_names(int n_layers);

// A strided float32 view of an activation (strides in elements).
struct ActView {
  float* data = nullptr;
  std::vector<int64_t> shape, strides;
  int pos_axis = 1;  // the position axis (2 for scores/pattern)
  int64_t numel() const;
  template <class F>
  void for_each(F&& f) const {  // f(float&, const int64_t* index), row-major order
    const int nd = static_cast<int>(shape.size());
    int64_t idx[4] = {0, 0, 0, 0};
    const int64_t n = numel();
    for (int64_t k = 0; k < n; ++k) {
      int64_t off = 0;
      for (int d = 0; d < nd; ++d) off += idx[d] * strides[d];
      f(data[off], idx);
      for (int d = nd - 1; d >= 0; --d) {
        if (++idx[d] < shape[d]) break;
        idx[d] = 0;
      }
    }
  }
  void copy_out(float* dst) const;      // to a contiguous buffer
  void copy_in(const float* src) const; // from a contiguous buffer
};

// One thing to do at a site.
struct HookAction {
  enum Kind { Capture, Callback, Add, Replace, Scale, Zero, AblateHeads, ProjectOut, AblateFeatures } kind = Capture;
  std::vector<float> values;       // Add: [inner]; Replace: the activation (or [T, ...]); ProjectOut: direction
  std::vector<int64_t> values_shape;
  std::vector<int64_t> positions;  // indices on the position axis (negative from the end); empty = all
  std::vector<int64_t> rows;       // indices on the batch axis it applies to; empty = all (one request of a batch)
  float scale = 1.f;
  std::vector<int64_t> heads;      // AblateHeads
  bool mean = false;               // AblateHeads: mean over batch and positions instead of zero
  int callback = -1;               // Callback: index into HookSet::callbacks
  // AblateFeatures (an SAE's features f at its own site): enc [n_f, d] (W_enc columns), b_enc / threshold [n_f],
  // dec [n_f, d] (W_dec rows), b_dec [d] subtracted from the input when set; relu_only: no threshold.
  std::vector<float> f_enc, f_b_enc, f_threshold, f_dec, f_b_dec;
  // AblateFeatures: which features were on at each selected position in the last run ([B * T * n_f], for the VJP).
  std::vector<uint8_t> f_on;
  // Capture: filled by the forward pass.
  std::shared_ptr<float[]> captured;  // uninitialised storage, filled by the copy
  std::vector<int64_t> captured_shape;
};

class HookSet {
 public:
  HookSet(int n_layers) : n_layers_(n_layers), actions_((n_layers + 1) * static_cast<int>(Site::Count)) {}
  // layer: block index, or -1 for model-level sites.
  bool active(Site s, int layer) const { return !actions_[index(s, layer)].empty(); }
  std::vector<HookAction>& at(Site s, int layer) { return actions_[index(s, layer)]; }
  // replay: a reverse pass running a block again applies the edits only: no captures, and each Python hook gives
  // back what it returned in the recorded forward (CallMode::Replay) instead of running again.
  void run(Site s, int layer, const ActView& v, bool replay = false);
  // The VJP of this site's edits (in reverse order) on the gradient g arriving at the site's output: the gradient
  // at its input. Captures and additions pass it unchanged; a Python hook's comes from Python (CallMode::Vjp).
  void run_vjp(Site s, int layer, const ActView& g);
  // The reverse pass, before the gradient hooks at a site: Python hooks that read the site's output for use at a
  // later site (a transcoder's input) add the gradient that came back that way (CallMode::Inject), so that the
  // site's gradient, as captured and as backward hooks see it, includes it.
  void run_inject(Site s, int layer, const ActView& g);
  void clear();
  bool empty() const;
  int n_layers() const { return n_layers_; }
  // Bridge to Python callbacks (set by the bindings): (callback index, site, layer, view, mode). Forward: the hook
  // runs on the activation and may edit it; Replay: the view gets the hook's recorded output again; Vjp: the view
  // holds the gradient at the hook's output and gets the gradient at its input; Inject: the gradient at the site's
  // output, to which the hook may add (see run_inject).
  enum class CallMode { Forward, Replay, Vjp, Inject };
  std::function<void(int, Site, int, const ActView&, CallMode)> call;

 private:
  size_t index(Site s, int layer) const { return static_cast<size_t>(layer + 1) * static_cast<int>(Site::Count) + static_cast<int>(s); }
  int n_layers_;
  std::vector<std::vector<HookAction>> actions_;
};

}  // namespace gemmalens
