"""The CPU class gemmalens runs its kernels for (README, "CPU classes"); the choice itself is made in C++
(csrc/ops/cpu.h), once, when gemmalens._core is imported."""

# Lowest to highest; GEMMALENS_MAX_ISA takes one of these names.
CLASSES = ("avx2", "avx2_vnni", "avx512", "avx512_bf16", "amx")


def cpu_name():
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform module says): `gemmalens info` and the
    benchmarks' "Measured ... on" lines."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def check_baseline():
    """The extension is built for x86-64-v3 (AVX2, FMA, F16C): on an older CPU its first AVX2 instruction would kill
    the interpreter (SIGILL). Refuse to load it instead, naming what is missing. Linux only (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return
    if line is None:
        return
    flags = set(line.split(":", 1)[1].split())
    missing = [f for f in ("avx2", "fma", "f16c") if f not in flags]
    if missing:
        raise ImportError(f"gemmalens needs an x86-64 CPU with AVX2, FMA and F16C (x86-64-v3: Intel Haswell / AMD "
                          f"Excavator, 2013, and later); this CPU lacks {', '.join(missing)}")


def cpu_info():
    """The CPU class gemmalens runs and the path each op family takes there.

    >>> gl.cpu_info()["class"], gl.cpu_info()["decode_bf16"]
    ('avx512_bf16', 'vdpbf16ps')

    Keys: "class" (what the kernels use: "avx2", "avx2_vnni", "avx512", "avx512_bf16" or "amx"), "detected" (the
    highest class this CPU supports), "cap" (GEMMALENS_MAX_ISA as given, or None), "supported" (every class this CPU
    can be forced to), "onednn_isa" (oneDNN's effective ISA, capped with the class), "onednn_user_cap" (the
    environment set ONEDNN_MAX_CPU_ISA itself), and per op family the path: "bf16_matmul" (bf16 weights, a 512-token
    prefill's matmuls), "bf16_lm_head" (the row-major LM head past 4 rows), "decode_bf16" (bf16 weights, decode steps), "int8" / "int4" (quantised weights, decode),
    "int8_prefill", "attention", "attention_bf16_prefill", "attention_decode_bf16" (a bf16 model's decode steps over
    its KV cache: "vdpbf16ps", "avx512" or "avx2"), "f32_matmul" (float32 weights: "onednn", or "avx2_panels" on
    the AVX2 classes), "elementwise"; and where the matmul paths
    change with the rows M of a call: "bf16_own_max_rows" (bf16 weights take gemmalens's own kernels up to this M,
    None for every M) and "int8_prefill_min_rows" (quantised weights take the "int8_prefill" path from this M on,
    None for never).
    """
    from . import _core

    return dict(_core.cpu_info())
