// The CPU class: the one place that decides which kernels run. Every dispatch site in the ops asks cpu_class() (or
// one of the path functions below), never the CPU itself, so GEMMALENS_MAX_ISA can force any lower class for tests
// and benchmarks. README, "CPU classes".
#pragma once
#include <cstdint>
#include <limits>
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
  bool intel = false;                  // CPUID vendor GenuineIntel (vdpbf16ps_half_rate())
};

// Decided once, on the first call (before oneDNN's first primitive: linear_dnnl.cpp's engine asks for it first):
// the CPU's class, GEMMALENS_MAX_ISA read and applied (a ValueError naming the accepted values when it is not one of
// them), oneDNN capped to the same class with dnnl::set_max_cpu_isa. Thread-safe.
const CpuState& cpu_state();
inline CpuClass cpu_class() { return cpu_state().active; }

// --- The path each op family takes in the active class (dispatch and gl.cpu_info() both read these) ---

// bf16 weights in the blocked layout (the layers' matmuls): our own kernels (ops/gemv_bf16.cpp, bf16_gemv_path())
// take M up to this many rows. Where the class has bf16 hardware, 4 (decode; oneDNN's AMX tiles win above it, and on
// AVX512_BF16 our vdpbf16ps kernel only matched oneDNN's brgemm, measured 2026-11-27 on a Zen 5 and a Sapphire
// Rapids Xeon: oneDNN keeps the rows it had, except on Intel: bf16_large_m_widened()). Without it, every M: oneDNN
// has no fast bf16 matmul there, and the AVX-512 and AVX2 widening kernels come within 0.8-1.0 of its f32 matmul.
inline int64_t bf16_own_max_m() {
  return cpu_class() >= CpuClass::Avx512Bf16 ? 4 : std::numeric_limits<int64_t>::max();
}
// bf16 weights past that, and the row-major LM head past 4 rows: oneDNN's bf16 matmul where the class has bf16
// hardware (AMX tiles, AVX512_BF16), else oneDNN's f32 matmul on a block of columns widened from bf16 at a time
// (linear_dnnl.cpp): oneDNN 3.2's bf16 matmul without bf16 hardware is missing (AVX2) or ~3-1000x slower (AVX-512).
enum class Bf16MatmulPath { OneDnn, WidenedF32 };
inline Bf16MatmulPath bf16_matmul_path() {
  return cpu_class() >= CpuClass::Avx512Bf16 ? Bf16MatmulPath::OneDnn : Bf16MatmulPath::WidenedF32;
}
// vdpbf16ps (32 bf16 multiply-adds) issues at a quarter of the rate of a 512-bit f32 FMA (16) on Intel cores, so it
// computes at half their rate: a dependency-free loop of 12 accumulators on one core of an Intel Xeon with AMX
// (2026-11-28) ran 1.9 G vdpbf16ps/s against 7.6 G FMAs/s (~0.5 against 2 per cycle). On AMD Zen 5 it runs at twice
// the f32 rate. The rules below that keep f32 FMAs where vdpbf16ps would run read this.
inline bool vdpbf16ps_half_rate() { return cpu_state().intel; }
// Class avx512_bf16, bf16 weights in the blocked layout, more rows than bf16_own_max_m(): oneDNN's AVX512_BF16
// brgemm where vdpbf16ps outruns f32 FMAs -- an AMD Zen 5 ran it at 2x its f32 rate (README, "Matmul rates per
// class") -- but on an Intel core (Cooper Lake; a Sapphire Rapids or later whose OS or hypervisor withholds AMX) it
// ran at 0.6 of oneDNN's f32 (213 against 316-354 GFLOP/s, 2 threads, 2026-11-27; a 6 x 64 vdpbf16ps register tile
// in L1 reached 119 GFLOP/s on one core against 204 for the same tile of f32 FMAs), so there those calls take the
// avx512 class's widening kernel (gemm_widen_blocked64): real 270M bf16 prefill of 512 tokens 953-982 -> 1249-1277
// tok/s, 0.91-0.93 of f32 (2 threads, 2026-11-27).
inline bool bf16_large_m_widened() { return cpu_class() == CpuClass::Avx512Bf16 && vdpbf16ps_half_rate(); }
// bf16 weights, the kernels of ops/gemv_bf16.cpp: vdpbf16ps, else the pairs widened to f32 for FMAs.
enum class Bf16GemvPath { Vdpbf16ps, Avx512Widen, Avx2Widen };
inline Bf16GemvPath bf16_gemv_path() {
  const CpuClass c = cpu_class();
  return c >= CpuClass::Avx512Bf16 ? Bf16GemvPath::Vdpbf16ps : c == CpuClass::Avx512 ? Bf16GemvPath::Avx512Widen
                                                                                       : Bf16GemvPath::Avx2Widen;
}
// A bf16 model's decode attention over its bf16 cache (ops/attention_decode.cpp): vdpbf16ps where the class has it,
// except where it runs at half the f32 rate (vdpbf16ps_half_rate: Intel), where the avx512 class's kernels, which
// widen the cache's bf16 rows for f32 FMAs, read the cache faster: on the Xeon,
// `_core._testing.attention_seconds(1, 262144, 4, 1, 256, 0, "bfloat16")` (a 256 MB cache, 2 threads) 23.5-24.3
// against 24.6-26.0 GB/s, 35-37 against 36-41 with the cache in L2 / L3; the int8 270M at context 32768, six
// alternated pairs of builds: +1% on average (-1.7% to +2.9%), bf16 the same. They keep q and the probabilities in f32.
inline bool attention_decode_vdpbf16ps() { return cpu_class() >= CpuClass::Avx512Bf16 && !vdpbf16ps_half_rate(); }
// int8 / int4 weights against int8 activation blocks (ops/quant.cpp): vpdpbusd on zmm (AVX-512 VNNI) or ymm
// (AVX-VNNI), else vpmaddubsw + vpmaddwd (AVX2).
enum class QuantKernelPath { Vnni512, AvxVnni, Avx2Maddubs };
inline QuantKernelPath quant_kernel_path() {
  const CpuClass c = cpu_class();
  return c >= CpuClass::Avx512 ? QuantKernelPath::Vnni512 : c == CpuClass::Avx2Vnni ? QuantKernelPath::AvxVnni
                                                                                   : QuantKernelPath::Avx2Maddubs;
}
// Quantised layers run matmuls of this many rows and more on weights dequantised to bf16 a block at a time for
// oneDNN's AMX matmul (Linear::forward_dequantized), whose tiles outrun the int8 kernels' per-block scaling. Without
// AMX the int8 kernels (tiles of 16 weight rows, ops/quant.cpp) win at every size: measured 2026-11-27 on a Zen 5,
// 2 threads, real 270M int8 prefill tok/s at 512 tokens, kernels against dequantised: 2413 / 1279 forced to AVX-512
// (f32 blocks), 2309 / 1834 on AVX512_BF16 (bf16 blocks), 1730 / 1662 at 2048 tokens; random 1B at 512: 635 / 250
// and 623 / 449.
inline int64_t quant_dequant_min_m() {
  return cpu_class() == CpuClass::Amx ? 64 : std::numeric_limits<int64_t>::max();
}
// f32 weights (a float32 model's layers and LM head): oneDNN's f32 matmul, but on the AVX2 classes our own panels
// (ops/gemv_bf16.cpp, gemm_panels32). oneDNN 3.2 runs its gemm:jit:f32 there, whose sums depend on the row count: on
// an Intel Xeon forced to avx2 (2026-11-28) every M from 2 to 64 gave rows that differ in the last bits from the same
// rows alone (up to 2.6e-6 in the logits), so continuous batching's rows were not those of each sequence alone
// (tests/test_continuous_batching.py). From AVX-512 on it runs brgemm, whose rows agreed for every M measured (1-64).
inline bool f32_own_panels() { return cpu_class() < CpuClass::Avx512; }
// The AVX-512 f32 kernels (tiled attention, GELU, bf16 conversion) against their AVX2 versions.
inline bool use_avx512() { return cpu_class() >= CpuClass::Avx512; }
// oneDNN runs bf16 on AMX tiles: the AMX prefill paths (bf16 attention matmuls, int8 prefill through bf16).
inline bool use_amx() { return cpu_class() >= CpuClass::Amx; }
// A bf16 model's prefill attention as two oneDNN bf16 matmuls per block of queries (ops/attention_bf16.cpp; q and the
// probabilities rounded to bf16): on AMX, and on AVX512_BF16 where vdpbf16ps runs at twice the f32 FMA rate (AMD),
// where oneDNN's AVX512_BF16 brgemm outruns the f32 tiled kernel. Measured 2026-11-28 on an AMD EPYC Zen 4, 2 threads
// (`_core._testing.attention_seconds(n, 0, 4, 1, 256, window, "bfloat16", 2)`, the 270M's geometry): a global layer
// at n = 2048 / 8192 / 32768 48.5-50.3 / 788-838 / 13210 ms -> 31.4-34.0 / 411-425 / 6559, a sliding one (window
// 512) at 8192 / 32768 99.5-104 / 447 -> 66-69 / 280; a random-weight 270M's bf16 prefill of 512 / 2048 / 8192
// tokens 1515-1612 / 1313-1354 / 1036-1045 -> 1536-1699 / 1498-1534 / 1273-1311 tok/s. On Intel without AMX
// (vdpbf16ps at half the f32 rate) the f32 tiled kernel stays.
inline bool attention_prefill_bf16_matmul() {
  return use_amx() || (cpu_class() >= CpuClass::Avx512Bf16 && !vdpbf16ps_half_rate());
}

// (op family, path) for gl.cpu_info(), in the active class.
std::vector<std::pair<std::string, std::string>> cpu_paths();

}  // namespace gemmalens::ops
