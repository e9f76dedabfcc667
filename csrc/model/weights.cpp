// The model's weights: their one list (for_each_weight), Weights built from any format through a TensorGetter (HF
// names, HF layouts), and exported back the same way.
#include <cstdio>
#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <fstream>
#include <sstream>
#include <string>

#include "model/gemma3.h"

namespace gemmalens {

bool WeightSpec::is_norm() const {
  switch (role) {
    case WeightRole::InputNorm: case WeightRole::QNorm: case WeightRole::KNorm: case WeightRole::PostAttentionNorm:
    case WeightRole::PreFeedforwardNorm: case WeightRole::PostFeedforwardNorm: case WeightRole::FinalNorm:
      return true;
    default:
      return false;
  }
}

void for_each_weight(const Gemma3Config& cfg, const std::function<void(const WeightSpec&)>& fn) {
  const int64_t D = cfg.hidden_size, F = cfg.intermediate_size, H = cfg.num_attention_heads, KV = cfg.num_key_value_heads,
                Hd = cfg.head_dim, V = cfg.vocab_size;
  fn({"model.embed_tokens.weight", {V, D}, WeightRole::Embed, -1});
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto w = [&](const char* name, std::vector<int64_t> shape, WeightRole role) { fn({p + name, std::move(shape), role, i}); };
    w("input_layernorm.weight", {D}, WeightRole::InputNorm);
    w("self_attn.q_proj.weight", {H * Hd, D}, WeightRole::QProj);
    w("self_attn.k_proj.weight", {KV * Hd, D}, WeightRole::KProj);
    w("self_attn.v_proj.weight", {KV * Hd, D}, WeightRole::VProj);
    w("self_attn.q_norm.weight", {Hd}, WeightRole::QNorm);
    w("self_attn.k_norm.weight", {Hd}, WeightRole::KNorm);
    w("self_attn.o_proj.weight", {D, H * Hd}, WeightRole::OProj);
    w("post_attention_layernorm.weight", {D}, WeightRole::PostAttentionNorm);
    w("pre_feedforward_layernorm.weight", {D}, WeightRole::PreFeedforwardNorm);
    w("mlp.gate_proj.weight", {F, D}, WeightRole::GateProj);
    w("mlp.up_proj.weight", {F, D}, WeightRole::UpProj);
    w("mlp.down_proj.weight", {D, F}, WeightRole::DownProj);
    w("post_feedforward_layernorm.weight", {D}, WeightRole::PostFeedforwardNorm);
  }
  fn({"model.norm.weight", {D}, WeightRole::FinalNorm, -1});
}

namespace {

// Where a block's weight lives in LayerWeights: a norm vector, or rows of a Linear. Matmul weights are fused along
// the output rows in for_each_weight's order: qkv = q_proj | k_proj | v_proj, gate_up = gate_proj | up_proj.
struct Slot {
  std::vector<float> LayerWeights::*norm = nullptr;
  ops::Linear LayerWeights::*linear = nullptr;
  bool first = true, last = true;  // the weight is the first / last part of the Linear's rows
};

Slot slot(WeightRole role) {
  using L = LayerWeights;
  switch (role) {
    case WeightRole::InputNorm: return {&L::input_layernorm};
    case WeightRole::QProj: return {nullptr, &L::qkv, true, false};
    case WeightRole::KProj: return {nullptr, &L::qkv, false, false};
    case WeightRole::VProj: return {nullptr, &L::qkv, false, true};
    case WeightRole::QNorm: return {&L::q_norm};
    case WeightRole::KNorm: return {&L::k_norm};
    case WeightRole::OProj: return {nullptr, &L::o_proj};
    case WeightRole::PostAttentionNorm: return {&L::post_attention_layernorm};
    case WeightRole::PreFeedforwardNorm: return {&L::pre_feedforward_layernorm};
    case WeightRole::GateProj: return {nullptr, &L::gate_up, true, false};
    case WeightRole::UpProj: return {nullptr, &L::gate_up, false, true};
    case WeightRole::DownProj: return {nullptr, &L::down_proj};
    case WeightRole::PostFeedforwardNorm: return {&L::post_feedforward_layernorm};
    case WeightRole::Embed: case WeightRole::FinalNorm: break;
  }
  throw InternalError("a weight outside the blocks has no LayerWeights slot");
}

std::string gb(uint64_t n) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f GB", static_cast<double>(n) / 1e9);
  return buf;
}

