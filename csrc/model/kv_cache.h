// KV cache: per layer, preallocated. Sliding-window layers keep only `sliding_window` slots in a ring
// buffer (slot s lives at s % cap); full-attention layers keep max_seq_len slots.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "model/config.h"
#include "ops/attention.h"
#include "ops/pages.h"

namespace gemmalens {

class KVCache {
 public:
  // int8: keys and values held as int8 blocks of 32 with an f32 scale each (ops/attention.h, kv_int8_quantize: 1.125
  // bytes a value against bf16's 2), for a model of either dtype; needs head_dim % 32 == 0.
  KVCache(const Gemma3Config& cfg, int batch, int64_t max_seq_len, DType dtype, bool int8 = false);

  int batch() const { return batch_; }
  int64_t max_seq_len() const { return max_seq_len_; }
  int64_t seq_len() const { return seq_len_; }
  DType dtype() const { return dtype_; }  // the model's dtype (what a pass over it must compute in)
  bool int8() const { return int8_; }
  const std::vector<int32_t>& row_start() const { return row_start_; }
  size_t nbytes() const;
  // Whether this cache has the geometry of a model with config c (layer count, sliding pattern, window, KV heads,
  // head_dim): a cache from another model would be read out of bounds.
  bool made_for(const Gemma3Config& c) const;
  // Whether row r holds every slot of its sequence up to seq_len(): false after a pass over other rows (rows below)
  // moved seq_len on without it, until place_row() fills it again. A fresh or truncate(0) cache: every row.
  bool row_valid(int r) const { return valid_[r] != 0; }

  // Layer l as the attention reads it (slots [seq_len - cap, seq_len) of a ring are held). rows [B]: the cache row
  // of each row of the pass (null: row b is cache row b).
  ops::KVRing view(int l, const int32_t* rows = nullptr) const;

  // A forward pass hands each layer's new K/V here: k / v [B, T, KV, Hd] (f32) for slots seq_len .. seq_len + T - 1
  // of the cache rows rows[0 .. B) (rows null: every row, B = batch()).
  // Nothing staged is visible (view() and seq_len() are unchanged) until commit(); a pass abandoned before it
  // (an error, Ctrl-C) leaves the cache as it was, and the next pass stages anew.
  void stage(int l, const float* k, const float* v, int64_t T, const int32_t* rows = nullptr, int B = 0);
  // Makes the T staged positions of every layer part of the cache; row_start [B] is recorded by the first commit.
  // With rows, the cache rows the pass left out are no longer valid (seq_len moved on without them).
  void commit(int64_t T, const std::vector<int32_t>& row_start, const int32_t* rows = nullptr);
  // Drop everything after the first n slots. Sliding layers must still hold the window before n.
  void truncate(int64_t n);
  std::unique_ptr<KVCache> copy() const { return std::make_unique<KVCache>(*this); }

  // Continuous batching (rows joining and leaving a batch that keeps decoding; gemmalens/serve.py). All rows share
  // the slots' timeline, [0, seq_len); a row's sequence is slots [row_start, seq_len) and its positions count from
  // its row_start (as with left padding), so rows of different lengths decode together, each as if alone.
  // place_row: cache row `row` gets row src_row of src (a cache of the same model, e.g. a prompt's prefill), its
  // sequence ending at this seq_len: row_start = seq_len - (src.seq_len - src.row_start[src_row]). Needs
  // src.seq_len() <= seq_len() (shift() first to make room).
  void place_row(int row, const KVCache& src, int src_row);
  // Every valid row's slots move by d (slot s -> s + d), row_start and seq_len with them: d < 0 gives back the
  // slots before the earliest row_start, d > 0 makes room before every row (for a longer sequence to join).
  void shift(int64_t d);

 private:
  struct Layer {
    int64_t cap = 0;          // slots held: window (sliding) or max_seq_len (full)
    bool sliding = false;
    ops::page_vector<uint8_t> k;  // [B, KV, cap] rows of row_bytes()
    ops::page_vector<uint8_t> v;
    // A sliding layer's staged rows wait here (writing the ring would overwrite slots that are still visible):
    // the last `staged` positions of the chunk, [B, staged, KV, Hd] f32 (B: the pass's rows). -1: nothing staged.
    int64_t staged = -1, staged_T = 0;
    int staged_B = 0;
    std::vector<float> sk, sv;
  };
  // Rows t0 .. t0 + n - 1 of a chunk k / v [B, T, KV, Hd] into slots first_slot .. first_slot + n - 1 of layer l
  // (ring: the layer's view with the pass's rows).
  void write(Layer& l, const ops::KVRing& ring, int B, const float* k, const float* v, int64_t T, int64_t t0, int64_t n,
             int64_t first_slot);
  // The rows argument of stage() / commit(), checked: in range and distinct.
  void check_rows(const int32_t* rows, int B) const;
  // Bytes of one unit of ops::KVRing::offset(): a value (f32, bf16), or a byte of an int8 row.
  size_t offset_unit() const { return int8_ ? 1 : (dtype_ == DType::F32 ? 4 : 2); }
  // Bytes of one slot's row (Hd values): f32, bf16, or int8 values and their scales.
  size_t row_bytes() const {
    return int8_ ? static_cast<size_t>(ops::kv_int8_row_bytes(Hd_)) : static_cast<size_t>(Hd_) * (dtype_ == DType::F32 ? 4 : 2);
  }

  int batch_, KV_, Hd_, window_;
  int64_t max_seq_len_, seq_len_ = 0;
  DType dtype_;
  bool int8_;
  std::vector<int32_t> row_start_;  // [B] first real slot of each row (left padding)
  std::vector<char> valid_;         // [B] row_valid()
  std::vector<Layer> layers_;
};

}  // namespace gemmalens
