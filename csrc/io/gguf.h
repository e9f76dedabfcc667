// Native GGUF reader (llama.cpp's format): header, every metadata value type (arrays included), tensor
// infos, general.alignment; mmap; every read bounds-checked. Versions 2 and 3, little-endian.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "common.h"
#include "model/config.h"

namespace gemmalens {

// One metadata value. Arrays are not expanded into one GGUFValue per element (that cost ~100 bytes per file byte
// of a crafted array): scalar elements are read in place from the mapping, string elements are found through one
// offset each, and only nested arrays (rare; capped per file) are parsed into `arr`.
struct GGUFValue {
  enum Type : uint32_t { U8 = 0, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 };
  Type type = U8;
  uint64_t u = 0;      // unsigned ints and bool
  int64_t i = 0;       // signed ints
  double f = 0;        // floats
  std::string s;       // STRING
  // ARRAY
  Type elem_type = U8;
  uint64_t count = 0;               // elements
  const uint8_t* raw = nullptr;     // scalar elements, packed little-endian (into the mapping)
  std::vector<uint64_t> str_pos;    // STRING elements: where each one's length field is, relative to raw
  std::vector<GGUFValue> arr;       // nested ARRAY elements only
  size_t size() const { return static_cast<size_t>(count); }
  GGUFValue at(size_t k) const;     // element k (scalar or string; nested: a copy of the sub-array)
  int64_t as_int(const std::string& key) const;
  double as_float(const std::string& key) const;
  // An integer metadata value that must lie in [lo, hi]; throws CheckpointError naming the key otherwise.
  int as_int_in(const std::string& key, int64_t lo, int64_t hi) const;
};

struct GGUFTensor {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] is contiguous; the row-major shape is ne reversed
  uint32_t type = 0;
  uint64_t offset = 0;      // relative to the data section
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;
  std::vector<int64_t> shape() const { return {ne.rbegin(), ne.rend()}; }
  int64_t numel() const;
};

class GGUFFile {
 public:
  explicit GGUFFile(const std::string& path);  // throws IOError / CheckpointError
  // Limits on a file's table sizes (real Gemma 3 files: ~40 metadata keys, <= 810 tensors).
  static constexpr uint64_t kMaxKeys = 1 << 16, kMaxTensors = 1 << 16, kMaxNestedValues = 1 << 16;
  uint32_t version() const { return version_; }
  const std::map<std::string, GGUFValue>& metadata() const { return kv_; }
  const GGUFValue* find(const std::string& key) const;
  const std::vector<GGUFTensor>& tensors() const { return tensors_; }
  const GGUFTensor* tensor(const std::string& name) const;
  std::vector<float> dequantize(const GGUFTensor& t) const;
  // Rows [r0, r0 + n) of a 2-D tensor (ne[0] values each) into out.
  void dequantize_rows(const GGUFTensor& t, int64_t r0, int64_t n, float* out) const;
  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  std::map<std::string, GGUFValue> kv_;
  std::vector<GGUFTensor> tensors_;
  std::map<std::string, size_t> index_;
};

// Gemma3Config from gemma3.* metadata, plus what GGUF does not store, derived as llama.cpp does:
// sliding pattern 6 (layer i global iff i % 6 == 5), local RoPE base 10000, query scale 1/sqrt(D/H) for
// the 62-layer 27b, else 1/sqrt(head_dim); vocab size from the token list / embedding.
Gemma3Config config_from_gguf(const GGUFFile& f);

class Gemma3Model;
struct LoadProgress;
// GGUF weights dequantised into the compute dtype; norms (stored as 1 + w) are converted back to w.
// `progress`, when given, counts the weights handed to the model (io/load_progress.h).
std::unique_ptr<Gemma3Model> load_gguf(const std::string& path, DType dtype, Gemma3Config* cfg_out = nullptr,
                                       WeightQuant quant = WeightQuant::None, LoadProgress* progress = nullptr);
// The same from a file already parsed (gl.load reads the GGUF once for the weights mode, tokenizer and model).
std::unique_ptr<Gemma3Model> load_gguf(const GGUFFile& f, DType dtype, Gemma3Config* cfg_out = nullptr,
                                       WeightQuant quant = WeightQuant::None, LoadProgress* progress = nullptr);

}  // namespace gemmalens