// A load converts tensor after tensor through buffers of tens to hundreds of MB. glibc serves blocks that large with
// a fresh mmap and returns them with munmap, so every tensor paid for page faults and zeroing of new memory (two
// thirds of a load's time in the kernel, measured with perf on the 1b). For the load, blocks up to 1 GiB come from
// the heap and are reused; after it, the heap's free top is trimmed and glibc's own limits (its dynamic mmap
// threshold's ceiling, 32 MiB) are set back.
struct HeapForLoad {
#if defined(__GLIBC__)
  HeapForLoad() {
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }
  ~HeapForLoad() {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
    malloc_trim(0);
  }
#endif
};

uint64_t read_u64_file(const char* path) {  // a number alone in a file, or 0 ("max", missing, unreadable)
  std::ifstream f(path);
  std::string s;
  if (!(f >> s) || s.empty() || s.find_first_not_of("0123456789") != std::string::npos) return 0;
  return std::strtoull(s.c_str(), nullptr, 10);
}

}  // namespace

uint64_t planned_weight_bytes(const Gemma3Config& cfg, DType dtype, WeightQuant quant) {
  const WeightQuant embed_quant = quant == WeightQuant::Int4 ? WeightQuant::Int8 : quant;
  const uint64_t es = dtype == DType::F32 ? 4 : 2;
  auto matmul = [&](uint64_t n, WeightQuant q) -> uint64_t {
    switch (q) {
      case WeightQuant::Int8: return (n + 31) / 32 * (32 + 4);  // ops/quant.h: 32 int8 + a float scale per block
      case WeightQuant::Int4: return (n + 31) / 32 * (16 + 4);  // 32 nibbles + a float scale
      case WeightQuant::None: break;
    }
    return n * es;
  };
  uint64_t total = 0;
  for_each_weight(cfg, [&](const WeightSpec& w) {
    uint64_t n = 1;
    for (int64_t d : w.shape) n *= static_cast<uint64_t>(d);
    total += w.is_norm() || w.role == WeightRole::FinalNorm ? 4 * n
             : w.role == WeightRole::Embed                   ? matmul(n, embed_quant)
                                                             : matmul(n, quant);
  });
  return total;
}

uint64_t available_memory_bytes() {
  uint64_t avail = 0;
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream in(line.substr(13));
      uint64_t kb = 0;
      if (in >> kb) avail = kb * 1024;
      break;
    }
  }
  const uint64_t max = read_u64_file("/sys/fs/cgroup/memory.max"), cur = read_u64_file("/sys/fs/cgroup/memory.current");
  if (max > 0) {
    const uint64_t room = max > cur ? max - cur : 0;
    if (avail == 0 || room < avail) avail = room;
  }
  return avail;
}

void check_fits_memory(uint64_t bytes, const std::string& what, const std::string& fix) {
  const char* skip = std::getenv("GEMMALENS_NO_MEMORY_CHECK");
  if (skip && *skip && std::string(skip) != "0") return;
  const uint64_t avail = available_memory_bytes();
  if (avail > 0 && bytes > avail)
    throw ResourceError(what + " needs " + gb(bytes) + ", more than the " + gb(avail) + " available (MemAvailable, or the "
                        "cgroup's limit); " + fix + " (GEMMALENS_NO_MEMORY_CHECK=1 skips this check, e.g. to use swap)");
}

