#include "model/kv_cache.h"
#include "ops/pages.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <unistd.h>

namespace gemmalens {

KVCache::KVCache(const Gemma3Config& cfg, int batch, int64_t max_seq_len, DType dtype, bool int8)
    : batch_(batch), KV_(cfg.num_key_value_heads), Hd_(cfg.head_dim), window_(cfg.sliding_window), max_seq_len_(max_seq_len),
      dtype_(dtype), int8_(int8) {
  cfg.validate();
  if (batch <= 0) throw ValueError("KV cache: batch must be > 0, got " + std::to_string(batch));
  if (max_seq_len <= 0) throw ValueError("KV cache: max_seq_len must be > 0, got " + std::to_string(max_seq_len));
  if (int8 && Hd_ % ops::kKVBlock != 0)
    throw ValueError("KV cache: kv_dtype 'int8' needs head_dim to be a multiple of 32 (this model's is " + std::to_string(Hd_) +
                     "); use kv_dtype=None (the model's dtype)");
  const size_t es = row_bytes();  // per slot, KV head and row
  // The whole size first, overflow-checked, and refused when it exceeds the machine's memory (the alternative is
  // the OOM killer, or minutes of swapping, after a typo in batch or max_seq_len).
  uint64_t total = 0;
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    const uint64_t cap = cfg.is_sliding(i) ? std::min<int64_t>(cfg.sliding_window, max_seq_len) : max_seq_len;
    uint64_t n = 2 * es;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(batch), &n) || __builtin_mul_overflow(n, static_cast<uint64_t>(KV_), &n) ||
        __builtin_mul_overflow(n, cap, &n) || __builtin_add_overflow(total, n, &total))
      total = UINT64_MAX;
  }
  const uint64_t phys = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (total > phys)
    throw ValueError("KV cache for batch " + std::to_string(batch) + " and max_seq_len " + std::to_string(max_seq_len) + " needs " +
                     (total == UINT64_MAX ? std::string("more than 2^64") : std::to_string(total >> 20) + " MiB") + ", more than this machine's " +
                     std::to_string(phys >> 20) + " MiB of memory; use a smaller batch or max_seq_len");
  row_start_.assign(batch, 0);
  valid_.assign(batch, 1);
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    Layer l;
    l.sliding = cfg.is_sliding(i);
    l.cap = l.sliding ? std::min<int64_t>(cfg.sliding_window, max_seq_len) : max_seq_len;
    const size_t n = static_cast<size_t>(batch) * KV_ * l.cap * es;
    try {
      ops::assign_huge(l.k, n, uint8_t{0});
      ops::assign_huge(l.v, n, uint8_t{0});
    } catch (const ResourceError&) {  // memory the machine has but this process may not take (limits, other processes)
      layers_.clear();
      throw ResourceError("KV cache for batch " + std::to_string(batch) + " and max_seq_len " + std::to_string(max_seq_len) +
                          ": could not allocate its " + std::to_string(total >> 20) +
                          " MiB (out of memory); use a smaller batch or max_seq_len, or free memory");
    }
    layers_.push_back(std::move(l));
  }
}

bool KVCache::made_for(const Gemma3Config& c) const {
  if (static_cast<int>(layers_.size()) != c.num_hidden_layers || KV_ != c.num_key_value_heads || Hd_ != c.head_dim ||
      window_ != c.sliding_window)
    return false;
  for (int i = 0; i < c.num_hidden_layers; ++i)
    if (layers_[i].sliding != c.is_sliding(i)) return false;
  return true;
}

size_t KVCache::nbytes() const {
  size_t n = 0;
  for (const auto& l : layers_) n += l.k.size() + l.v.size();
  return n;
}

ops::KVRing KVCache::view(int l, const int32_t* rows) const {
  const Layer& L = layers_[l];
  ops::KVRing r;
  r.k = L.k.data();
  r.v = L.v.data();
  r.dtype = dtype_;
  r.int8 = int8_;
  r.KV = KV_;
  r.Hd = Hd_;
  r.cap = L.cap;
  r.rows = rows;
  return r;
}

void KVCache::check_rows(const int32_t* rows, int B) const {
  if (!rows) {
    if (B != batch_) throw InternalError("KV cache: a pass over all rows with batch " + std::to_string(B));
    return;
  }
  std::vector<char> seen(batch_, 0);
  for (int b = 0; b < B; ++b) {
    if (rows[b] < 0 || rows[b] >= batch_)
      throw ValueError("KV cache: row " + std::to_string(rows[b]) + " is out of range [0, " + std::to_string(batch_) + ")");
    if (seen[rows[b]]++) throw ValueError("KV cache: row " + std::to_string(rows[b]) + " is given twice");
  }
}

