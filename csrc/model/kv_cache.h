// KV cache: per layer, preallocated. Sliding-window layers keep only `sliding_window` slots in a ring
// buffer (slot s lives at s % cap); full-attention layers keep max_seq_len slots.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "model/config.h"

namespace gemmalens {

class KVCache {
 public:
  struct Layer {
    int64_t cap = 0;          // slots held: window (sliding) or max_seq_len (full)
    bool sliding = false;
    std::vector<uint8_t> k;   // [B, KV, cap, Hd] in `dtype`
    std::vector<uint8_t> v;   // [B, KV, cap, Hd] in `dtype`
  };

  KVCache(const Gemma3Config& cfg, int batch, int64_t max_seq_len, DType dtype);

  int batch() const { return batch_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t seq_len() const { return seq_len_; }
  DType dtype() const { return dtype_; }
  const std::vector<int32_t>& row_start() const { return row_start_; }
  size_t nbytes() const;
  const Layer& layer(int i) const { return layers_[i]; }
  // Whether this cache has the geometry of a model with config c (layer count, sliding pattern, window, KV heads,
  // head_dim): a cache from another model would be read out of bounds.
  bool made_for(const Gemma3Config& c) const;

  // Store k/v [B, T, KV, Hd] (f32) for slots first_slot .. first_slot+T-1 of `layer` (a ring keeps
  // only the last `cap` of them). The model writes every layer, then calls advance().
  void write(int layer, const float* k_new, const float* v_new, int64_t T, int64_t first_slot);
  void advance(int64_t T) { seq_len_ += T; }
  void set_row_start(const std::vector<int32_t>& rs) { row_start_ = rs; }
  // Drop everything after the first n slots. Sliding layers must still hold the window before n.
  void truncate(int64_t n);
  std::unique_ptr<KVCache> copy() const { return std::make_unique<KVCache>(*this); }

 private:
  int batch_, KV_, Hd_, window_;
  int64_t max_seq_len_, seq_len_ = 0;
  DType dtype_;
  std::vector<int32_t> row_start_;  // [B] first real slot of each row (left padding)
  std::vector<Layer> layers_;
};

}  // namespace gemmalens
