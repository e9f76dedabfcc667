// Block formats (ggml): every block stores its scale(s) as IEEE half. QK_K = 256 for the K-quants.
#include "ops/dequant.h"

#include <cstring>
#include <stdexcept>

#include "common.h"

namespace gemmalens::ops {

namespace {

inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// Q8_0 {f16 d; i8 qs[32]}: x = d * q
void dq_q8_0(const uint8_t* b, float* y) {
  const float d = half(b);
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < 32; ++i) y[i] = d * q[i];
}
// Q4_0 {f16 d; u8 qs[16]}: low nibbles -> elements 0..15, high -> 16..31, x = d * (q - 8)
void dq_q4_0(const uint8_t* b, float* y) {
  const float d = half(b);
  const uint8_t* q = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * ((q[j] & 0x0F) - 8);
    y[j + 16] = d * ((q[j] >> 4) - 8);
  }
}
// Q4_1 {f16 d; f16 m; u8 qs[16]}: x = d * q + m
void dq_q4_1(const uint8_t* b, float* y) {
  const float d = half(b), m = half(b + 2);
  const uint8_t* q = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (q[j] & 0x0F) + m;
    y[j + 16] = d * (q[j] >> 4) + m;
  }
}
// Q5_0 {f16 d; u8 qh[4]; u8 qs[16]}: 5th bit of element j in bit j of qh, x = d * (q - 16)
void dq_q5_0(const uint8_t* b, float* y) {
  const float d = half(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* q = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = d * (((q[j] & 0x0F) | h0) - 16);
    y[j + 16] = d * (((q[j] >> 4) | h1) - 16);
  }
}
// Q5_1 {f16 d; f16 m; u8 qh[4]; u8 qs[16]}: x = d * q + m
void dq_q5_1(const uint8_t* b, float* y) {
  const float d = half(b), m = half(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* q = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
    y[j] = d * ((q[j] & 0x0F) | h0) + m;
    y[j + 16] = d * ((q[j] >> 4) | h1) + m;
  }
}
// 6-bit (scale, min) pair j of the 12-byte K-quant scale array.
inline void scale_min_k4(int j, const uint8_t* s, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}
// Q4_K {f16 d; f16 dmin; u8 scales[12]; u8 qs[128]}: 8 sub-blocks of 32, x = d*sc*q - dmin*m
void dq_q4_k(const uint8_t* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
    int sc, mn;
    scale_min_k4(is, s, sc, mn);
    const float d1 = d * sc, m1 = dmin * mn;
    scale_min_k4(is + 1, s, sc, mn);
    const float d2 = d * sc, m2 = dmin * mn;
    for (int l = 0; l < 32; ++l) y[j + l] = d1 * (q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) y[j + 32 + l] = d2 * (q[l] >> 4) - m2;
  }
}
// Q5_K {f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
void dq_q5_k(const uint8_t* b, float* y) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* s = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* q = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32, u1 <<= 2, u2 <<= 2) {
    int sc, mn;
    scale_min_k4(is, s, sc, mn);
    const float d1 = d * sc, m1 = dmin * mn;
    scale_min_k4(is + 1, s, sc, mn);
    const float d2 = d * sc, m2 = dmin * mn;
    for (int l = 0; l < 32; ++l) y[j + l] = d1 * ((q[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) y[j + 32 + l] = d2 * ((q[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
  }
}
// Q6_K {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: 16 sub-blocks of 16, x = d * sc * (q - 32)
void dq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[n + l] = d * sc[is] * q1;
      y[n + l + 32] = d * sc[is + 2] * q2;
      y[n + l + 64] = d * sc[is + 4] * q3;
      y[n + l + 96] = d * sc[is + 6] * q4;
    }
  }
}

}  // namespace

std::string ggml_type_name(uint32_t t) {
  static const char* names[] = {"F32",  "F16",  "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
                                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
                                "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64",
                                "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4",
                                "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4"};
  if (t < sizeof(names) / sizeof(names[0])) return names[t];
  return "type " + std::to_string(t);
}

BlockInfo ggml_block_info(uint32_t t) {
  switch (static_cast<GGMLType>(t)) {
    case GGMLType::F32: return {1, 4};
    case GGMLType::F16: return {1, 2};
    case GGMLType::BF16: return {1, 2};
    case GGMLType::Q8_0: return {32, 34};
    case GGMLType::Q4_0: return {32, 18};
    case GGMLType::Q4_1: return {32, 20};
    case GGMLType::Q5_0: return {32, 22};
    case GGMLType::Q5_1: return {32, 24};
    case GGMLType::Q4_K: return {256, 144};
    case GGMLType::Q5_K: return {256, 176};
    case GGMLType::Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

void dequantize(uint32_t type, const uint8_t* src, int64_t n, float* dst) {
  const BlockInfo bi = ggml_block_info(type);
  if (bi.elems == 0) throw CheckpointError("GGUF tensor type " + ggml_type_name(type) + " is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
  const int64_t nb = n / bi.elems;
  void (*fn)(const uint8_t*, float*) = nullptr;
  switch (static_cast<GGMLType>(type)) {
    case GGMLType::F32: std::memcpy(dst, src, n * 4); return;
    case GGMLType::F16:
      for (int64_t i = 0; i < n; ++i) { uint16_t h; std::memcpy(&h, src + 2 * i, 2); dst[i] = f16_to_f32(h); }
      return;
    case GGMLType::BF16:
      for (int64_t i = 0; i < n; ++i) { uint16_t h; std::memcpy(&h, src + 2 * i, 2); dst[i] = bf16_to_f32(h); }
      return;
    case GGMLType::Q8_0: fn = dq_q8_0; break;
    case GGMLType::Q4_0: fn = dq_q4_0; break;
    case GGMLType::Q4_1: fn = dq_q4_1; break;
    case GGMLType::Q5_0: fn = dq_q5_0; break;
    case GGMLType::Q5_1: fn = dq_q5_1; break;
    case GGMLType::Q4_K: fn = dq_q4_k; break;
    case GGMLType::Q5_K: fn = dq_q5_k; break;
    case GGMLType::Q6_K: fn = dq_q6_k; break;
    default: break;
  }
#pragma omp parallel for if (nb > 4096)
  for (int64_t i = 0; i < nb; ++i) fn(src + i * bi.bytes, dst + i * bi.elems);
}

}  // namespace gemmalens::ops
