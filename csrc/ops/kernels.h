// Hand-written kernels: free functions over raw f32 buffers. Every signature carries its shapes.
// Numerics follow HF transformers' Gemma 3 (fp32 RMSNorm with (1 + w), tanh GELU, fp32 softmax).
#pragma once
#include <cstdint>

#include "common.h"

namespace gemmalens::ops {

// x [M, D] (row stride ldx), w [D] raw weight -> y [M, D] (row stride ldy); y = x * rsqrt(mean(x^2) + eps) * (1 + w).
void rmsnorm(const float* x, int64_t ldx, const float* w, float eps, int64_t M, int D, float* y, int64_t ldy);

// Per-head RMSNorm: x token m, head h at x + m * ldx + h * Hd -> y [M, nh, Hd] contiguous; w [Hd].
void rmsnorm_heads(const float* x, int64_t ldx, int nh, int Hd, const float* w, float eps, int64_t M, float* y);

// x [M, D] += y [M, D]
void add_inplace(float* x, const float* y, int64_t n);

// Round every value to the nearest bf16 (keeps f32 storage): emulates a bf16 activation.
void round_bf16_inplace(float* x, int64_t n);

// Streaming read bandwidth in bytes/s: sums an nbytes buffer with all OpenMP threads (best of `reps`).
double measure_read_bandwidth(int64_t nbytes, int reps);

// RoPE tables for rotate-half RoPE: cos/sin [M, Hd/2] for positions [M], computed in f32 as HF does:
// inv_freq[j] = 1 / base^(2j/Hd) / scaling, angle = pos * inv_freq[j].
void rope_tables(const int32_t* positions, int64_t M, int Hd, double base, double scaling, float* cos_out, float* sin_out);

// In place on x [M, nh, Hd]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), pairs (j, j + Hd/2).
void rope_apply(float* x, int64_t M, int nh, int Hd, const float* cos, const float* sin);

// gate [M, F] (row stride ld), up [M, F] (row stride ld) -> out [M, F] = gelu_tanh(gate) * up.
void gelu_tanh_mul(const float* gate, const float* up, int64_t ld, int64_t M, int F, float* out);

// x = cap * tanh(x / cap), in place over n values.
void softcap_inplace(float* x, int64_t n, float cap);

// Causal (optionally sliding-window) GQA attention over a chunk of T new positions per row with
// `past` earlier slots in a ring-buffer cache.
//   q [B, T, H, Hd] (after q_norm + RoPE), k_new / v_new [B, T, KV, Hd];
//   k_past / v_past [B, KV, cap, Hd] in `past_dtype` (slot s lives at s % cap), or null when past == 0;
//   row_start [B]: first real slot of each row (left padding); slots before it are never attended.
// Query slot i (= past + t) sees key slot j iff row_start <= j <= i and, if window > 0, i - j < window.
// scores = q.k * scale (then softcap if > 0), softmax in f32, z [B, T, H, Hd] = sum p_j v_j.
// Query rows with no visible key (padding) get z = 0.
struct AttentionArgs {
  int B = 0, T = 0, H = 0, KV = 0, Hd = 0;
  const float* q = nullptr;
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const void* k_past = nullptr;
  const void* v_past = nullptr;
  DType past_dtype = DType::F32;
  int64_t cap = 0;
  int64_t past = 0;
  const int32_t* row_start = nullptr;
  int64_t window = 0;
  float scale = 1.f;
  float softcap = 0.f;
  float* z = nullptr;
  DType compute = DType::F32;  // the model's dtype: bf16 models may round q, k, v and probabilities to bf16
};
// Key / value row of slot j for (b, kvh): from the chunk (f32) or the ring (f32 or bf16); both null if the ring no
// longer holds it.
struct KVRow {
  const float* f = nullptr;
  const uint16_t* h = nullptr;
};
inline KVRow kv_row(const AttentionArgs& a, const float* chunk, const void* ring, int b, int kvh, int64_t j) {
  KVRow r;
  if (j >= a.past) {
    r.f = chunk + ((static_cast<int64_t>(b) * a.T + (j - a.past)) * a.KV + kvh) * a.Hd;
  } else if (j >= a.past - a.cap && ring) {
    const int64_t off = ((static_cast<int64_t>(b) * a.KV + kvh) * a.cap + j % a.cap) * a.Hd;
    if (a.past_dtype == DType::F32)
      r.f = static_cast<const float*>(ring) + off;
    else
      r.h = static_cast<const uint16_t*>(ring) + off;
  }
  return r;
}
// The attention with its intermediate tensors materialised (for the scores / pattern hooks), S = past + T:
// scores [B, H, T, S] = q.k * scale (softcap), -inf where masked or no longer held by the ring;
// pattern [B, H, T, S] = softmax over the last axis (rows with nothing visible: 0);
// z [B, T, H, Hd] = pattern . V (keys the ring no longer holds contribute nothing).
void attention_scores(const AttentionArgs& a, float* scores);
void softmax_rows(const float* scores, int64_t rows, int64_t S, float* pattern);
void attention_apply(const AttentionArgs& a, const float* pattern, float* z);

// Tiled online-softmax (flash-attention style) kernel: AVX-512 when the CPU has it, else the reference.
// Prefill chunks of a bf16 model (bf16 cache) on a CPU with AMX take attention_bf16_matmul instead.
void attention(const AttentionArgs& a);
// Prefill attention as two oneDNN bf16 matmuls per block of queries (QK^T, then PV), f32 softmax between them:
// q, k, v and the probabilities rounded to bf16 (as every matmul input of a bf16 model), f32 accumulation.
// Returns false (and does nothing) unless oneDNN runs bf16 on AMX here (elsewhere the f32 tiled kernel is faster).
bool attention_bf16_matmul(const AttentionArgs& a);
// The direct kernel: one query at a time, full softmax. Simple and slow; the numerical reference.
void attention_reference(const AttentionArgs& a);

}  // namespace gemmalens::ops
