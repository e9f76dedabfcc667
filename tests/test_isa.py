"""CPU classes (csrc/ops/cpu.h; README, "CPU classes"): what gemmalens detects, GEMMALENS_MAX_ISA forcing each class
this CPU can run (and oneDNN with it), and the kernels and the real model run again under every forced class.

The parametrised tests run once per class the CPU supports, computed here at collection time (this CPU's classes,
so nothing is skipped: a class the CPU cannot run is not a test case). Each forced class runs in a child process:
the class is decided once per process, at import. tests/test_cpp_units.py runs the C++ unit tests the same way.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemmalens as gl

ROOT = Path(__file__).resolve().parents[1]
INFO = gl.cpu_info()
SUPPORTED = INFO["supported"]
BELOW_NATIVE = [c for c in SUPPORTED if c != INFO["detected"]]

# oneDNN's ISA for each class once gemmalens caps it (csrc/ops/linear_dnnl.cpp, onednn_limit_isa).
ONEDNN_ISA = {"avx2": "avx2", "avx2_vnni": "avx2_vnni", "avx512": "avx512_core_vnni", "avx512_bf16": "avx512_core_bf16"}


def cpuinfo_field(name):
    """The first CPU's `name` line of /proc/cpuinfo ("flags", "vendor_id"), its value as a string."""
    with open("/proc/cpuinfo") as f:
        return next(ln for ln in f if ln.split(":", 1)[0].strip() == name).split(":", 1)[1].strip()


# Prefill-sized bf16 matmuls in class avx512_bf16: oneDNN's AVX512_BF16 brgemm, except on an Intel core, where
# vdpbf16ps runs at half the f32 FMA rate and the AVX-512 widening kernel takes them (cpu.h, bf16_large_m_widened).
INTEL = cpuinfo_field("vendor_id") == "GenuineIntel"
BF16_512 = "avx512_widen" if INTEL else "onednn_avx512_bf16"
# A bf16 model's decode attention in classes avx512_bf16 and amx: vdpbf16ps, but for Intel's half-rate one the
# avx512 class's kernels (cpu.h, attention_decode_vdpbf16ps).
DECODE_ATT = "avx512" if INTEL else "vdpbf16ps"
# The path each op family takes in each class (csrc/ops/cpu.h).
PATHS = {
    "avx2": {"bf16_matmul": "avx2_widen", "bf16_lm_head": "avx2_widen", "decode_bf16": "avx2_widen", "int8": "avx2_maddubs",
             "int8_prefill": "avx2_maddubs", "attention": "tiled_avx2", "attention_decode_bf16": "avx2", "elementwise": "avx2"},
    "avx2_vnni": {"bf16_matmul": "avx2_widen", "bf16_lm_head": "avx2_widen", "decode_bf16": "avx2_widen", "int8": "avx_vnni",
                  "int8_prefill": "avx_vnni", "attention": "tiled_avx2", "attention_decode_bf16": "avx2",
                  "elementwise": "avx2"},
    "avx512": {"bf16_matmul": "avx512_widen", "bf16_lm_head": "avx512_widen", "decode_bf16": "avx512_widen", "int8": "vnni512",
               "int8_prefill": "vnni512", "attention": "tiled_avx512", "attention_decode_bf16": "avx512",
               "elementwise": "avx512"},
    "avx512_bf16": {"bf16_matmul": BF16_512, "bf16_lm_head": BF16_512, "decode_bf16": "vdpbf16ps", "int8": "vnni512",
                    "int8_prefill": "vnni512", "attention": "tiled_avx512", "attention_decode_bf16": DECODE_ATT,
                    "attention_bf16_prefill": "tiled_avx512" if INTEL else "onednn_avx512_bf16", "elementwise": "avx512"},
    "amx": {"bf16_matmul": "onednn_amx", "bf16_lm_head": "onednn_amx", "decode_bf16": "vdpbf16ps", "int8": "vnni512",
            "int8_prefill": "dequant_bf16_onednn_amx", "attention": "tiled_avx512", "attention_bf16_prefill": "onednn_amx",
            "attention_decode_bf16": DECODE_ATT, "elementwise": "avx512"},
}


def child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GEMMALENS_MAX_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env.update(extra)
    return env


