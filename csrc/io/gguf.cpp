#include "io/gguf.h"

#include <cmath>
#include <cstring>

#include "common.h"
#include "io/checked_source.h"
#include "io/load_progress.h"
#include "model/gemma3.h"
#include "ops/dequant.h"

namespace gemmalens {

namespace {

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& path) : p_(p), n_(n), path_(path) {}
  size_t pos() const { return pos_; }
  const uint8_t* here() const { return p_ + pos_; }
  void skip(size_t k) { need(k, "data"); pos_ += k; }
  size_t left() const { return n_ - pos_; }
  void need(size_t k, const char* what) {
    if (k > left())
      throw CheckpointError("GGUF file '" + path_ + "' is truncated or corrupt: reading " + what + " at byte " + std::to_string(pos_) +
                            " needs " + std::to_string(k) + " bytes, " + std::to_string(left()) + " left");
  }
  template <class T>
  T get(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const char* what) {
    const uint64_t len = get<uint64_t>(what);
    need(len, what);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_, pos_ = 0;
  std::string path_;
};

size_t scalar_size(uint32_t t) {
  switch (t) {
    case GGUFValue::U8: case GGUFValue::I8: case GGUFValue::BOOL: return 1;
    case GGUFValue::U16: case GGUFValue::I16: return 2;
    case GGUFValue::U32: case GGUFValue::I32: case GGUFValue::F32: return 4;
    case GGUFValue::U64: case GGUFValue::I64: case GGUFValue::F64: return 8;
    default: return 0;  // STRING, ARRAY
  }
}

// A scalar of type t from p (at least scalar_size(t) bytes).
GGUFValue decode_scalar(uint32_t t, const uint8_t* p) {
  GGUFValue v;
  v.type = static_cast<GGUFValue::Type>(t);
  auto rd = [&](auto x) { std::memcpy(&x, p, sizeof(x)); return x; };
  switch (v.type) {
    case GGUFValue::U8: v.u = rd(uint8_t{}); v.i = static_cast<int64_t>(v.u); break;
    case GGUFValue::I8: v.i = rd(int8_t{}); break;
    case GGUFValue::U16: v.u = rd(uint16_t{}); v.i = static_cast<int64_t>(v.u); break;
    case GGUFValue::I16: v.i = rd(int16_t{}); break;
    case GGUFValue::U32: v.u = rd(uint32_t{}); v.i = static_cast<int64_t>(v.u); break;
    case GGUFValue::I32: v.i = rd(int32_t{}); break;
    case GGUFValue::F32: v.f = rd(float{}); break;
    case GGUFValue::BOOL: v.u = rd(uint8_t{}) != 0; v.i = static_cast<int64_t>(v.u); break;
    case GGUFValue::U64: v.u = rd(uint64_t{}); v.i = static_cast<int64_t>(v.u); break;
    case GGUFValue::I64: v.i = rd(int64_t{}); break;
    case GGUFValue::F64: v.f = rd(double{}); break;
    default: break;
  }
  return v;
}

GGUFValue read_value(Reader& r, uint32_t type, int depth, uint64_t& nested_left) {
  if (type > GGUFValue::F64) throw CheckpointError("GGUF metadata value has unknown type " + std::to_string(type) + " (file corrupt?)");
  if (type == GGUFValue::STRING) {
    GGUFValue v;
    v.type = GGUFValue::STRING;
    v.s = r.str("string");
    return v;
  }
  if (type != GGUFValue::ARRAY) {
    const size_t n = scalar_size(type);
    r.need(n, "metadata value");
    GGUFValue v = decode_scalar(type, r.here());
    r.skip(n);
    return v;
  }
  if (depth > 8) throw CheckpointError("GGUF metadata arrays nested too deeply (file corrupt?)");
  GGUFValue v;
  v.type = GGUFValue::ARRAY;
  const uint32_t et = r.get<uint32_t>("array type");
  const uint64_t count = r.get<uint64_t>("array length");
  if (et > GGUFValue::F64) throw CheckpointError("GGUF metadata array has unknown element type " + std::to_string(et));
  v.elem_type = static_cast<GGUFValue::Type>(et);
  v.count = count;
  const uint8_t* base = r.here();
  v.raw = base;
  if (const size_t es = scalar_size(et)) {
    if (count > r.left() / es) throw CheckpointError("GGUF metadata array of " + std::to_string(count) + " values runs past the end of the file");
    r.skip(count * es);
  } else if (et == GGUFValue::STRING) {
    // Every string takes at least its 8-byte length: a count beyond that is corrupt (and must not allocate).
    if (count > r.left() / 8) throw CheckpointError("GGUF metadata array of " + std::to_string(count) + " strings runs past the end of the file");
    v.str_pos.reserve(count);
    for (uint64_t k = 0; k < count; ++k) {
      v.str_pos.push_back(static_cast<uint64_t>(r.here() - base));
      const uint64_t len = r.get<uint64_t>("string length");
      r.need(len, "string");
      r.skip(len);
    }
  } else {  // nested arrays: each element is a full GGUFValue, so their total number is capped per file
    if (count > r.left() / 12 || count > nested_left)
      throw CheckpointError("GGUF metadata: nested array of " + std::to_string(count) + " arrays is larger than the file can hold or than "
                            "gemmalens accepts (" + std::to_string(GGUFFile::kMaxNestedValues) + " nested values per file)");
    nested_left -= count;
    v.arr.reserve(count);
    for (uint64_t k = 0; k < count; ++k) v.arr.push_back(read_value(r, et, depth + 1, nested_left));
  }
  return v;
}

}  // namespace

