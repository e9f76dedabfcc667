// The Gemma 3 text model: weights and the forward pass (gemma3.cpp reads top to bottom like HF's
// Gemma3ForCausalLM). Loading formats live in io/, bindings in bindings/.
#pragma once
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <memory>
#include <vector>

#include "common.h"
#include "model/config.h"
#include "model/hooks.h"
#include "model/kv_cache.h"
#include "ops/linear.h"

namespace gemmalens {

struct LayerTape;  // model/pass.h
struct NormCall;   // model/pass.h

// Shapes use D = hidden_size, F = intermediate_size, H/KV = heads, Hd = head_dim, V = vocab_size.
struct LayerWeights {
  std::vector<float> input_layernorm;             // [D]  raw w; applied as (1 + w)
  ops::Linear qkv;                                // [(H + 2 KV) Hd, D] = q_proj | k_proj | v_proj
  std::vector<float> q_norm, k_norm;              // [Hd]
  ops::Linear o_proj;                             // [D, H Hd]
  std::vector<float> post_attention_layernorm;    // [D]
  std::vector<float> pre_feedforward_layernorm;   // [D]
  ops::Linear gate_up;                            // [2 F, D] = gate_proj | up_proj
  ops::Linear down_proj;                          // [D, F]
  std::vector<float> post_feedforward_layernorm;  // [D]
};

struct Weights {
  ops::Linear embed;               // [V, D] plain row-major: embedding lookup and tied LM head
  std::vector<LayerWeights> layers;
  std::vector<float> final_norm;   // [D]
};

// Supplies a tensor by its HF name (e.g. "model.layers.3.self_attn.q_proj.weight") as f32 of the
// expected shape; each format (safetensors, GGUF, ...) implements one. Throws CheckpointError.
using TensorGetter = std::function<std::vector<float>(const std::string& hf_name, const std::vector<int64_t>& shape)>;
// Optional: rows [r0, r0 + n) of a 2-D tensor as f32 into out (n * shape[1] floats), same checks as the getter.
// Formats that can slice (safetensors, GGUF) supply one so the large embedding is converted in chunks, never
// held whole as f32 (that temporary was most of the load's peak memory).
using RowGetter = std::function<void(const std::string& hf_name, const std::vector<int64_t>& shape, int64_t r0, int64_t n,
                                     float* out)>;

// Checks that a tensor exists with this shape (throws CheckpointError otherwise) without reading it. The model
// runs it over every weight before allocating anything, so a config that does not match the file fails before
// gigabytes are sized from it.
using TensorChecker = std::function<void(const std::string& hf_name, const std::vector<int64_t>& shape)>;

// What a weight is, whatever a format calls it.
enum class WeightRole {
  Embed,                                                   // model.embed_tokens
  InputNorm, QProj, KProj, VProj, QNorm, KNorm, OProj,     // model.layers.N.*, in load order
  PostAttentionNorm, PreFeedforwardNorm, GateProj, UpProj, DownProj, PostFeedforwardNorm,
  FinalNorm,                                               // model.norm
};
// One weight: its HF name and HF shape, its role, and its layer (-1 outside the blocks).
struct WeightSpec {
  std::string name;
  std::vector<int64_t> shape;
  WeightRole role;
  int layer;
  bool is_norm() const;  // an RMSNorm weight (applied as 1 + w)
};

// Every weight of a model with this config, in load order: the one list of weight names and shapes. The model
// (constructor, export_tensors) and the formats' name maps derive from it.
void for_each_weight(const Gemma3Config& cfg, const std::function<void(const WeightSpec&)>& fn);

enum class LogitsMode { All, Last, None };

struct LayerTape;  // model/pass.h

// What a forward keeps for a reverse pass (ForwardArgs::tape): its input and the residual stream entering each
// block and leaving the last. When all blocks' intermediates fit keep_bytes, the forward keeps them too (layers)
// and the reverse pass uses them, releasing each after its block's VJP; otherwise the reverse pass recomputes them
// one block at a time from the block's input (a second forward's work, in little memory).
struct GradTape {
  int B = 0, T = 0;
  std::vector<int32_t> tokens, row_start;  // [B, T], [B]
  std::vector<std::vector<float>> resid;   // n_layers + 1 of [B, T, D]
  std::vector<std::shared_ptr<LayerTape>> layers;  // n_layers, or empty
  std::vector<float> final_scale;          // [B * T] the final norm's scale where the forward split it (see LayerTape)
  int64_t keep_bytes = int64_t(2) << 30;
  bool ready = false;                      // a forward filled it
};

// The reverse pass: gradients of a scalar metric flow from dMetric/dLogits back to the embedding; each hook site
// fires with the gradient arriving there (grad_hooks: capture, edit, Python hooks, as in a forward).
struct BackwardArgs {
  GradTape* tape = nullptr;
  const float* dlogits = nullptr;  // [B, T, V]
  const float* logits = nullptr;   // [B, T, V] the forward's logits: needed when final_logit_softcapping is set
  HookSet* grad_hooks = nullptr;
  HookSet* forward_hooks = nullptr;  // the forward's hooks: their edits are replayed and their VJPs applied
  std::function<void()> interrupt_check;
};

struct ForwardArgs {
  const int32_t* tokens = nullptr;     // [B, T]
  int B = 0, T = 0;
  const int32_t* row_start = nullptr;  // [B] left-padding count per row, or null (no padding)
  KVCache* cache = nullptr;            // appends when set; positions continue from cache->seq_len()
  // [B] the cache row each row of the batch uses (some of the cache's rows: continuous batching); null: row b uses
  // cache row b, and B equals the cache's batch.
  const int32_t* cache_rows = nullptr;
  LogitsMode logits_mode = LogitsMode::All;
  float* logits = nullptr;             // [B, T, V] (All) or [B, V] (Last)
  HookSet* hooks = nullptr;            // hook actions to run at the sites (null: none)
  int stop_at_layer = -1;              // >= 0: run blocks [0, stop_at_layer) only, no logits
  float* resid_out = nullptr;          // with stop_at_layer: the residual stream [B, T, D] there
  bool allow_longer = false;           // positions past max_position_embeddings (RoPE never trained there)
  GradTape* tape = nullptr;            // keep what a reverse pass needs (all-position logits, no cache)
  // Called between layers; throws to abandon the pass (Ctrl-C). The cache is left as it was before the call.
  std::function<void()> interrupt_check;
};

// About how many bytes a model's weights take once loaded in this dtype / quantisation (the matmul weights at the
// dtype's size, or int8 / int4 blocks of 32 with a float scale each; norms in f32). Checked against the memory
// available before anything is allocated.
uint64_t planned_weight_bytes(const Gemma3Config& cfg, DType dtype, WeightQuant quant);
// Memory this process may still take: /proc/meminfo's MemAvailable, lowered to the cgroup v2 limit's headroom
// (memory.max - memory.current) when one is set. 0 when unknown.
uint64_t available_memory_bytes();
// Refuses a buffer of `bytes` that a pass would allocate when it exceeds available_memory_bytes(), with a
// ResourceError saying what it is for and `fix` (the alternative is the OOM killer, or minutes of swapping, after a
// long input). GEMMALENS_NO_MEMORY_CHECK=1 skips it, as it does the weights' check.
void check_fits_memory(uint64_t bytes, const std::string& what, const std::string& fix);

class Gemma3Model {
 public:
  // quant: keep every matmul weight as int8 or int4 blocks of 32 (ops/quant.h); with int4 the embedding / LM head
  // is int8.
  // check: when given, run over every weight (for_each_weight) before anything is allocated.
  Gemma3Model(const Gemma3Config& cfg, DType dtype, const TensorGetter& get, WeightQuant quant = WeightQuant::None,
              const RowGetter& rows = nullptr, const TensorChecker& check = nullptr);
  // How the weights are held: the requested quantisation where the CPU took it (int4: the embedding / LM head is
  // int8), else None.
  WeightQuant weight_quant() const { return quant_; }
  const Gemma3Config& config() const { return cfg_; }
  DType dtype() const { return dtype_; }
  size_t weight_nbytes() const;
  int threads = 0;  // 0 = OpenMP default
  // Inputs longer than this many positions that need no per-position output (last-position logits or none; no hooks,
  // no tape, no stop_at_layer) run as consecutive passes of at most this many positions through the KV cache (a
  // temporary one when none is given): the same function, with the activations of a chunk instead of the whole
  // input (a 32k-token prefill of 270m: ~2 GB of them otherwise). 0: never.
  int64_t prefill_chunk = 2048;

