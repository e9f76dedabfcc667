// Shared basics: error types, dtypes, bf16/f16 conversion.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace gemmalens {

// Library code throws, never exits. The bindings map these to Python exceptions:
//   ValueError      -> ValueError         (bad arguments: shapes, ids, config values)
//   CheckpointError -> gemmalens.CheckpointError (a ValueError: missing/corrupt/mis-shaped files)
//   IOError         -> OSError            (cannot open/map a file)
struct ValueError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct CheckpointError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct IOError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
//   ResourceError   -> MemoryError        (oneDNN or the OS could not provide memory for a buffer)
//   InternalError   -> RuntimeError       (a broken invariant inside gemmalens: a bug to report)
struct ResourceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct InternalError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "[a, b, c]": how every error message writes a shape.
inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// Element count of a shape the code itself made (sizes already bounded: no overflow check).
inline int64_t numel(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}
// The same for a shape read from a file: false when a dimension is negative or the count overflows int64.
inline bool numel_checked(const std::vector<int64_t>& s, int64_t& n) {
  n = 1;
  for (auto d : s)
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return false;
  return true;
}

// The shape-mismatch error every loader raises: tensor `name` has `got` where the config implies `want`.
inline CheckpointError shape_mismatch(const std::string& name, const std::vector<int64_t>& got, const std::vector<int64_t>& want,
                                      const std::string& hint = "") {
  return CheckpointError("tensor '" + name + "' has shape " + shape_str(got) + " but the config expects " + shape_str(want) + hint);
}

enum class DType { F32, BF16 };
// How matmul weights are stored: in the compute dtype, or quantised in blocks of 32 (ops/quant.h).
enum class WeightQuant { None, Int8, Int4 };

inline const char* dtype_name(DType d) { return d == DType::F32 ? "float32" : "bfloat16"; }
// The names `dtype=` takes everywhere in the API; ValueError quoting anything else.
inline DType parse_dtype(const std::string& s) {
  if (s == "float32" || s == "f32" || s == "fp32") return DType::F32;
  if (s == "bfloat16" || s == "bf16") return DType::BF16;
  throw ValueError("dtype must be 'float32' or 'bfloat16', got '" + s + "'");
}
// `weights=` as the native core takes it ("auto" is resolved in Python, from the file).
inline WeightQuant parse_weight_quant(const std::string& w) {
  if (w == "native") return WeightQuant::None;
  if (w == "int8") return WeightQuant::Int8;
  if (w == "int4") return WeightQuant::Int4;
  throw ValueError("weights must be 'native' (the compute dtype), 'int8' or 'int4', got '" + w + "'");
}
inline const char* weight_quant_name(WeightQuant q) {
  return q == WeightQuant::Int8 ? "int8" : q == WeightQuant::Int4 ? "int4" : "native";
}

// bf16 <-> f32, round-to-nearest-even (as torch's .to(torch.bfloat16)); NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// IEEE half -> f32 (load time only).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace gemmalens