int64_t GGUFValue::as_int(const std::string& key) const {
  switch (type) {
    case U8: case U16: case U32: case U64: case BOOL: return static_cast<int64_t>(u);
    case I8: case I16: case I32: case I64: return i;
    default: throw CheckpointError("GGUF metadata '" + key + "' should be an integer");
  }
}
double GGUFValue::as_float(const std::string& key) const {
  if (type == F32 || type == F64) return f;
  return static_cast<double>(as_int(key));
}

int GGUFValue::as_int_in(const std::string& key, int64_t lo, int64_t hi) const {
  const int64_t v = as_int(key);
  // An unsigned 64-bit value above INT64_MAX reads as negative here and is refused with the rest.
  if (v < lo || v > hi || ((type == U64) && u > static_cast<uint64_t>(INT64_MAX)))
    throw CheckpointError("GGUF metadata '" + key + "' = " + (type == U64 ? std::to_string(u) : std::to_string(v)) + " is out of range [" +
                          std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return static_cast<int>(v);
}

GGUFValue GGUFValue::at(size_t k) const {
  if (type != ARRAY || k >= count) throw CheckpointError("GGUF metadata: array index " + std::to_string(k) + " out of range");
  if (elem_type == ARRAY) return arr[k];
  if (elem_type == STRING) {
    GGUFValue v;
    v.type = STRING;
    uint64_t len;
    std::memcpy(&len, raw + str_pos[k], 8);  // bounds were checked when the array was read
    v.s.assign(reinterpret_cast<const char*>(raw + str_pos[k] + 8), len);
    return v;
  }
  return decode_scalar(elem_type, raw + k * scalar_size(elem_type));
}

int64_t GGUFTensor::numel() const {
  // Each dimension is in [1, 2^40] (checked when read) but their product can overflow: refuse it.
  int64_t n;
  if (!numel_checked(ne, n))
    throw CheckpointError("GGUF tensor '" + name + "' claims more elements than any file can hold (corrupt shape)");
  return n;
}

GGUFFile::GGUFFile(const std::string& path) : file_(std::make_unique<MappedFile>(path)) {
  Reader r(file_->data(), file_->size(), path);
  r.need(4, "magic");
  if (file_->size() < 4 || std::memcmp(file_->data(), "GGUF", 4) != 0)
    throw CheckpointError("'" + path + "' is not a GGUF file (bad magic; expected 'GGUF')");
  r.get<uint32_t>("magic");
  version_ = r.get<uint32_t>("version");
  if (version_ != 2 && version_ != 3)
    throw CheckpointError("'" + path + "': unsupported GGUF version " + std::to_string(version_) + " (supported: 2 and 3, little-endian)");
  const uint64_t n_tensors = r.get<uint64_t>("tensor count");
  const uint64_t n_kv = r.get<uint64_t>("metadata count");
  if (n_tensors > r.left() / 24 || n_kv > r.left() / 12 || n_tensors > kMaxTensors || n_kv > kMaxKeys)
    throw CheckpointError("'" + path + "': tensor/metadata counts (" + std::to_string(n_tensors) + ", " + std::to_string(n_kv) +
                          ") are larger than the file can hold or than gemmalens accepts (" + std::to_string(kMaxTensors) + ", " +
                          std::to_string(kMaxKeys) + ") (file corrupt?)");
  uint64_t nested_left = kMaxNestedValues;
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = r.str("metadata key");
    const uint32_t type = r.get<uint32_t>("metadata type");
    kv_[key] = read_value(r, type, 0, nested_left);
  }
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GGUFTensor t;
    t.name = r.str("tensor name");
    const uint32_t nd = r.get<uint32_t>("tensor dims");
    if (nd == 0 || nd > 4) throw CheckpointError("GGUF tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions (1..4 allowed)");
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t e = r.get<uint64_t>("tensor shape");
      if (e == 0 || e > (1ull << 40)) throw CheckpointError("GGUF tensor '" + t.name + "' has dimension " + std::to_string(e));
      t.ne.push_back(static_cast<int64_t>(e));
    }
    t.type = r.get<uint32_t>("tensor type");
    t.offset = r.get<uint64_t>("tensor offset");
    if (index_.count(t.name)) throw CheckpointError("GGUF tensor '" + t.name + "' appears twice");
    index_[t.name] = tensors_.size();
    tensors_.push_back(std::move(t));
  }
  uint64_t alignment = 32;
  if (auto* a = find("general.alignment")) {
    alignment = static_cast<uint64_t>(a->as_int("general.alignment"));
    if (alignment == 0 || alignment > (1u << 20) || (alignment & (alignment - 1)) != 0)
      throw CheckpointError("'" + path + "': general.alignment = " + std::to_string(alignment) + " is not a power of two");
  }
  const uint64_t data_start = (r.pos() + alignment - 1) / alignment * alignment;
  for (auto& t : tensors_) {
    const ops::BlockInfo bi = ops::ggml_block_info(t.type);
    if (bi.elems == 0) continue;  // size unknown: only an error if the model needs this tensor
    if (t.ne[0] % bi.elems != 0)
      throw CheckpointError("GGUF tensor '" + t.name + "': row length " + std::to_string(t.ne[0]) + " is not a multiple of the " +
                            ops::ggml_type_name(t.type) + " block size " + std::to_string(bi.elems));
    const uint64_t blocks = static_cast<uint64_t>(t.numel() / bi.elems);
    if (blocks > file_->size() / bi.bytes)  // also keeps blocks * bytes from overflowing
      throw CheckpointError("GGUF file '" + path + "' is truncated or corrupt: tensor '" + t.name + "' claims " + std::to_string(blocks) +
                            " blocks of " + std::to_string(bi.bytes) + " bytes, which runs past the end of the file");
    t.nbytes = blocks * bi.bytes;
    if (t.offset % alignment != 0) throw CheckpointError("GGUF tensor '" + t.name + "' data offset is not aligned");
    if (data_start > file_->size() || t.offset > file_->size() - data_start || t.nbytes > file_->size() - data_start - t.offset)
      throw CheckpointError("GGUF file '" + path + "' is truncated: tensor '" + t.name + "' (" + std::to_string(t.nbytes) +
                            " bytes at offset " + std::to_string(t.offset) + ") runs past the end of the file");
    t.data = file_->data() + data_start + t.offset;
  }
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
  auto it = kv_.find(key);
  return it == kv_.end() ? nullptr : &it->second;
}