Gemma3Model::Gemma3Model(const Gemma3Config& cfg, DType dtype, const TensorGetter& get, WeightQuant quant, const RowGetter& rows,
                         const TensorChecker& check)
    : cfg_(cfg), dtype_(dtype) {
  cfg_.validate();
  if (check)  // every tensor present and shaped as the config says, before any allocation
    for_each_weight(cfg_, [&](const WeightSpec& w) { check(w.name, w.shape); });
  // Refuse a model that cannot fit before allocating any of it (the alternative is the OOM killer, or swapping for
  // minutes); the message names the size and the modes that would fit. GEMMALENS_NO_MEMORY_CHECK=1 skips it (swap).
  const char* skip = std::getenv("GEMMALENS_NO_MEMORY_CHECK");
  if (!(skip && *skip && std::string(skip) != "0")) {
    const uint64_t need = planned_weight_bytes(cfg_, dtype, quant), avail = available_memory_bytes();
    if (avail > 0 && need > avail) {
      std::string hint;
      for (auto [q, name] : {std::pair{WeightQuant::Int8, "int8"}, std::pair{WeightQuant::Int4, "int4"}}) {
        if (quant == WeightQuant::Int4 || (quant == WeightQuant::Int8 && q == WeightQuant::Int8)) continue;
        const uint64_t n = planned_weight_bytes(cfg_, DType::BF16, q);
        hint += std::string(hint.empty() ? "" : ", ") + "weights=\"" + name + "\" (about " + gb(n) + (n > avail ? ", does not fit either)" : ")");
      }
      if (dtype == DType::F32 && quant == WeightQuant::None)
        hint = "dtype=\"bfloat16\" (about " + gb(planned_weight_bytes(cfg_, DType::BF16, WeightQuant::None)) + ")" +
               (hint.empty() ? "" : ", " + hint);
      throw ResourceError("this model's weights need about " + gb(need) + " of memory in " +
                          (dtype == DType::F32 ? "float32" : "bfloat16") +
                          (quant == WeightQuant::None ? "" : quant == WeightQuant::Int8 ? " with int8 weights" : " with int4 weights") +
                          ", more than the " + gb(avail) + " available (MemAvailable, or the cgroup's limit)" +
                          (hint.empty() ? "" : "; try " + hint) +
                          ", or free memory (GEMMALENS_NO_MEMORY_CHECK=1 skips this check, e.g. to use swap)");
    }
  }
  HeapForLoad heap_for_load;
  // int4 keeps the tied embedding / LM head at int8: 4-bit logits cost far more than 4-bit layers (+40% perplexity
  // against a few percent on the real 270M; llama.cpp's Q4_K_M files likewise keep token_embd at Q8_0 / Q6_K).
  const WeightQuant embed_quant = quant == WeightQuant::Int4 ? WeightQuant::Int8 : quant;
  w_.layers.resize(cfg_.num_hidden_layers);
  std::vector<float> fused;  // the rows of a fused Linear gathered so far (row-major f32)
  int64_t fused_at = 0;      // rows of it gathered
  // All rows of the Linear a first part opens: the fused ones hold every part (for_each_weight's order).
  auto fused_rows = [&](WeightRole role, int64_t first_rows) -> int64_t {
    if (role == WeightRole::QProj) return (static_cast<int64_t>(cfg_.num_attention_heads) + 2 * cfg_.num_key_value_heads) * cfg_.head_dim;
    if (role == WeightRole::GateProj) return 2 * static_cast<int64_t>(cfg_.intermediate_size);
    return first_rows;
  };
  for_each_weight(cfg_, [&](const WeightSpec& w) {
    if (w.role == WeightRole::Embed) {
      const int64_t V = w.shape[0], D = w.shape[1];
      if (rows) {
        w_.embed = ops::Linear::plain_from_rows(V, D, dtype, embed_quant,
                                                [&](int64_t r0, int64_t n, float* out) { rows(w.name, w.shape, r0, n, out); });
      } else {
        auto e = get(w.name, w.shape);
        w_.embed = ops::Linear(e.data(), V, D, dtype, /*plain=*/true, embed_quant);
      }
      return;
    }
    if (w.role == WeightRole::FinalNorm) {
      w_.final_norm = get(w.name, w.shape);
      return;
    }
    LayerWeights& L = w_.layers[w.layer];
    const Slot s = slot(w.role);
    if (s.norm) {
      L.*s.norm = get(w.name, w.shape);
      return;
    }
    const int64_t K = w.shape[1];
    if (rows) {
      // Each part read straight into its place among the Linear's rows: one buffer for the whole load, sized once
      // for its largest Linear, with no per-tensor temporary to zero-fill, copy, or fault in again.
      if (s.first) {
        fused_at = 0;
        const int64_t n = fused_rows(w.role, w.shape[0]) * K;
        if (static_cast<int64_t>(fused.size()) < n) fused = std::vector<float>(static_cast<size_t>(n));
      }
      rows(w.name, w.shape, 0, w.shape[0], fused.data() + fused_at * K);
    } else {
      std::vector<float> part = get(w.name, w.shape);
      if (s.first) fused_at = 0;
      fused.resize(static_cast<size_t>(fused_at + w.shape[0]) * K);
      std::copy(part.begin(), part.end(), fused.begin() + fused_at * K);
    }
    fused_at += w.shape[0];
    if (s.last) L.*s.linear = ops::Linear(fused.data(), fused_at, K, dtype, false, quant);
  });
  quant_ = w_.embed.is_quantized() ? quant : WeightQuant::None;
}

