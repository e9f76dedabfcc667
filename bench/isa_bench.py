"""Prefill and decode per CPU class: gemmalens forced to each class this CPU supports (GEMMALENS_MAX_ISA; README,
"CPU classes"), on the real 270M GGUF, beside llama.cpp (llama-cpp-python) on the same file.

    python bench/isa_bench.py [--quick] [--threads N] [--llama CLASS=DIR ...]   # prints the table

Each class runs in its own process (the class is decided once per process). llama.cpp picks its kernels when it is
compiled, not at run time: by default every row runs the installed llama-cpp-python (the table says which ISA it was
built for); `--llama avx2=DIR` runs a build made for that class instead, installed with `pip install --target DIR`
(bench/README.md has the CMake options per class). bench/run.py --only isa calls rows() and section().
"""
import argparse
import json
import os
import subprocess
import sys

# gemmalens in a child: f32 and bf16 prefill, then bf16 and int8 (bf16 compute, the CLI's fast mode) prefill and
# decode. Prefill: median of `repeats` runs of T tokens (last-position logits); f32 and bf16 are both loaded and their
# runs alternate (3 x repeats each, the order swapped every pair), and the median of the pairs' bf16 / f32 speed
# ratios is reported beside them: the VM's drift falls on both. Decode: n_new steps after a ctx-token prompt, best of
# `repeats`. Each decode run sits between two streaming-bandwidth measurements (256 MiB on
# huge pages, best of 3): its fraction of the bandwidth bound is its bytes per second over their mean, so that the
# machine's drift (this VM's bandwidth moves 1.6x within minutes) falls on both; the median fraction is reported.
_OURS = r"""
import json, statistics, sys, time
import numpy as np
import gemmalens as gl
path, threads, repeats, T, ctx, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
out = {"info": gl.cpu_info()}
toks = np.random.default_rng(0).integers(4, 200000, T).tolist()
pair = {n: gl.load(path, dtype=d, weights="native", threads=threads, progress=False) for n, d in (("f32", "float32"), ("bf16", "bfloat16"))}
pt = {n: m.to_tokens(toks) for n, m in pair.items()}
for n, m in pair.items():
    m.next_token_logits(pt[n])
pts = {"f32": [], "bf16": []}
for i in range(3 * repeats):
    for n in (("f32", "bf16") if i % 2 == 0 else ("bf16", "f32")):
        t0 = time.perf_counter(); pair[n].next_token_logits(pt[n]); pts[n].append(time.perf_counter() - t0)
out["bf16_over_f32"] = statistics.median(a / b for a, b in zip(pts["f32"], pts["bf16"]))
out["f32"] = [T / statistics.median(pts["f32"]), None, pair["f32"].weight_nbytes]
del pair
for name, weights in (("bf16", "native"), ("int8", "int8")):
    m = gl.load(path, dtype="bfloat16", weights=weights, threads=threads, progress=False)
    t = m.to_tokens(toks)
    m.next_token_logits(t)
    if name == "bf16":
        pf = T / statistics.median(pts["bf16"])
    else:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter(); m.next_token_logits(t); ts.append(time.perf_counter() - t0)
        pf = T / statistics.median(ts)
    def run():
        cache = m.new_cache(max_seq_len=ctx + n_new + 2)
        m.next_token_logits(m.to_tokens(toks[:ctx]), cache=cache)
        step = m.to_tokens([toks[0]])
        m.next_token_logits(step, cache=cache)
        t0 = time.perf_counter()
        for _ in range(n_new):
            m.next_token_logits(step, cache=cache)
        return time.perf_counter() - t0
    runs, fracs = [], []
    for _ in range(repeats):
        b0 = gl._core._testing.read_bandwidth(1 << 28, 3)
        runs.append(run())
        b1 = gl._core._testing.read_bandwidth(1 << 28, 3)
        fracs.append(n_new / runs[-1] * m.weight_nbytes / ((b0 + b1) / 2))
    dec = n_new / min(runs)
    out[name + "_bound"] = statistics.median(fracs)
    out[name] = [pf, dec, m.weight_nbytes]
    del m
print(json.dumps(out))
"""