const GGUFTensor* GGUFFile::tensor(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
void check_dequantizable(const GGUFTensor& t) {
  if (!t.data) throw CheckpointError("GGUF tensor '" + t.name + "' has type " + ops::ggml_type_name(t.type) +
                                     ", which gemmalens cannot dequantise (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
}
}  // namespace

std::vector<float> GGUFFile::dequantize(const GGUFTensor& t) const {
  check_dequantizable(t);
  std::vector<float> out(static_cast<size_t>(t.numel()));
  ops::dequantize(t.type, t.data, t.numel(), out.data());
  TensorStore::release(t.data, t.nbytes);  // the file's pages leave this process's RSS once converted
  return out;
}

void GGUFFile::dequantize_rows(const GGUFTensor& t, int64_t r0, int64_t n, float* out) const {
  check_dequantizable(t);
  const int64_t rows = t.numel() / t.ne[0];
  if (t.ne.size() != 2 || r0 < 0 || n < 0 || r0 + n > rows)
    throw CheckpointError("GGUF tensor '" + t.name + "': rows [" + std::to_string(r0) + ", " + std::to_string(r0 + n) +
                          ") out of range");
  const ops::BlockInfo b = ops::ggml_block_info(t.type);
  const int64_t row_bytes = t.ne[0] / b.elems * b.bytes;  // the reader checked ne[0] % elems == 0
  ops::dequantize(t.type, t.data + r0 * row_bytes, n * t.ne[0], out);
  TensorStore::release(t.data + r0 * row_bytes, n * row_bytes);
}

Gemma3Config config_from_gguf(const GGUFFile& f) {
  auto req = [&](const std::string& key) -> const GGUFValue& {
    const GGUFValue* v = f.find(key);
    if (!v) throw CheckpointError("GGUF file '" + f.path() + "' lacks metadata '" + key + "'");
    return *v;
  };
  const GGUFValue& arch = req("general.architecture");
  if (arch.type != GGUFValue::STRING || arch.s != "gemma3")
    throw CheckpointError("GGUF file '" + f.path() + "' holds architecture '" + (arch.type == GGUFValue::STRING ? arch.s : "(not a string)") +
                          "', not 'gemma3'");
  // Every integer is range-checked as it is read (validate() then applies the model's own bounds): a value that
  // does not fit an int must not wrap into a plausible one.
  auto i = [&](const std::string& k, int64_t lo, int64_t hi) { return req("gemma3." + k).as_int_in("gemma3." + k, lo, hi); };
  Gemma3Config c;
  c.hidden_size = i("embedding_length", 1, kMaxHidden);
  c.num_hidden_layers = i("block_count", 1, kMaxLayers);
  c.intermediate_size = i("feed_forward_length", 1, kMaxIntermediate);
  c.num_attention_heads = i("attention.head_count", 1, kMaxHeads);
  c.num_key_value_heads = f.find("gemma3.attention.head_count_kv") ? i("attention.head_count_kv", 1, kMaxHeads) : c.num_attention_heads;
  c.head_dim = f.find("gemma3.attention.key_length") ? i("attention.key_length", 1, kMaxHeadDim) : c.hidden_size / c.num_attention_heads;
  c.rms_norm_eps = req("gemma3.attention.layer_norm_rms_epsilon").as_float("eps");
  // Stored as f32 in GGUF (9.99999997e-07): HF's configs say 1e-6; use the double nearest the f32 value's intent.
  if (std::fabs(c.rms_norm_eps - 1e-6) < 1e-12) c.rms_norm_eps = 1e-6;
  c.sliding_window = f.find("gemma3.attention.sliding_window") ? i("attention.sliding_window", 1, kMaxPositions) : 512;
  c.max_position_embeddings = f.find("gemma3.context_length") ? i("context_length", 1, kMaxPositions) : 32768;
  c.rope_theta = f.find("gemma3.rope.freq_base") ? req("gemma3.rope.freq_base").as_float("rope.freq_base") : 1000000.0;
  c.rope_local_base_freq = 10000.0;  // not stored; llama.cpp hard-codes it for gemma3
  if (const GGUFValue* st = f.find("gemma3.rope.scaling.type")) {
    if (st->type != GGUFValue::STRING) throw CheckpointError("GGUF metadata 'gemma3.rope.scaling.type' should be a string");
    if (st->s == "linear") c.rope_scaling_factor = req("gemma3.rope.scaling.factor").as_float("rope.scaling.factor");
    else if (st->s != "none") throw CheckpointError("GGUF rope.scaling.type '" + st->s + "' is not supported");
  }
  // 27b: scale queries by 1/sqrt(D/H) (= 168); every other size by 1/sqrt(head_dim).
  c.query_pre_attn_scalar = c.num_hidden_layers == 62 ? static_cast<double>(c.hidden_size) / c.num_attention_heads : c.head_dim;
  c.layer_types = Gemma3Config::default_layer_types(c.num_hidden_layers, 6);
  const GGUFTensor* emb = f.tensor("token_embd.weight");
  if (!emb) throw CheckpointError("GGUF file '" + f.path() + "' has no tensor 'token_embd.weight'");
  if (emb->ne.size() != 2 || emb->ne[1] > kMaxVocab)
    throw CheckpointError("GGUF tensor 'token_embd.weight' must be 2-D with at most " + std::to_string(kMaxVocab) + " rows");
  c.vocab_size = static_cast<int>(emb->ne[1]);
  const int64_t last_id = c.vocab_size - 1;
  if (const GGUFValue* v = f.find("tokenizer.ggml.bos_token_id")) c.bos_token_id = v->as_int_in("tokenizer.ggml.bos_token_id", 0, last_id);
  if (const GGUFValue* v = f.find("tokenizer.ggml.padding_token_id")) c.pad_token_id = v->as_int_in("tokenizer.ggml.padding_token_id", 0, last_id);
  c.eos_token_id = {1, 106};  // Gemma 3 stops on <eos> and <end_of_turn>
  if (const GGUFValue* v = f.find("tokenizer.ggml.eos_token_id")) {
    const int e = v->as_int_in("tokenizer.ggml.eos_token_id", 0, last_id);
    if (e != 1) c.eos_token_id = {e};
  }
  c.validate();
  return c;
}

namespace {
// llama.cpp's name for a weight (gguf-py's tensor names for gemma3).
std::string gguf_name(const WeightSpec& w) {
  const char* s = "";
  switch (w.role) {
    case WeightRole::Embed: return "token_embd.weight";
    case WeightRole::FinalNorm: return "output_norm.weight";
    case WeightRole::InputNorm: s = "attn_norm"; break;
    case WeightRole::QProj: s = "attn_q"; break;
    case WeightRole::KProj: s = "attn_k"; break;
    case WeightRole::VProj: s = "attn_v"; break;
    case WeightRole::QNorm: s = "attn_q_norm"; break;
    case WeightRole::KNorm: s = "attn_k_norm"; break;
    case WeightRole::OProj: s = "attn_output"; break;
    case WeightRole::PostAttentionNorm: s = "post_attention_norm"; break;
    case WeightRole::PreFeedforwardNorm: s = "ffn_norm"; break;
    case WeightRole::GateProj: s = "ffn_gate"; break;
    case WeightRole::UpProj: s = "ffn_up"; break;
    case WeightRole::DownProj: s = "ffn_down"; break;
    case WeightRole::PostFeedforwardNorm: s = "post_ffw_norm"; break;
  }
  return "blk." + std::to_string(w.layer) + "." + s + ".weight";
}
}  // namespace

std::unique_ptr<Gemma3Model> load_gguf(const std::string& path, DType dtype, Gemma3Config* cfg_out, WeightQuant quant,
                                       LoadProgress* progress) {
  GGUFFile f(path);
  return load_gguf(f, dtype, cfg_out, quant, progress);
}

std::unique_ptr<Gemma3Model> load_gguf(const GGUFFile& f, DType dtype, Gemma3Config* cfg_out, WeightQuant quant,
                                       LoadProgress* progress) {
  const std::string& path = f.path();
  Gemma3Config cfg = config_from_gguf(f);
  if (cfg_out) *cfg_out = cfg;
  // HF name -> (GGUF name, a norm: stored as 1 + w by llama.cpp's converter).
  std::map<std::string, std::pair<std::string, bool>> names;
  for_each_weight(cfg, [&](const WeightSpec& w) { names.emplace(w.name, std::make_pair(gguf_name(w), w.is_norm())); });
  CheckedSource<GGUFTensor> src({"GGUF file '" + path + "'", " (GGUF file '" + path + "')",
                                  [&](const std::string& hf_name) { return names.at(hf_name).first; },
                                  [&](const std::string& name) { return f.tensor(name); },
                                  [](const GGUFTensor& t) { return t.shape(); }});
  TensorGetter get = [&](const std::string& hf_name, const std::vector<int64_t>& shape) {
    std::vector<float> w = f.dequantize(src.take(hf_name, shape));
    if (names.at(hf_name).second)  // GGUF stores Gemma norms as 1 + w (llama.cpp's converter adds the 1)
      for (auto& x : w) x -= 1.f;
    return w;
  };
  RowGetter rows = [&](const std::string& hf_name, const std::vector<int64_t>& shape, int64_t r0, int64_t n, float* out) {
    if (names.at(hf_name).second) throw InternalError("row access to a norm weight");
    f.dequantize_rows(src.take(hf_name, shape), r0, n, out);
  };
  if (progress) progress->start(cfg);
  auto model = std::make_unique<Gemma3Model>(cfg, dtype, counted(get, progress), quant, counted(rows, progress),
                                             src.checker());
  for (const auto& t : f.tensors()) {
    if (src.taken(t.name)) continue;
    if (t.name == "output.weight")
      throw CheckpointError("GGUF file '" + path + "' has a separate 'output.weight'; Gemma 3 ties the LM head to token_embd "
                            "(an untied head is not supported)");
    const std::vector<int64_t> shape = t.shape();
    throw src.unexpected(t.name, &shape);
  }
  return model;
}

}  // namespace gemmalens
