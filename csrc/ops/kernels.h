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

// RMSNorm in TransformerLens's three steps, for the hook sites inside a norm (hook_scale, hook_normalized, hook_out).
// Rows r = m * nh + h: token m, head h at x + m * ldx + h * W (nh = 1 for the residual stream's norms). With the
// scale unedited, rms_divide then rms_gain give rmsnorm's / rmsnorm_heads' output bit for bit.
// scale [M * nh] = sqrt(mean(x_r^2) + eps)
void rms_scale(const float* x, int64_t ldx, int nh, int W, float eps, int64_t M, float* scale);
// y_r = x_r * (1 / scale_r), y rows at y + m * ldy + h * W (y may be x)
void rms_divide(const float* x, int64_t ldx, int nh, int W, const float* scale, int64_t M, float* y, int64_t ldy);
// y_r *= (1 + w), w [W]
void rms_gain(float* y, int64_t ldy, int nh, int W, const float* w, int64_t M);

// x [M, D] += y [M, D]
void add_inplace(float* x, const float* y, int64_t n);

// Round every value to the nearest bf16 (keeps f32 storage): emulates a bf16 activation.
void round_bf16_inplace(float* x, int64_t n);

// Streaming read bandwidth in bytes/s: sums an nbytes buffer with all OpenMP threads (best of `reps`).
double measure_read_bandwidth(int64_t nbytes, int reps);

// RoPE tables for rotate-half RoPE: cos/sin [M, Hd/2] for positions [M], computed in f32 as HF does:
// inv_freq[j] = 1 / base^(2j/Hd) / scaling, angle = pos * inv_freq[j].
void rope_tables(const int32_t* positions, int64_t M, int Hd, double base, double scaling, float* cos_out, float* sin_out);

// In place on x [M, nh, Hd]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), pairs (j, j + Hd/2). inverse: the
// rotation back, (x1 cos + x2 sin, x2 cos - x1 sin) -- the VJP of the forward rotation.
void rope_apply(float* x, int64_t M, int nh, int Hd, const float* cos, const float* sin, bool inverse = false);

// gate [M, F] (row stride ld), up [M, F] (row stride ld) -> out [M, F] = gelu_tanh(gate) * up.
void gelu_tanh_mul(const float* gate, const float* up, int64_t ld, int64_t M, int F, float* out);

// x = cap * tanh(x / cap), in place over n values.
void softcap_inplace(float* x, int64_t n, float cap);

}  // namespace gemmalens::ops
