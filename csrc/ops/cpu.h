// The CPU class: the one place that decides which kernels run. Every dispatch site in the ops asks cpu_class() (or
// one of the path functions below), never the CPU itself, so GEMMALENS_MAX_ISA can force any lower class for tests
// and benchmarks. README, "CPU classes".
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace gemmalens::ops {

// Lowest to highest. Each class has its own fast path for every op family (see the path functions below).
enum class CpuClass : int {
  Avx2 = 0,        // AVX2 + FMA + F16C (the build's baseline, x86-64-v3): most laptops before 2021, Zen 1-3
  Avx2Vnni = 1,    // + AVX-VNNI (vpdpbusd on ymm): Alder Lake and later client CPUs without AVX-512
  Avx512 = 2,      // AVX-512 F/BW/DQ/VL + VNNI: Skylake-X (VNNI from Cascade Lake), Ice Lake, Tiger Lake
  Avx512Bf16 = 3,  // + AVX512_BF16, no AMX: Cooper Lake, Zen 4, Zen 5
  Amx = 4,         // + AMX tiles (bf16, int8) that the OS lets the process use: Sapphire Rapids and later
};
constexpr int kCpuClasses = 5;

const char* cpu_class_name(CpuClass c);  // "avx2", "avx2_vnni", "avx512", "avx512_bf16", "amx"

struct CpuState {
  CpuClass detected = CpuClass::Avx2;  // the highest class this CPU supports (CPUID, OS state)
  CpuClass active = CpuClass::Avx2;    // what the kernels use: detected, capped by GEMMALENS_MAX_ISA and by oneDNN
  std::vector<CpuClass> supported;     // every class this CPU can run (avx2_vnni only where it has AVX-VNNI)
  std::string cap;                     // GEMMALENS_MAX_ISA as given ("" when unset)
  std::string onednn_isa;              // oneDNN's effective ISA once capped ("avx512_core_bf16", ...)
  bool onednn_user_cap = false;        // ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA was set: the user's cap on oneDNN stands
};

// Decided once, on the first call (before oneDNN's first primitive: linear_dnnl.cpp's engine asks for it first):
// the CPU's class, GEMMALENS_MAX_ISA read and applied (a ValueError naming the accepted values when it is not one of
// them), oneDNN capped to the same class with dnnl::set_max_cpu_isa. Thread-safe.
const CpuState& cpu_state();
inline CpuClass cpu_class() { return cpu_state().active; }

// --- The path each op family takes in the active class (dispatch and gl.cpu_info() both read these) ---

// bf16 weights, prefill-sized matmuls (M > kGemvMaxM): oneDNN's bf16 brgemm where the class has bf16 hardware
// (AMX tiles, AVX512_BF16), else f32 compute on weights widened from bf16 a block at a time (linear_dnnl.cpp).
enum class Bf16MatmulPath { OneDnn, WidenedF32 };
inline Bf16MatmulPath bf16_matmul_path() {
  return cpu_class() >= CpuClass::Avx512Bf16 ? Bf16MatmulPath::OneDnn : Bf16MatmulPath::WidenedF32;
}
// bf16 weights, decode-sized matmuls (ops/gemv_bf16.cpp): vdpbf16ps, else the pairs widened to f32 for FMAs.
enum class Bf16GemvPath { Vdpbf16ps, Avx512Widen, Avx2Widen };
inline Bf16GemvPath bf16_gemv_path() {
  const CpuClass c = cpu_class();
  return c >= CpuClass::Avx512Bf16 ? Bf16GemvPath::Vdpbf16ps : c == CpuClass::Avx512 ? Bf16GemvPath::Avx512Widen
                                                                                       : Bf16GemvPath::Avx2Widen;
}
// int8 / int4 weights against int8 activation blocks (ops/quant.cpp): vpdpbusd on zmm (AVX-512 VNNI) or ymm
// (AVX-VNNI), else vpmaddubsw + vpmaddwd (AVX2).
enum class QuantKernelPath { Vnni512, AvxVnni, Avx2Maddubs };
inline QuantKernelPath quant_kernel_path() {
  const CpuClass c = cpu_class();
  return c >= CpuClass::Avx512 ? QuantKernelPath::Vnni512 : c == CpuClass::Avx2Vnni ? QuantKernelPath::AvxVnni
                                                                                   : QuantKernelPath::Avx2Maddubs;
}
// The AVX-512 f32 kernels (tiled attention, GELU, bf16 conversion) against their AVX2 versions.
inline bool use_avx512() { return cpu_class() >= CpuClass::Avx512; }
// oneDNN runs bf16 on AMX tiles: the AMX prefill paths (bf16 attention matmuls, int8 prefill through bf16).
inline bool use_amx() { return cpu_class() >= CpuClass::Amx; }

// (op family, path) for gl.cpu_info(), in the active class.
std::vector<std::pair<std::string, std::string>> cpu_paths();

}  // namespace gemmalens::ops
