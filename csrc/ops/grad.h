// Vector-Jacobian products of the forward kernels (ops/kernels.h, ops/attention.h), for the reverse pass.
// Each takes the forward's inputs (or outputs, where cheaper) and the gradient arriving at the output, and writes
// (or, with `accumulate`, adds) the gradient at the input. f32 throughout; the formulas are in the comments.
#pragma once
#include <cstdint>

#include "ops/attention.h"

namespace gemmalens::ops {

// y = x r (1 + w), r = 1 / sqrt(mean(x^2) + eps), rows of D:
// dx = r g - x r^3 (g . x) / D with g = dy (1 + w). x [M, D] (row stride ldx), dy / dx row strides ldy / ldd.
void rmsnorm_backward(const float* x, int64_t ldx, const float* w, float eps, int64_t M, int D, const float* dy, int64_t ldy,
                      float* dx, int64_t ldd, bool accumulate);

// The same per head: x (token m, head h) at x + m * ldx + h * Hd, dy [M, nh, Hd] contiguous (the forward's
// output layout), dx written at dx + m * ldd + h * Hd (so it lands in the fused qkv gradient).
void rmsnorm_heads_backward(const float* x, int64_t ldx, int nh, int Hd, const float* w, float eps, int64_t M, const float* dy,
                            float* dx, int64_t ldd);

// The split norm (ops::rms_scale / rms_divide / rms_gain: s = sqrt(mean(x^2) + eps), n = x / s_used, y = n (1 + w),
// where s_used is the scale after any edit at hook_scale), in the forward's rows (token m, head h at + m * ld + h * W).
// gn: the gradient at n (rms_gain of the gradient at y gives it).
// gs [M * nh] = -sum_j gn_j x_j / s_used^2: the gradient at the scale.
void rms_scale_grad(const float* x, int64_t ldx, int nh, int W, const float* s_used, int64_t M, const float* gn, int64_t ldg,
                    float* gs);
// dx = gn / s_used + gs x / (W s), s recomputed from x (ds/dx = x / (W s)); gs: the gradient at the unedited scale.
void rms_divide_backward(const float* x, int64_t ldx, int nh, int W, float eps, const float* s_used, int64_t M, const float* gn,
                         int64_t ldg, const float* gs, float* dx, int64_t ldd, bool accumulate);

// RoPE's VJP is the rotation back: ops::rope_apply(..., inverse = true) (kernels.h).

// out = gelu_tanh(gate) * up: dgate = dout up gelu'(gate), dup = dout gelu(gate), with
// gelu(x) = x / 2 (1 + tanh(z)), z = k0 (x + k1 x^3), gelu'(x) = (1 + tanh z) / 2 + x / 2 (1 - tanh^2 z) k0 (1 + 3 k1 x^2).
// gate / up [M, F] at row stride ld; dgate / dup written at row stride ldd (the fused gate_up gradient).
void gelu_tanh_mul_backward(const float* gate, const float* up, int64_t ld, int64_t M, int F, const float* dout, float* dgate,
                            float* dup, int64_t ldd);

// y = cap tanh(x / cap), given y: dx = dy (1 - (y / cap)^2), in place on dy (n values).
void softcap_backward(const float* y, float* dy, int64_t n, float cap);

// Cross-entropy of rows of logits [M, V] against targets [M], row m weighted by w[m] (0: not counted):
// returns sum_m w[m] (logsumexp(x_m) - x_m[target_m]) and writes grad [M, V] = w[m] (softmax(x_m) - onehot) unless
// grad is null (the value alone).
// Softmax sums in double. Targets must be in [0, V) where w[m] != 0.
double cross_entropy_grad(const float* logits, int64_t M, int64_t V, const int64_t* targets, const float* w, float* grad);

// The attention's VJP along its materialised path (attention.h), S = T (a whole sequence: no cache, past == 0).
// apply:   z = P V           -> dP [B, H, T, S] = dz . v_j;  dv_new [B, T, KV, Hd] += sum over the group's heads P dz
// softmax: P = softmax(s)    -> ds = P (dP - sum_j P dP)   (rows with nothing visible: 0)
// scores:  s = softcap(scale q.k) on visible slots -> dq [B, T, H, Hd], dk [B, T, KV, Hd] (written, not added)
void attention_apply_backward(const AttentionArgs& a, const float* pattern, const float* dz, float* dpattern, float* dv);
void softmax_rows_backward(const float* pattern, const float* dpattern, int64_t rows, int64_t S, float* dscores);
void attention_scores_backward(const AttentionArgs& a, const float* scores, const float* dscores, float* dq, float* dk);

}  // namespace gemmalens::ops