def run_child(code, timeout=120, **env):
    return subprocess.run([sys.executable, "-c", code], env=child_env(**env), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


INFO_CODE = ("import json, gemmalens as gl; i = gl.cpu_info(); t = gl._core._testing; "
             "i['f32_impl'] = t.onednn_matmul_impl(512, 640, 2048, 'float32'); print(json.dumps(i))")


def child_info(**env):
    r = run_child(INFO_CODE, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpuinfo_flags():
    return set(cpuinfo_field("flags").split())


def test_detected_classes_match_proc_cpuinfo():
    """The classes gemmalens finds (CPUID through GCC's checks) against the kernel's own list of CPU flags."""
    f = cpuinfo_flags()
    avx2 = {"avx2", "fma", "f16c"} <= f
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"} <= f
    expected = [c for c, ok in [("avx2", avx2), ("avx2_vnni", avx2 and "avx_vnni" in f), ("avx512", avx512),
                                ("avx512_bf16", avx512 and "avx512_bf16" in f),
                                ("amx", avx512 and "avx512_bf16" in f and {"amx_tile", "amx_bf16", "amx_int8"} <= f)] if ok]
    assert INFO["supported"] == expected
    assert INFO["detected"] == expected[-1]
    print(f"this CPU's classes: {', '.join(expected)}")


def test_unforced_class_is_the_detected_one():
    info = child_info()
    assert info["cap"] is None and not info["onednn_user_cap"]
    # oneDNN finds the same CPU: its effective ISA is the class's (or, for the top class, at least it)
    assert info["class"] == info["detected"], info
    for k, v in PATHS[info["class"]].items():
        assert info[k] == v, (k, info)


@pytest.mark.parametrize("cls", SUPPORTED)
def test_forced_class_reaches_every_dispatch_and_onednn(cls):
    """GEMMALENS_MAX_ISA=cls: the class, every op family's path, and oneDNN's own ISA (an AVX2 class must not get
    AVX-512 code from oneDNN either)."""
    info = child_info(GEMMALENS_MAX_ISA=cls)
    print(f"{cls}: {json.dumps(info)}")
    assert info["class"] == cls and info["cap"] == cls and info["detected"] == INFO["detected"]
    for k, v in PATHS[cls].items():
        assert info[k] == v, (k, info)
    if cls != INFO["detected"]:  # capped by gemmalens
        assert info["onednn_isa"] == ONEDNN_ISA[cls], info
    if cls.startswith("avx2"):
        assert "avx512" not in info["f32_impl"] and "avx512" not in info["onednn_isa"], info
    else:
        assert "avx512" in info["f32_impl"], info


def test_forcing_is_case_blind_and_a_cap_above_the_cpu_is_the_cpu():
    assert child_info(GEMMALENS_MAX_ISA="AVX2")["class"] == "avx2"
    info = child_info(GEMMALENS_MAX_ISA="amx")
    assert info["class"] == INFO["detected"] and info["cap"] == "amx"


def test_bad_value_fails_the_import_naming_the_choices():
    r = run_child("import gemmalens", GEMMALENS_MAX_ISA="avx1024")
    assert r.returncode != 0
    assert "GEMMALENS_MAX_ISA must be one of avx2, avx2_vnni, avx512, avx512_bf16, amx" in r.stderr
    assert "'avx1024'" in r.stderr


def test_onednn_cap_from_the_environment_lowers_the_class():
    """A user's own ONEDNN_MAX_CPU_ISA stands (gemmalens does not override it) and the class follows it down, so the
    kernels never ask oneDNN for what it was told not to run (bf16 matmuls on an AVX2 cap)."""
    info = child_info(ONEDNN_MAX_CPU_ISA="AVX2")
    assert info["onednn_user_cap"] and info["onednn_isa"] == "avx2"
    assert info["class"] == "avx2" and info["bf16_matmul"] == "avx2_widen"
    r = run_child("import numpy as np, gemmalens as gl; x = np.ones((64, 128), np.float32); "
                  "print(gl._core._testing.linear(x, x, 'bfloat16')[0, 0])", ONEDNN_MAX_CPU_ISA="AVX2")
    assert r.returncode == 0 and float(r.stdout.split()[-1]) == 128.0, r.stderr[-2000:]


def run_pytest_child(cls, args, timeout):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                       env=child_env(GEMMALENS_MAX_ISA=cls), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    tail = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, f"under GEMMALENS_MAX_ISA={cls}:\n{tail}"
    assert " passed" in r.stdout and " skipped" not in r.stdout, tail
    print(f"GEMMALENS_MAX_ISA={cls}: {r.stdout.strip().splitlines()[-1]}")
    return r.stdout


@pytest.mark.parametrize("cls", SUPPORTED)
def test_kernels_against_numpy_under_each_class(cls):
    """tests/test_ops.py (every kernel against its numpy reference: matmuls in each dtype and weight mode, decode
    and prefill shapes, attention with windows / GQA / soft-capping, norms, RoPE, GELU) under the forced class."""
    run_pytest_child(cls, ["tests/test_ops.py"], timeout=600)


@pytest.mark.parametrize("cls", BELOW_NATIVE)
def test_continuous_batching_under_each_class(cls):
    """tests/test_continuous_batching.py (each sequence's logits in a batch the same bits as alone, float32 and
    bfloat16) under each forced class below the native one: every class's matmul, attention and decode kernels sum a
    row the same way whatever rows run beside it (oneDNN 3.2's f32 gemm on AVX2 did not: README, "CPU classes")."""
    run_pytest_child(cls, ["tests/test_continuous_batching.py"], timeout=600)


QUANT_BITS_CODE = """
import hashlib, numpy as np, gemmalens as gl
t = gl._core._testing
rng = np.random.default_rng(1)
w = rng.standard_normal((83, 640)).astype(np.float32)
out = []
for M in (1, 2, 5, 8, 13, 70):  # 70: past the dequantised prefill path's threshold where a class has one
    x = rng.standard_normal((M, 640)).astype(np.float32)
    out += [hashlib.sha256(t.linear(x, w, "float32", int8=True).tobytes()).hexdigest(),
            hashlib.sha256(t.linear(x, w, "float32", int4=True).tobytes()).hexdigest()]
print(gl.cpu_info()["int8_prefill_min_rows"], " ".join(out))
"""


def test_quant_kernels_give_the_same_bits_on_every_class():
    """The int8 / int4 kernels (csrc/ops/quant.cpp) do the same integer dot products and the same f32 operations in
    the same order on every class, so their outputs agree to the bit (rows past a class's dequantised prefill
    threshold take oneDNN instead and are left out)."""
    runs = {}
    for cls in SUPPORTED:
        r = run_child(QUANT_BITS_CODE, GEMMALENS_MAX_ISA=cls)
        assert r.returncode == 0, r.stderr[-3000:]
        first, *hashes = r.stdout.split()
        runs[cls] = (None if first == "None" else int(first), hashes)
    kernel_only = [i for i, M in enumerate(np.repeat([1, 2, 5, 8, 13, 70], 2))
                   if all(lim is None or M < lim for lim, _ in runs.values())]
    assert len(kernel_only) >= 10
    base = next(iter(runs.values()))[1]
    for cls, (_, hashes) in runs.items():
        assert [hashes[i] for i in kernel_only] == [base[i] for i in kernel_only], cls


# The real 270M under each class below the native one (the native class is the plain test run). Each class runs what
# its own paths change: avx2 every dtype / weight mode and the logits against HF; avx2_vnni the int8 / int4 kernels;
# avx512 the bf16 paths (its int8 kernels and f32 paths are the native ones on an AVX512_BF16 CPU).
REAL_TESTS = {
    "avx2": "weight_modes or bf16_top1 or logits_match_reference",
    "avx2_vnni": "weight_modes and (int8 or int4)",
    "avx512": "(weight_modes and native) or bf16_top1",
    "avx512_bf16": "weight_modes or bf16_top1",
}


@pytest.mark.parametrize("cls", BELOW_NATIVE)
def test_real_model_under_each_class(cls, real_gguf_path):
    """bf16, int8 and int4 on the real 270M within tests/test_real_model.py's stated tolerances (perplexity against
    the same class's float32: bf16 0.5%, int8 3%, int4 6%; greedy top-1 agreement 0.95 / 0.85 / 0.6)."""
    run_pytest_child(cls, ["tests/test_real_model.py", "-k", REAL_TESTS[cls]], timeout=900)


def test_int4_quantisation_is_the_same_under_every_class():
    """The int4 scale search has an AVX2 and an AVX-512 kernel (csrc/ops/quant.cpp) summing each candidate's squared
    errors in the same order: every class stores the same bytes and scales for the same weights (a weight file
    quantised on one machine is the one quantised on another)."""
    code = ("import sys, numpy as np; from gemmalens._core import _testing as t; "
            "w = np.random.default_rng(0).standard_normal((300, 512)).astype(np.float32); "
            "w[7, :32] = 0; w[9, 40] = 50; w[11, 64:96] = -1e-30; "
            "q = np.asarray(t.quantize(w, 4)); sys.stdout.write(q.tobytes().hex())")
    outs = {}
    for cls in SUPPORTED:
        r = run_child(code, GEMMALENS_MAX_ISA=cls)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[cls] = r.stdout
    assert len(set(outs.values())) == 1, {c: hash(o) for c, o in outs.items()}