void KVCache::write(Layer& L, const ops::KVRing& ring, int B, const float* k, const float* v, int64_t T, int64_t t0, int64_t n,
                    int64_t first_slot) {
  for (int b = 0; b < B; ++b)
    for (int64_t t = t0; t < t0 + n; ++t)
      for (int h = 0; h < KV_; ++h) {
        const float* ks = k + ((b * T + t) * KV_ + h) * Hd_;
        const float* vs = v + ((b * T + t) * KV_ + h) * Hd_;
        const int64_t off = ring.offset(b, h, first_slot + (t - t0));
        if (int8_) {
          ops::kv_int8_quantize(ks, Hd_, reinterpret_cast<int8_t*>(L.k.data()) + off);
          ops::kv_int8_quantize(vs, Hd_, reinterpret_cast<int8_t*>(L.v.data()) + off);
        } else if (dtype_ == DType::F32) {
          std::copy(ks, ks + Hd_, reinterpret_cast<float*>(L.k.data()) + off);
          std::copy(vs, vs + Hd_, reinterpret_cast<float*>(L.v.data()) + off);
        } else {
          uint16_t* kd = reinterpret_cast<uint16_t*>(L.k.data()) + off;
          uint16_t* vd = reinterpret_cast<uint16_t*>(L.v.data()) + off;
          for (int d = 0; d < Hd_; ++d) {
            kd[d] = f32_to_bf16(ks[d]);
            vd[d] = f32_to_bf16(vs[d]);
          }
        }
      }
}

void KVCache::stage(int l, const float* k, const float* v, int64_t T, const int32_t* rows, int B) {
  if (l < 0 || l >= static_cast<int>(layers_.size())) throw InternalError("KV cache: stage() for a layer it does not have");
  if (!rows) B = batch_;
  check_rows(rows, B);
  Layer& L = layers_[l];
  if (seq_len_ + T > max_seq_len_)
    throw ValueError("KV cache is full: " + std::to_string(seq_len_) + " + " + std::to_string(T) + " positions exceed max_seq_len = " +
                     std::to_string(max_seq_len_) + "; create the cache with a larger max_seq_len");
  L.staged_T = T;
  L.staged_B = B;
  if (!L.sliding) {  // slots past seq_len are not read before commit(): write them in place
    write(L, view(l, rows), B, k, v, T, 0, T, seq_len_);
    L.staged = 0;
    return;
  }
  const int64_t keep = std::min<int64_t>(T, L.cap);  // older rows of the chunk would be overwritten anyway
  const size_t row = static_cast<size_t>(KV_) * Hd_;
  L.sk.resize(static_cast<size_t>(B) * keep * row);
  L.sv.resize(L.sk.size());
  for (int b = 0; b < B; ++b) {
    const size_t src = (static_cast<size_t>(b) * T + (T - keep)) * row, dst = static_cast<size_t>(b) * keep * row;
    std::copy(k + src, k + src + keep * row, L.sk.data() + dst);
    std::copy(v + src, v + src + keep * row, L.sv.data() + dst);
  }
  L.staged = keep;
}

void KVCache::commit(int64_t T, const std::vector<int32_t>& row_start, const int32_t* rows) {
  const int B = static_cast<int>(row_start.size());
  check_rows(rows, B);
  for (const Layer& L : layers_)
    if (L.staged < 0 || L.staged_T != T || L.staged_B != B) throw InternalError("KV cache: commit() of layers that were not staged");
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& L = layers_[i];
    if (L.sliding) write(L, view(static_cast<int>(i), rows), B, L.sk.data(), L.sv.data(), L.staged, 0, L.staged, seq_len_ + T - L.staged);
    L.staged = -1;
    if (L.sk.capacity() > (1u << 18)) {  // a long prefill's rows: give them back (decode steps keep a small buffer)
      std::vector<float>().swap(L.sk);
      std::vector<float>().swap(L.sv);
    }
  }
  if (rows) {
    std::vector<char> in(batch_, 0);
    for (int b = 0; b < B; ++b) {
      in[rows[b]] = 1;
      if (seq_len_ == 0) row_start_[rows[b]] = row_start[b];
    }
    if (T > 0)
      for (int r = 0; r < batch_; ++r)
        if (!in[r]) valid_[r] = 0;
  } else if (seq_len_ == 0) {
    row_start_ = row_start;
  }
  seq_len_ += T;
}