  // Thread-safe (one forward at a time per model).
  void forward(const ForwardArgs& args);
  // The reverse of the forward that filled args.tape (gemma3_grad.cpp), block by block.
  void backward(const BackwardArgs& args);
  // Every weight under its HF name, HF layout, as f32 (q/k/v and gate/up split again): fn(name, shape, data).
  // Every weight (or those want() accepts, nothing else widened) as HF-layout f32: fn(HF name, shape, data).
  void export_tensors(const std::function<void(const std::string&, const std::vector<int64_t>&, const float*)>& fn,
                      const std::function<bool(const std::string&)>& want = nullptr) const;
  // Final norm and tied LM head on residual vectors: x [M, D] -> logits [M, V] (logit lens).
  void unembed(const float* x, int64_t M, float* logits);

 private:
  // The forward, block by block (gemma3.cpp); a Pass carries one call's shapes, positions and buffers.
  struct Pass;
  std::vector<int32_t> validate(const ForwardArgs& a) const;  // throws before anything is touched; row starts
  Pass prepare(const ForwardArgs& a);
  void forward_pass(const ForwardArgs& a);  // one pass over the whole input (the lock held)
  bool chunked(const ForwardArgs& a) const;  // whether forward() runs `a` in chunks of prefill_chunk positions
  void forward_chunks(const ForwardArgs& a);
  void embed(const int32_t* tokens, int64_t M, float* x) const;
  void attention_block(int l, Pass& p);  // x += post_attention_norm(o_proj(attention(input_norm(x))))
  void attend(int l, Pass& p);           // z from q, k, v (and the cache): fast kernel or materialised for hooks
  void mlp_block(int l, Pass& p);        // x += post_feedforward_norm(down(gelu_tanh(gate) * up))
  // A block's branch output (in the pass's out buffer) joins the residual stream: post-norm, then x += it; fires
  // the norm's, the branch's and the residual stream's hook sites.
  void join_residual(int l, Pass& p, const NormCall& post_norm, Site out_site, Site resid_site);
  void final(Pass& p);                   // final norm and the tied LM head
  // y = rmsnorm(x) at its three hook sites (hook_scale, hook_normalized, hook_out): one fused kernel unless a hook (or
  // a gradient run's replay) is at the first two, then TransformerLens's steps scale -> x / scale -> * (1 + w).
  void norm(int l, Pass& p, const NormCall& n, const float* x, int64_t ldx, float* y, int64_t ldy);
  // Its VJP: gy (the gradient at y, row stride ldy; overwritten) -> dx (written, or added with accumulate); fires the
  // same sites in reverse order.
  void norm_backward(int l, Pass& p, const NormCall& n, const float* x, int64_t ldx, float* gy, int64_t ldy, float* dx,
                     int64_t ldd, bool accumulate);
  // Their VJPs (gemma3_grad.cpp): dx [M, D] holds the gradient at the block's output and leaves with its input's.
  // The tape is read (the block's intermediates) and lends its scratch buffers.
  void attention_block_backward(int l, Pass& p, LayerTape& t, float* dx);
  void mlp_block_backward(int l, Pass& p, LayerTape& t, float* dx);
  // Activation buffers, grown on demand and reused across calls (no page faults in steady state).
  struct Workspace {
    std::vector<float> x, normed, qkv, q, k, v, z, out, gate_up, act, scale;
  };
  Gemma3Config cfg_;
  Workspace ws_;
  DType dtype_;
  WeightQuant quant_ = WeightQuant::None;
  Weights w_;
  std::mutex mu_;
};

}  // namespace gemmalens