size_t Gemma3Model::weight_nbytes() const {
  size_t n = w_.embed.nbytes() + w_.final_norm.size() * 4;
  for (const auto& L : w_.layers)
    n += L.qkv.nbytes() + L.o_proj.nbytes() + L.gate_up.nbytes() + L.down_proj.nbytes() +
         4 * (L.input_layernorm.size() + L.q_norm.size() + L.k_norm.size() + L.post_attention_layernorm.size() +
              L.pre_feedforward_layernorm.size() + L.post_feedforward_layernorm.size());
  return n;
}

void Gemma3Model::export_tensors(
    const std::function<void(const std::string&, const std::vector<int64_t>&, const float*)>& fn,
    const std::function<bool(const std::string&)>& want) const {
  std::vector<float> lin;             // a Linear's weights back as row-major f32 (every part of a fused one)
  const ops::Linear* in_lin = nullptr;  // the Linear lin holds
  int64_t row = 0;                    // where the next part starts in lin
  for_each_weight(cfg_, [&](const WeightSpec& w) {
    const bool wanted = !want || want(w.name);
    if (w.role == WeightRole::Embed) {
      if (!wanted) return;
      std::vector<float> e(static_cast<size_t>(numel(w.shape)));
      w_.embed.to_rowmajor(e.data());
      fn(w.name, w.shape, e.data());
      return;
    }
    if (w.role == WeightRole::FinalNorm) {
      if (wanted) fn(w.name, w.shape, w_.final_norm.data());
      return;
    }
    const LayerWeights& L = w_.layers[w.layer];
    const Slot s = slot(w.role);
    if (s.norm) {
      if (wanted) fn(w.name, w.shape, (L.*s.norm).data());
      return;
    }
    const ops::Linear& l = L.*s.linear;
    if (s.first) row = 0;
    if (wanted) {
      if (in_lin != &l) {  // widened only when a part of it is asked for
        lin.resize(static_cast<size_t>(l.out_features() * l.in_features()));
        l.to_rowmajor(lin.data());
        in_lin = &l;
      }
      fn(w.name, w.shape, lin.data() + row * w.shape[1]);
    }
    row += w.shape[0];
  });
}

}  // namespace gemmalens