# llama.cpp in a child (its crash costs its cells only): prefill of T tokens (median) and decode of n_new tokens after
# ctx (best), as bench/run.py's llama table measures it, and the ISA its ggml was compiled for.
_LLAMA = r"""
import json, statistics, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
path, threads, repeats, T, ctx, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
toks = np.random.default_rng(0).integers(4, 200000, T).tolist()
llm = Llama(model_path=path, n_ctx=T + 64, n_batch=T, n_threads=threads, n_threads_batch=threads, verbose=False)
def pf():
    llm.reset(); t0 = time.perf_counter(); llm.eval(toks); return time.perf_counter() - t0
def dec():
    llm.reset(); llm.eval(toks[:ctx]); t0 = time.perf_counter()
    for i in range(n_new):
        llm.eval([toks[i]])
    return time.perf_counter() - t0
pf()
p = T / statistics.median(pf() for _ in range(repeats))
dec()
d = n_new / min(dec() for _ in range(repeats))
info = llama_cpp.llama_print_system_info().decode()
flags = [f.split("=")[0].strip() for f in info.split("|") if f.strip().endswith("= 1")]
print(json.dumps({"prefill": p, "decode": d, "isa": " ".join(f for f in flags if f.startswith(("AVX", "AMX")))}))
"""


def _child(code, args, env, timeout=1800):
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"child failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rows(threads, quick=False, llama_builds=None, classes=None):
    """[(class, gemmalens results, llama.cpp results or None, which llama.cpp build)] for every class this CPU supports
    (or `classes`)."""
    import gemmalens as gl
    from gemmalens.formats import _resolve_demo

    path = _resolve_demo("gemma3-270m")
    repeats, T, ctx, n_new = (2, 512, 128, 16) if quick else (3, 512, 128, 32)
    args = [path, threads, repeats, T, ctx, n_new]
    # llama.cpp on bf16 weights too (the comparison for gemmalens's bf16 rows: the same bytes per weight): a BF16 GGUF
    # of the same shapes, random weights (bench/longctx_bench.py writes it; time does not depend on the values)
    import longctx_bench
    from make_models import make

    def ckpt(size):
        p = os.path.join(longctx_bench.WORK, f"random-{size}")
        if not os.path.exists(os.path.join(p, "model.safetensors")):
            make(size, p)
        return p

    bf16_args = [longctx_bench.gguf_of("270m", ckpt)] + args[1:]
    llama_builds = llama_builds or {}
    base = {k: v for k, v in os.environ.items() if k not in ("GEMMALENS_MAX_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    out, installed = [], None
    for cls in classes or gl.cpu_info()["supported"]:
        ours = _child(_OURS, args, dict(base, GEMMALENS_MAX_ISA=cls))
        assert ours["info"]["class"] == cls, ours["info"]
        build = llama_builds.get(cls)
        theirs = None
        try:
            if build:
                env = dict(base, PYTHONPATH=os.pathsep.join([build] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
                theirs = _child(_LLAMA, args, env)
                theirs["bf16"] = _child(_LLAMA, bf16_args, env)
            else:
                if installed is None:
                    installed = _child(_LLAMA, args, base)
                    installed["bf16"] = _child(_LLAMA, bf16_args, base)
                theirs = installed
        except RuntimeError as e:  # its cells say "-"
            print(f"llama.cpp ({build or 'installed'}) failed: {e}", flush=True)
        out.append((cls, ours, theirs, "own build" if build else "installed"))
        print(f"{cls}: gemmalens f32 prefill {ours['f32'][0]:.0f}, bf16 prefill {ours['bf16'][0]:.0f} decode "
              f"{ours['bf16'][1]:.1f}, int8 prefill {ours['int8'][0]:.0f} decode {ours['int8'][1]:.1f} tok/s | llama.cpp "
              + (f"prefill {theirs['prefill']:.0f} decode {theirs['decode']:.1f}, on BF16 prefill "
                 f"{theirs['bf16']['prefill']:.0f} decode {theirs['bf16']['decode']:.1f} ({theirs['isa']})" if theirs else "-"),
              flush=True)
    return out


def section(table_rows, threads):
    def r(a, b):
        return f"**{a / b:.2f}x**" if a and b else "-"

    def bound(o, mode):  # decode bytes per second (the weights each token reads, all of them) over the bandwidth beside it
        return f"{o[mode + '_bound']:.2f}"

    text = ("### CPU classes (real 270M Q4_K_M GGUF; gemmalens forced to each class with GEMMALENS_MAX_ISA; prefill "
            "512 tokens, decode at context 128, batch 1, tok/s)\n\n"
            "| class | bf16 matmuls | int8 kernels | f32 prefill | bf16 prefill | bf16 / f32 prefill, alternated | "
            "int8 prefill | llama.cpp prefill | "
            "bf16 / llama.cpp | int8 / llama.cpp | bf16 decode | int8 decode | llama.cpp decode | bf16 / llama.cpp | "
            "int8 / llama.cpp | llama.cpp on BF16: prefill / decode | bf16 / llama.cpp on BF16: prefill / decode | "
            "bf16 / int8 decode of the bandwidth bound | llama.cpp build |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for cls, o, t, build in table_rows:
        i = o["info"]
        lp, ld = (t["prefill"], t["decode"]) if t else (None, None)
        bp, bd = (t["bf16"]["prefill"], t["bf16"]["decode"]) if t else (None, None)
        text += (f"| {cls} | {i['bf16_matmul']} | {i['int8']} | {o['f32'][0]:.0f} | {o['bf16'][0]:.0f} | "
                 f"{o['bf16_over_f32']:.3f} | {o['int8'][0]:.0f} | {f'{lp:.0f}' if lp else '-'} | {r(o['bf16'][0], lp)} | {r(o['int8'][0], lp)} | "
                 f"{o['bf16'][1]:.1f} | {o['int8'][1]:.1f} | {f'{ld:.1f}' if ld else '-'} | {r(o['bf16'][1], ld)} | "
                 f"{r(o['int8'][1], ld)} | {f'{bp:.0f} / {bd:.1f}' if t else '-'} | "
                 f"{r(o['bf16'][0], bp)} / {r(o['bf16'][1], bd)} | {bound(o, 'bf16')} / {bound(o, 'int8')} | "
                 f"{build + (': ' + t['isa'] if t else '')} |\n")
    text += (f"\n{threads} threads. gemmalens bf16: bf16 weights (the GGUF dequantised at load), bf16 matmul inputs, f32 "
             "accumulation; int8: `weights=\"int8\"` with `dtype=\"bfloat16\"` (the CLI's fast mode). llama.cpp "
             "computes on the file's own Q4_K/Q5_0/Q8_0/Q6_K blocks (253 MB: ~0.95 bytes per weight, the tied embedding "
             "at Q8_0, against bf16's 2: a decode step of bf16 weights reads 2.1x the bytes), and, for the bf16 rows' like-for-like peer, on a BF16 GGUF of "
             "the same shapes (random weights, written by bench/longctx_bench.py; the time does not depend on the values). Every class runs on this one CPU, forced down: a "
             "real CPU of a lower class has its own cache sizes and bandwidth. llama.cpp picks its kernels when it is "
             "compiled; the last column says which build ran and the ISA it was compiled for. f32 and bf16 prefill: both models "
             "loaded in one process, their runs alternated; the ratio column is the median of the pairs' ratios. Bandwidth bound: a decode run's "
             "weight bytes per second (every weight byte is read once per token: the layers and the tied embedding as "
             "the LM head; the KV cache at context 128 is under 1% of them) over the streaming read bandwidth measured "
             "just before and just after that run (`_core._testing.read_bandwidth`, 256 MiB on huge pages as the "
             "weights, the best of 3 plain reads and 3 that ask for the lines 2 KB ahead as the decode kernels do; "
             "their mean), the median over the runs.\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--llama", action="append", default=[], metavar="CLASS=DIR",
                    help="a llama-cpp-python built for CLASS, installed with pip install --target DIR")
    args = ap.parse_args()
    builds = dict(a.split("=", 1) for a in args.llama)
    print(section(rows(args.threads, args.quick, builds), args.threads))


if __name__ == "__main__":
    main()