void KVCache::place_row(int row, const KVCache& src, int src_row) {
  if (row < 0 || row >= batch_) throw ValueError("place_row: row " + std::to_string(row) + " is out of range [0, " + std::to_string(batch_) + ")");
  if (src_row < 0 || src_row >= src.batch_)
    throw ValueError("place_row: src_row " + std::to_string(src_row) + " is out of range [0, " + std::to_string(src.batch_) + ")");
  bool same = src.layers_.size() == layers_.size() && src.KV_ == KV_ && src.Hd_ == Hd_ && src.window_ == window_ && src.dtype_ == dtype_ &&
              src.int8_ == int8_;
  for (size_t i = 0; same && i < layers_.size(); ++i) same = src.layers_[i].sliding == layers_[i].sliding;
  if (!same) throw ValueError("place_row: the source cache was made for another model, dtype or kv_dtype");
  if (&src == this) throw ValueError("place_row: the source must be another cache (copy() this one first)");
  if (!src.row_valid(src_row)) throw ValueError("place_row: source row " + std::to_string(src_row) + " is not valid (it missed positions)");
  const int64_t src_start = src.row_start_[src_row];
  if (src_start >= src.seq_len_) throw ValueError("place_row: source row " + std::to_string(src_row) + " holds no position");
  if (src.seq_len_ > seq_len_)
    throw ValueError("place_row: the source holds " + std::to_string(src.seq_len_) + " positions, more than this cache's seq_len = " +
                     std::to_string(seq_len_) + "; shift() this cache first to make room");
  const int64_t off = seq_len_ - src.seq_len_;  // source slot s -> slot s + off
  const size_t es = offset_unit(), bytes = row_bytes();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& Ls = src.layers_[i];
    Layer& Ld = layers_[i];
    const ops::KVRing rs = src.view(static_cast<int>(i)), rd = view(static_cast<int>(i));
    // the source's slots that it still holds, of the row's sequence, that this cache will hold
    const int64_t lo = std::max({src_start, src.seq_len_ - Ls.cap, seq_len_ - Ld.cap - off});
    for (int h = 0; h < KV_; ++h)
      for (int64_t s = std::max<int64_t>(lo, 0); s < src.seq_len_; ++s) {
        std::memcpy(Ld.k.data() + rd.offset(row, h, s + off) * es, Ls.k.data() + rs.offset(src_row, h, s) * es, bytes);
        std::memcpy(Ld.v.data() + rd.offset(row, h, s + off) * es, Ls.v.data() + rs.offset(src_row, h, s) * es, bytes);
      }
  }
  row_start_[row] = static_cast<int32_t>(src_start + off);
  valid_[row] = 1;
}

void KVCache::shift(int64_t d) {
  if (d == 0) return;
  const int64_t n = seq_len_ + d;
  if (n < 0 || n > max_seq_len_)
    throw ValueError("KV cache shift(" + std::to_string(d) + "): seq_len " + std::to_string(seq_len_) + " would become " + std::to_string(n) +
                     ", outside [0, max_seq_len = " + std::to_string(max_seq_len_) + "]");
  for (int r = 0; r < batch_; ++r)
    if (valid_[r] && row_start_[r] < seq_len_ && row_start_[r] + d < 0)
      throw ValueError("KV cache shift(" + std::to_string(d) + "): row " + std::to_string(r) + " starts at slot " +
                       std::to_string(row_start_[r]) + "; its sequence cannot move before slot 0");
  const size_t es = offset_unit(), bytes = row_bytes();
  std::vector<uint8_t> tmp;
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& L = layers_[i];
    const ops::KVRing ring = view(static_cast<int>(i));
    for (int r = 0; r < batch_; ++r) {
      if (!valid_[r] || row_start_[r] >= seq_len_) continue;
      const int64_t lo = std::max<int64_t>(row_start_[r], seq_len_ - L.cap), cnt = seq_len_ - lo;  // the slots held
      tmp.resize(cnt * bytes);
      for (auto* buf : {&L.k, &L.v})
        for (int h = 0; h < KV_; ++h) {  // through a copy: source and destination slots may overlap
          for (int64_t s = lo; s < seq_len_; ++s) std::memcpy(tmp.data() + (s - lo) * bytes, buf->data() + ring.offset(r, h, s) * es, bytes);
          for (int64_t s = lo; s < seq_len_; ++s) std::memcpy(buf->data() + ring.offset(r, h, s + d) * es, tmp.data() + (s - lo) * bytes, bytes);
        }
    }
  }
  for (int r = 0; r < batch_; ++r)
    row_start_[r] = static_cast<int32_t>(std::min<int64_t>(n, std::max<int64_t>(0, row_start_[r] + d)));
  seq_len_ = n;
}

void KVCache::truncate(int64_t n) {
  if (n < 0 || n > seq_len_)
    throw ValueError("KV cache truncate(" + std::to_string(n) + "): n must be in [0, seq_len = " + std::to_string(seq_len_) + "]");
  for (const auto& l : layers_) {
    // The ring holds slots [seq_len - cap, seq_len); the next query (slot n) needs [n - cap + 1, n).
    const int64_t held_lo = std::max<int64_t>(0, seq_len_ - l.cap);
    const int64_t need_lo = std::max<int64_t>(0, n - l.cap + 1);
    if (l.sliding && need_lo < n && need_lo < held_lo)
      throw ValueError("KV cache truncate(" + std::to_string(n) + "): the sliding-window ring buffers (" + std::to_string(l.cap) +
                       " slots) no longer hold positions before " + std::to_string(held_lo) +
                       "; copy() the cache at the point you want to return to instead");
  }
  seq_len_ = n;
  if (n == 0) {
    std::fill(row_start_.begin(), row_start_.end(), 0);
    std::fill(valid_.begin(), valid_.end(), 1);
  }
}

}  // namespace gemmalens
