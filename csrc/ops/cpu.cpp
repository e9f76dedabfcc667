#include "ops/cpu.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>

#include "common.h"
#include "ops/linear.h"  // onednn_limit_isa / onednn_isa: oneDNN itself stays in linear_dnnl.cpp

namespace gemmalens::ops {

namespace {

constexpr const char* kNames[kCpuClasses] = {"avx2", "avx2_vnni", "avx512", "avx512_bf16", "amx"};

// What the CPU (and the OS, for the AVX-512 and AMX register state: GCC's checks read XCR0) offers, class by class.
bool cpu_runs(CpuClass c) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx_vnni = __builtin_cpu_supports("avxvnni");
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512vnni");
  static const bool bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                          __builtin_cpu_supports("amx-int8");
  switch (c) {
    case CpuClass::Avx2: return avx2;
    case CpuClass::Avx2Vnni: return avx2 && avx_vnni;
    case CpuClass::Avx512: return avx2 && avx512;
    case CpuClass::Avx512Bf16: return avx2 && avx512 && bf16;
    case CpuClass::Amx: return avx2 && avx512 && bf16 && amx;
  }
  return false;
}

// The highest class the CPU runs that is at most `limit` (classes are not nested: an AVX-512 CPU may lack AVX-VNNI).
CpuClass highest_at_most(CpuClass limit) {
  for (int c = static_cast<int>(limit); c > 0; --c)
    if (cpu_runs(static_cast<CpuClass>(c))) return static_cast<CpuClass>(c);
  return CpuClass::Avx2;
}

CpuState decide() {
  CpuState s;
  for (int c = 0; c < kCpuClasses; ++c)
    if (cpu_runs(static_cast<CpuClass>(c))) s.supported.push_back(static_cast<CpuClass>(c));
  s.detected = highest_at_most(CpuClass::Amx);
  s.intel = __builtin_cpu_is("intel");
  CpuClass limit = s.detected;
  if (const char* env = std::getenv("GEMMALENS_MAX_ISA"); env && *env) {
    s.cap = env;
    std::string v = env;
    std::transform(v.begin(), v.end(), v.begin(), [](unsigned char ch) { return std::tolower(ch); });
    const auto* it = std::find_if(std::begin(kNames), std::end(kNames), [&](const char* n) { return v == n; });
    if (it == std::end(kNames))
      throw ValueError("GEMMALENS_MAX_ISA must be one of avx2, avx2_vnni, avx512, avx512_bf16, amx (the highest CPU "
                       "class gemmalens may use), got '" + s.cap + "'; unset it to use everything this CPU has (" +
                       kNames[static_cast<int>(s.detected)] + ")");
    limit = highest_at_most(std::min(s.detected, static_cast<CpuClass>(it - std::begin(kNames))));
  }
  s.onednn_user_cap = std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr || std::getenv("DNNL_MAX_CPU_ISA") != nullptr;
  // oneDNN reads its cap once, at its first ISA query; nothing in gemmalens queries it before this function runs.
  // A cap the user gave oneDNN directly stands (and lowers the class below if it is lower).
  if (limit < s.detected && !s.onednn_user_cap) onednn_limit_isa(limit);
  s.active = highest_at_most(std::min(limit, onednn_class()));
  s.onednn_isa = onednn_isa();
  return s;
}

}  // namespace

const char* cpu_class_name(CpuClass c) { return kNames[static_cast<int>(c)]; }

const CpuState& cpu_state() {
  static const CpuState s = decide();
  return s;
}

std::vector<std::pair<std::string, std::string>> cpu_paths() {
  const CpuClass c = cpu_class();
  const char* quant = quant_kernel_path() == QuantKernelPath::Vnni512  ? "vnni512"
                      : quant_kernel_path() == QuantKernelPath::AvxVnni ? "avx_vnni"
                                                                        : "avx2_maddubs";
  const char* onednn_bf16 = c == CpuClass::Amx ? "onednn_amx" : "onednn_avx512_bf16";
  const char* own = bf16_gemv_path() == Bf16GemvPath::Vdpbf16ps     ? "vdpbf16ps"
                    : bf16_gemv_path() == Bf16GemvPath::Avx512Widen ? "avx512_widen"
                                                                    : "avx2_widen";
  const char* tiled = use_avx512() ? "tiled_avx512" : "tiled_avx2";
  // What a 512-token prefill's layer matmuls take, and the LM head past 4 rows (a vocabulary of a multiple of 64
  // rows, as every Gemma 3's: the same blocked layout as the layers; another one stays row-major and takes oneDNN).
  const bool own_prefill = bf16_own_max_m() >= 512;
  const char* widened = bf16_large_m_widened()                        ? "avx512_widen"
                        : bf16_matmul_path() == Bf16MatmulPath::OneDnn ? onednn_bf16
                                                                       : "widened_f32_onednn";
  return {
      {"bf16_matmul", own_prefill ? own : widened},
      {"bf16_lm_head", own_prefill ? own : widened},
      {"decode_bf16", own},
      {"int8", quant},
      {"int4", quant},
      {"int8_prefill", quant_dequant_min_m() > 512 ? quant : "dequant_bf16_onednn_amx"},
      {"attention", tiled},
      {"attention_decode_bf16", attention_decode_vdpbf16ps() ? "vdpbf16ps" : use_avx512() ? "avx512" : "avx2"},
      {"attention_bf16_prefill",
       use_amx() ? "onednn_amx" : attention_prefill_bf16_matmul() ? "onednn_avx512_bf16" : tiled},
      {"f32_matmul", f32_own_panels() ? "avx2_panels" : "onednn"},
      {"elementwise", use_avx512() ? "avx512" : "avx2"},
  };
}

}  // namespace gemmalens::ops
