// Causal, optionally sliding-window GQA attention over a chunk of new positions and a ring-buffer KV cache.
// The rules every variant shares are written once here: which key slots a query sees (visible_range) and where
// a key / value row lives (KVRing::offset for the cache, kv_row for cache or chunk).
//
// Variants (one dispatcher, attention(), picks among the fast ones; all compute the same function):
//   attention_tiled.cpp      tiled online softmax (AVX-512 / AVX2) for prefill
//   attention_decode.cpp     decode steps: split-K over the visible keys, each key read once per KV head
//   attention_bf16.cpp       prefill as two bf16 matmuls per block of queries (oneDNN on AMX or AMD's AVX512_BF16)
//   attention.cpp            the dispatcher, the direct reference kernel, and the materialised path
//                            (scores -> softmax -> apply) that the attn_scores / pattern hooks read and edit
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.h"
#include "ops/vmath.h"

namespace gemmalens::ops {

// An int8 KV cache (KVCache with kv_dtype "int8") holds each key / value row of Hd values (Hd % 32 == 0) as Hd int8
// values q followed by Hd / 32 f32 scales d, one per block of 32 (value = q * d, d = max|x| / 127 over the block, q =
// x / d rounded to nearest, even on ties: ggml's Q8_0 rule, with an f32 scale where ggml keeps an f16 one): 1.125
// bytes per value against bf16's 2.
constexpr int kKVBlock = 32;
inline int64_t kv_int8_row_bytes(int Hd) { return Hd + Hd / kKVBlock * static_cast<int64_t>(sizeof(float)); }
// x [Hd] -> the row's int8 values and scales (q [Hd], then the scales at q + Hd).
void kv_int8_quantize(const float* x, int Hd, int8_t* q);

// One layer of a KV cache as the attention reads it: k and v [rows, KV, cap, Hd] in `dtype` (int8: rows of
// kv_int8_row_bytes(Hd) bytes, see above; `dtype` is then the model's); slot s lives at s % cap (a ring when cap is
// the sliding window, plain storage when cap = max_seq_len). Row b of a pass is the cache's row rows[b] when `rows`
// is set (a pass over some of the cache's rows: continuous batching), else row b.
struct KVRing {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::F32;
  bool int8 = false;
  int KV = 0, Hd = 0;
  int64_t cap = 0;
  const int32_t* rows = nullptr;  // [B] or null
  // A slot's row length in elements of its storage (int8: bytes).
  int64_t stride() const { return int8 ? kv_int8_row_bytes(Hd) : Hd; }
  // Offset (in those elements) of slot s of row b, KV head kvh: the ring rule, for readers and the cache's writer.
  int64_t offset(int b, int kvh, int64_t s) const {
    const int64_t r = rows ? rows[b] : b;
    return ((r * KV + kvh) * cap + s % cap) * stride();
  }
};

// Which kernels a bf16 model's decode step takes (attention_decode_path): the CPU's choice, or the vdpbf16ps ones
// wherever the class has AVX512_BF16 (_testing.attention: the tests run that kernel on a CPU that chooses another).
enum class DecodeKernelChoice { Auto, Vdpbf16ps };

// q [B, T, H, Hd] (after q_norm + RoPE), k_new / v_new [B, T, KV, Hd] for the T new positions (slots past ..
// past + T - 1); `cache` holds slots before `past` (empty when past == 0); row_start [B]: first real slot of each
// row (left padding), null for none. scores = q.k * scale (then softcap if > 0), softmax in f32,
// z [B, T, H, Hd] = sum p_j v_j. Query rows with no visible key (padding) get z = 0.
struct AttentionArgs {
  int B = 0, T = 0, H = 0, KV = 0, Hd = 0;
  const float* q = nullptr;
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  KVRing cache;
  int64_t past = 0;
  const int32_t* row_start = nullptr;
  int64_t window = 0;  // > 0: sliding window, counting the query's own slot
  float scale = 1.f;
  float softcap = 0.f;
  float* z = nullptr;
  DType compute = DType::F32;  // the model's dtype: bf16 models may round q, k, v and probabilities to bf16
  DecodeKernelChoice decode_kernel = DecodeKernelChoice::Auto;
};

// The key slots query slot i of row b sees: [lo, hi] with hi = i; empty (lo > hi) for a padding query.
// Slot j is visible iff row_start <= j <= i and, with a window, i - j < window.
struct SlotRange {
  int64_t lo, hi;
};
inline SlotRange visible_range(const AttentionArgs& a, int b, int64_t i) {
  int64_t lo = a.row_start ? std::max<int64_t>(a.row_start[b], 0) : 0;
  if (a.window > 0) lo = std::max<int64_t>(lo, i - a.window + 1);
  return {lo, i};
}

// Key or value row of slot j for (b, kvh): from the new chunk (f32) or the cache (f32, bf16, or int8 values q with
// their block scales s); all null when the ring no longer holds the slot (never for a visible slot: the window fits
// the ring).
struct KVRow {
  const float* f = nullptr;
  const uint16_t* h = nullptr;
  const int8_t* q = nullptr;
  const float* s = nullptr;  // q's scales: value d is q[d] * s[d / 32]
  bool held() const { return f || h || q; }
};
inline KVRow kv_row(const AttentionArgs& a, bool value, int b, int kvh, int64_t j) {
  KVRow r;
  if (j >= a.past) {
    r.f = (value ? a.v_new : a.k_new) + ((static_cast<int64_t>(b) * a.T + (j - a.past)) * a.KV + kvh) * a.Hd;
    return r;
  }
  const void* ring = value ? a.cache.v : a.cache.k;
  if (!ring || j < a.past - a.cache.cap) return r;
  const int64_t off = a.cache.offset(b, kvh, j);
  if (a.cache.int8) {
    r.q = static_cast<const int8_t*>(ring) + off;
    r.s = reinterpret_cast<const float*>(r.q + a.Hd);  // 4-byte aligned: Hd and the row length are multiples of 4
  } else if (a.cache.dtype == DType::F32)
    r.f = static_cast<const float*>(ring) + off;
  else
    r.h = static_cast<const uint16_t*>(ring) + off;
  return r;
}
// A row of any storage as Hd f32 values (an absent row: zeros).
inline void kv_row_f32(const KVRow& r, int Hd, float* out) {
  if (r.f) {
    std::copy(r.f, r.f + Hd, out);
  } else if (r.h) {
    for (int d = 0; d < Hd; ++d) out[d] = bf16_to_f32(r.h[d]);
  } else if (r.q) {
    for (int d = 0; d < Hd; ++d) out[d] = static_cast<float>(r.q[d]) * r.s[d / kKVBlock];
  } else {
    std::fill(out, out + Hd, 0.f);
  }
}
// q . k for a key row of any storage (the int8 cache's a block of 32 at a time, times its scale).
inline float kv_dot(const float* q, const KVRow& k, int Hd) {
  if (k.q) {
    float acc = 0.f;
    for (int g = 0; g < Hd; g += kKVBlock) acc += dot_i8(q + g, k.q + g, kKVBlock) * k.s[g / kKVBlock];
    return acc;
  }
  return k.f ? dot_f32(q, k.f, Hd) : dot_bf16(q, k.h, Hd);
}
// z += w * v for a value row of any storage (an absent row contributes nothing).
inline void kv_axpy(float w, const KVRow& v, float* z, int Hd) {
  if (v.f)
    axpy_f32(w, v.f, z, Hd);
  else if (v.h)
    axpy_bf16(w, v.h, z, Hd);
  else if (v.q)
    for (int g = 0; g < Hd; g += kKVBlock) axpy_i8(w * v.s[g / kKVBlock], v.q + g, z + g, kKVBlock);
}
inline KVRow key_row(const AttentionArgs& a, int b, int kvh, int64_t j) { return kv_row(a, false, b, kvh, j); }
inline KVRow value_row(const AttentionArgs& a, int b, int kvh, int64_t j) { return kv_row(a, true, b, kvh, j); }

// The kernels a decode step (attention_decode_splitk) takes: vdpbf16ps for a bf16 model over a bf16 cache where
// the class has it and it is fast (attention_decode_vdpbf16ps(): AVX512_BF16 or AMX, not on Intel; q and the
// probabilities rounded to bf16, as the model's dtype allows), AVX-512
// f32 FMAs (the cache's bf16 rows widened) for the rest with Hd % 64 == 0 on AVX-512, else AVX2 FMAs (Hd % 32 == 0;
// loops at the build's AVX2 baseline for any other). gl.cpu_info()["attention_decode_bf16"] names the first that a
// bf16 model gets in the active class.
enum class AttentionDecodePath { Vdpbf16ps, Avx512, Portable };
AttentionDecodePath attention_decode_path(const AttentionArgs& a);

// The fastest variant for these arguments on this CPU.
void attention(const AttentionArgs& a);

// The direct kernel: one query at a time, full softmax. Simple and slow; the numerical reference.
void attention_reference(const AttentionArgs& a);

// Tiled online-softmax (flash-attention style) kernel, AVX-512 or AVX2 by the CPU class; needs Hd % 16 == 0
// (attention_tiled_ok).
bool attention_tiled_ok(const AttentionArgs& a);
void attention_tiled(const AttentionArgs& a);
// Decode (a few queries over many keys): each (row, KV head)'s visible keys split in chunks that run in parallel,
// read straight from the cache once for all the group's query heads, merged with the online-softmax rescaling
// (attention_decode.cpp). A sliding layer reads only its window.
void attention_decode_splitk(const AttentionArgs& a);

// Prefill attention as two bf16 matmuls per block of queries (QK^T, then PV), f32 softmax between them:
// q, k, v and the probabilities rounded to bf16 (as every matmul input of a bf16 model), f32 accumulation.
// Returns false (and does nothing) unless attention_prefill_bf16_matmul() (ops/cpu.h: AMX, or AVX512_BF16 on AMD;
// elsewhere the f32 tiled kernel is faster).
bool attention_bf16_matmul(const AttentionArgs& a);

// The attention with its intermediate tensors materialised (for the scores / pattern hooks), S = past + T:
// scores [B, H, T, S] = q.k * scale (softcap), -inf where masked or no longer held by the ring;
// pattern [B, H, T, S] = softmax over the last axis (rows with nothing visible: 0);
// z [B, T, H, Hd] = pattern . V (keys the ring no longer holds contribute nothing).
void attention_scores(const AttentionArgs& a, float* scores);
void softmax_rows(const float* scores, int64_t rows, int64_t S, float* pattern);
void attention_apply(const AttentionArgs& a, const float* pattern, float* z);

}  // namespace gemmalens::ops
