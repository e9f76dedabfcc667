// KV cache: per layer, preallocated. Sliding-window layers keep only `sliding_window` slots in a ring
// buffer (slot s lives at s % cap); full-attention layers keep max_seq_len slots.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "model/config.h"
#include "ops/attention.h"

namespace gemmalens {

class KVCache {
 public:
  KVCache(const Gemma3Config& cfg, int batch, int64_t max_seq_len, DType dtype);

  int batch() const { return batch_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t seq_len() const { return seq_len_; }
  DType dtype() const { return dtype_; }
  const std::vector<int32_t>& row_start() const { return row_start_; }
  size_t nbytes() const;
  // Whether this cache has the geometry of a model with config c (layer count, sliding pattern, window, KV heads,
  // head_dim): a cache from another model would be read out of bounds.
  bool made_for(const Gemma3Config& c) const;

  // Layer l as the attention reads it (slots [seq_len - cap, seq_len) of a ring are held).
  ops::KVRing view(int l) const;

  // A forward pass hands each layer's new K/V here: k / v [B, T, KV, Hd] (f32) for slots seq_len .. seq_len + T - 1.
  // Nothing staged is visible (view() and seq_len() are unchanged) until commit(); a pass abandoned before it
  // (an error, Ctrl-C) leaves the cache as it was, and the next pass stages anew.
  void stage(int l, const float* k, const float* v, int64_t T);
  // Makes the T staged positions of every layer part of the cache; row_start [B] is recorded by the first commit.
  void commit(int64_t T, const std::vector<int32_t>& row_start);
  // Drop everything after the first n slots. Sliding layers must still hold the window before n.
  void truncate(int64_t n);
  std::unique_ptr<KVCache> copy() const { return std::make_unique<KVCache>(*this); }

 private:
  struct Layer {
    int64_t cap = 0;          // slots held: window (sliding) or max_seq_len (full)
    bool sliding = false;
    std::vector<uint8_t> k;   // [B, KV, cap, Hd] in `dtype`
    std::vector<uint8_t> v;   // [B, KV, cap, Hd] in `dtype`
    // A sliding layer's staged rows wait here (writing the ring would overwrite slots that are still visible):
    // the last `staged` positions of the chunk, [B, staged, KV, Hd] f32. -1: nothing staged.
    int64_t staged = -1, staged_T = 0;
    std::vector<float> sk, sv;
  };
  // Rows t0 .. t0 + n - 1 of a chunk k / v [B, T, KV, Hd] into slots first_slot .. first_slot + n - 1 of layer l.
  void write(Layer& l, const ops::KVRing& ring, const float* k, const float* v, int64_t T, int64_t t0, int64_t n, int64_t first_slot);

  int batch_, KV_, Hd_, window_;
  int64_t max_seq_len_, seq_len_ = 0;
  DType dtype_;
  std::vector<int32_t> row_start_;  // [B] first real slot of each row (left padding)
  std::vector<Layer> layers_;
};

}  // namespace gemmalens
