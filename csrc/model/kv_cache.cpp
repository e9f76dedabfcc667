#include "model/kv_cache.h"

#include <algorithm>
#include <string>
#include <unistd.h>

namespace gemmalens {

KVCache::KVCache(const Gemma3Config& cfg, int batch, int64_t max_seq_len, DType dtype)
    : batch_(batch), KV_(cfg.num_key_value_heads), Hd_(cfg.head_dim), window_(cfg.sliding_window), max_seq_len_(max_seq_len),
      dtype_(dtype) {
  cfg.validate();
  if (batch <= 0) throw ValueError("KV cache: batch must be > 0, got " + std::to_string(batch));
  if (max_seq_len <= 0) throw ValueError("KV cache: max_seq_len must be > 0, got " + std::to_string(max_seq_len));
  const size_t es = dtype == DType::F32 ? 4 : 2;
  // The whole size first, overflow-checked, and refused when it exceeds the machine's memory (the alternative is
  // the OOM killer, or minutes of swapping, after a typo in batch or max_seq_len).
  uint64_t total = 0;
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    const uint64_t cap = cfg.is_sliding(i) ? std::min<int64_t>(cfg.sliding_window, max_seq_len) : max_seq_len;
    uint64_t n = 2 * es;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(batch), &n) || __builtin_mul_overflow(n, static_cast<uint64_t>(KV_), &n) ||
        __builtin_mul_overflow(n, cap, &n) || __builtin_mul_overflow(n, static_cast<uint64_t>(Hd_), &n) ||
        __builtin_add_overflow(total, n, &total))
      total = UINT64_MAX;
  }
  const uint64_t phys = static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  if (total > phys)
    throw ValueError("KV cache for batch " + std::to_string(batch) + " and max_seq_len " + std::to_string(max_seq_len) + " needs " +
                     (total == UINT64_MAX ? std::string("more than 2^64") : std::to_string(total >> 20) + " MiB") + ", more than this machine's " +
                     std::to_string(phys >> 20) + " MiB of memory; use a smaller batch or max_seq_len");
  row_start_.assign(batch, 0);
  for (int i = 0; i < cfg.num_hidden_layers; ++i) {
    Layer l;
    l.sliding = cfg.is_sliding(i);
    l.cap = l.sliding ? std::min<int64_t>(cfg.sliding_window, max_seq_len) : max_seq_len;
    const size_t n = static_cast<size_t>(batch) * KV_ * l.cap * Hd_ * es;
    l.k.assign(n, 0);
    l.v.assign(n, 0);
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

ops::KVRing KVCache::view(int l) const {
  const Layer& L = layers_[l];
  ops::KVRing r;
  r.k = L.k.data();
  r.v = L.v.data();
  r.dtype = dtype_;
  r.KV = KV_;
  r.Hd = Hd_;
  r.cap = L.cap;
  return r;
}

void KVCache::write(Layer& L, const ops::KVRing& ring, const float* k, const float* v, int64_t T, int64_t t0, int64_t n,
                    int64_t first_slot) {
  for (int b = 0; b < batch_; ++b)
    for (int64_t t = t0; t < t0 + n; ++t)
      for (int h = 0; h < KV_; ++h) {
        const float* ks = k + ((b * T + t) * KV_ + h) * Hd_;
        const float* vs = v + ((b * T + t) * KV_ + h) * Hd_;
        const int64_t off = ring.offset(b, h, first_slot + (t - t0));
        if (dtype_ == DType::F32) {
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

void KVCache::stage(int l, const float* k, const float* v, int64_t T) {
  if (l < 0 || l >= static_cast<int>(layers_.size())) throw InternalError("KV cache: stage() for a layer it does not have");
  Layer& L = layers_[l];
  if (seq_len_ + T > max_seq_len_)
    throw ValueError("KV cache is full: " + std::to_string(seq_len_) + " + " + std::to_string(T) + " positions exceed max_seq_len = " +
                     std::to_string(max_seq_len_) + "; create the cache with a larger max_seq_len");
  L.staged_T = T;
  if (!L.sliding) {  // slots past seq_len are not read before commit(): write them in place
    write(L, view(l), k, v, T, 0, T, seq_len_);
    L.staged = 0;
    return;
  }
  const int64_t keep = std::min<int64_t>(T, L.cap);  // older rows of the chunk would be overwritten anyway
  const size_t row = static_cast<size_t>(KV_) * Hd_;
  L.sk.resize(static_cast<size_t>(batch_) * keep * row);
  L.sv.resize(L.sk.size());
  for (int b = 0; b < batch_; ++b) {
    const size_t src = (static_cast<size_t>(b) * T + (T - keep)) * row, dst = static_cast<size_t>(b) * keep * row;
    std::copy(k + src, k + src + keep * row, L.sk.data() + dst);
    std::copy(v + src, v + src + keep * row, L.sv.data() + dst);
  }
  L.staged = keep;
}

void KVCache::commit(int64_t T, const std::vector<int32_t>& row_start) {
  for (const Layer& L : layers_)
    if (L.staged < 0 || L.staged_T != T) throw InternalError("KV cache: commit() of layers that were not staged");
  for (size_t i = 0; i < layers_.size(); ++i) {
    Layer& L = layers_[i];
    if (L.sliding) write(L, view(static_cast<int>(i)), L.sk.data(), L.sv.data(), L.staged, 0, L.staged, seq_len_ + T - L.staged);
    L.staged = -1;
    if (L.sk.capacity() > (1u << 18)) {  // a long prefill's rows: give them back (decode steps keep a small buffer)
      std::vector<float>().swap(L.sk);
      std::vector<float>().swap(L.sv);
    }
  }
  if (seq_len_ == 0) row_start_ = row_start;
  seq_len_ += T;
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
  if (n == 0) std::fill(row_start_.begin(), row_start_.end(), 0);
}

}  // namespace gemmalens
