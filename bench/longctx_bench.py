"""Long context: prefill and decode up to 32k tokens on 270m and 1b, Gemma 3's 5:1 sliding-window pattern beside the
same weights with every layer global, against llama.cpp (llama-cpp-python, its SWA cache) and HF transformers on the
same weights; KV cache bytes; one sliding layer's attention time against the context length, with a fit; the plot
bench/longctx.png (KV memory and prefill time against context, both patterns).

    python bench/longctx_bench.py [--quick] [--threads N] [--sizes 270m,1b] [--llama-python PY] [--hf-max N]
                                  [--global-max N]   # prints the tables

Every measurement runs in a child process (its own peak memory; a crash costs its cells only), with
gemmalens's GOMP_SPINCOUNT (gemmalens._threads.SPINCOUNT) for all three engines (libgomp's default spin costs torch
and llama.cpp several times over on a busy machine; gemmalens sets it itself: README, "Threads"; the table of
2026-11-27 ran with 300, the count then). bench/run.py --only longctx calls rows(), section() and
plot().
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")
PNG = os.path.join(HERE, "longctx.png")
sys.path.insert(0, HERE)

FULL_CTX = 32768
PATTERNS = ("5:1", "global")  # Gemma 3's layer_types; every layer full_attention

# The configurations a run measures (quick: 270m only, contexts up to 4k).
PLAN = {
    False: dict(sizes=("270m", "1b"), prefill=(512, 1024, 2048, 4096, 8192, 16384, 32768), decode=(128, 8192, 32768),
                peers=(8192, 32768), int8=(8192, 32768), n_new=16, attn_n=(512, 1024, 2048, 4096, 8192, 16384, 32768)),
    True: dict(sizes=("270m",), prefill=(512, 1024, 2048, 4096), decode=(128, 4096), peers=(4096,), int8=(4096,),
               n_new=8, attn_n=(512, 1024, 2048, 4096, 8192)),
}


def variant(size, pattern, ckpt):
    """bench/_work/longctx-SIZE-PATTERN: the random-weight checkpoint of ckpt(size) (its model.safetensors linked,
    not copied) with config.json's layer_types set to the pattern and max_position_embeddings = 32768 + 64, so that
    a 32768-token prompt can be decoded from (the real 270m and 1b stop at 32768; RoPE does not care here)."""
    src = ckpt(size)
    d = os.path.join(WORK, f"longctx-{size}-{'5to1' if pattern == '5:1' else 'global'}")
    os.makedirs(d, exist_ok=True)
    link = os.path.join(d, "model.safetensors")
    if not os.path.exists(link):
        os.symlink(os.path.relpath(os.path.join(src, "model.safetensors"), d), link)
    c = json.load(open(os.path.join(src, "config.json")))
    n = c["num_hidden_layers"]
    c["layer_types"] = ([("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(n)]
                        if pattern == "5:1" else ["full_attention"] * n)
    c["max_position_embeddings"] = FULL_CTX + 64
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    return d


def gguf_of(size, ckpt):
    """The 5:1 variant as a BF16 GGUF (make_models.write_bf16_gguf), written once."""
    from make_models import write_bf16_gguf

    out = os.path.join(WORK, f"longctx-{size}-bf16.gguf")
    if not os.path.exists(out):
        write_bf16_gguf(variant(size, "5:1", ckpt), out + ".partial")
        os.replace(out + ".partial", out)
    return out


# gemmalens: for each context, prefill that many random tokens into a fresh cache (median of `repeats` up to 4096
# tokens, one run above), and where asked decode n_new greedy-shaped steps after it (one token each; median step).
# Then decode at the shortest and the longest of those contexts again, in blocks of ALT_STEPS steps that alternate
# between the two caches (ALT_BLOCKS each; a block's first step not counted: it meets caches the other context's
# block left cold): the ratio of the two step times with the machine's drift shared by both (this VM's bandwidth moves
# 1.6x from one minute to the next, more than the effect measured).
ALT_BLOCKS, ALT_STEPS = 7, 6
_OURS = r"""
import json, statistics, sys, time
import numpy as np
import gemmalens as gl
path, dtype, weights, threads, ctxs, decode_at, n_new, repeats, kv_dtype = sys.argv[1:10]
kv_dtype = None if kv_dtype == "model" else kv_dtype
threads, n_new, repeats = int(threads), int(n_new), int(repeats)
ctxs, decode_at = json.loads(ctxs), set(json.loads(decode_at))
ALT_BLOCKS, ALT_STEPS = @ALT@
room = n_new + 1 + ALT_BLOCKS * ALT_STEPS
m = gl.load(path, dtype=dtype, weights=weights, threads=threads, max_seq_len=max(ctxs) + room, progress=False)
out = {"prefill": {}, "decode": {}, "kv_bytes": {}}
kept = {}
for ctx in ctxs:
    toks = m.to_tokens(np.random.default_rng(ctx).integers(4, 200000, ctx))
    ts = []
    for _ in range(repeats if ctx <= 4096 else 1):
        cache = m.new_cache(max_seq_len=ctx + room, kv_dtype=kv_dtype)
        t0 = time.perf_counter()
        m.next_token_logits(toks, cache=cache)
        ts.append(time.perf_counter() - t0)
    out["prefill"][ctx] = statistics.median(ts)
    if ctx in decode_at:
        step = toks[:, -1:].copy()
        m.next_token_logits(step, cache=cache)  # warm-up step
        st = []
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            m.next_token_logits(step, cache=cache)
            st.append(time.perf_counter() - t0)
        out["decode"][ctx] = 1 / statistics.median(st)
        out["kv_bytes"][ctx] = cache.nbytes
        if ctx in (min(decode_at), max(decode_at)):
            kept[ctx] = (cache, step)
    print(f"  {ctx}: prefill {ctx / out['prefill'][ctx]:.0f} tok/s" +
          (f", decode {out['decode'][ctx]:.1f} tok/s" if ctx in out["decode"] else ""), file=sys.stderr, flush=True)
if len(kept) == 2:
    st = {c: [] for c in kept}
    for _ in range(ALT_BLOCKS):
        for c, (cache, step) in sorted(kept.items()):
            for j in range(ALT_STEPS):
                t0 = time.perf_counter()
                m.next_token_logits(step, cache=cache)
                if j:
                    st[c].append(time.perf_counter() - t0)
    lo, hi = sorted(kept)
    out["alternated"] = {"short": lo, "long": hi, "short_tok_s": 1 / statistics.median(st[lo]),
                         "long_tok_s": 1 / statistics.median(st[hi])}
    print(f"  alternated: ctx {lo} {out['alternated']['short_tok_s']:.1f}, ctx {hi} {out['alternated']['long_tok_s']:.1f} tok/s",
          file=sys.stderr, flush=True)
out["peak_rss"] = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps(out))
""".replace("@ALT@", f"{ALT_BLOCKS}, {ALT_STEPS}")

# HF transformers: Gemma3ForCausalLM from the same folder, bf16, SDPA attention (eager would materialise [T, T]
# scores per head), one prefill with use_cache=True and logits_to_keep=1, then n_new one-token steps on its cache
# (a DynamicCache whose sliding layers keep their window); median step.
_HF = r"""
import json, statistics, sys, time
import numpy as np
import torch
from transformers import Gemma3ForCausalLM
path, dtype, threads, ctx, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
m = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval()
ids = torch.as_tensor(np.random.default_rng(ctx).integers(4, 200000, (1, ctx)))
with torch.inference_mode():
    m(ids[:, :64], use_cache=True, logits_to_keep=1)  # warm-up
    t0 = time.perf_counter()
    o = m(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    cache = getattr(o, "cache", None) or o.past_key_values
    kv = sum(t.numel() * t.element_size() for l in cache.layers for t in (l.keys, l.values))
    nxt = o.logits[:, -1:].argmax(-1)
    st = []
    for _ in range(n_new):
        t0 = time.perf_counter()
        o = m(nxt, cache=cache, use_cache=True)
        st.append(time.perf_counter() - t0)
        cache = getattr(o, "cache", None) or o.past_key_values
peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"prefill": prefill, "decode": 1 / statistics.median(st[1:]), "kv_bytes": kv, "peak_rss": peak}))
"""

# llama.cpp: the BF16 GGUF of the same weights, its SWA cache (swa_full=False: sliding layers keep window + ubatch
# cells), flash attention, n_batch 2048 / n_ubatch 512 (llama-bench's defaults); one prefill, then n_new one-token
# evals (median step). Its KV buffer sizes are read from its own log.
_LLAMA = r"""
import json, os, re, statistics, sys, tempfile, time
import numpy as np
path, threads, ctx, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = tempfile.TemporaryFile(mode="w+")
saved = os.dup(2)
os.dup2(log.fileno(), 2)  # llama.cpp logs to stderr: keep it to read the KV buffer sizes
try:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=ctx + n_new + 8, n_batch=2048, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, swa_full=False, flash_attn=True, verbose=True)
finally:
    os.dup2(saved, 2)
toks = np.random.default_rng(ctx).integers(4, 200000, ctx).tolist()
t0 = time.perf_counter()
llm.eval(toks)
prefill = time.perf_counter() - t0
st = []
for i in range(n_new):
    t0 = time.perf_counter()
    llm.eval([toks[i]])
    st.append(time.perf_counter() - t0)
log.seek(0)
sizes = [float(x) for x in re.findall(r"llama_kv_cache: size =\s*([0-9.]+) MiB", log.read())]
peak = int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
print(json.dumps({"prefill": prefill, "decode": 1 / statistics.median(st[1:]), "kv_bytes": sum(sizes) * 2**20,
                  "peak_rss": peak}))
"""

# One attention call of a layer (ops::attention, as the forward runs it; bf16 model, no cache): a prefill of n
# positions on a sliding layer (window 512) and on a global one, 270m / 1b geometry (4 query heads, 1 KV head,
# head_dim 256). Sliding: the best of 3 medians of reps (the fit wants the machine's quiet moments); global: the
# median of reps, one call past 8192 positions (it is the O(n^2) contrast).
_ATTN = r"""
import json, sys
from gemmalens import _core
ns, reps = json.loads(sys.argv[1]), int(sys.argv[2])
out = {"sliding": {}, "global": {}}
for n in ns:
    out["sliding"][n] = min(_core._testing.attention_seconds(n, 0, 4, 1, 256, 512, "bfloat16", reps) for _ in range(3))
    out["global"][n] = _core._testing.attention_seconds(n, 0, 4, 1, 256, 0, "bfloat16", reps if n <= 8192 else 1)
    print(f"  n={n}: sliding {out['sliding'][n] * 1e3:.2f} ms, global {out['global'][n] * 1e3:.1f} ms", file=sys.stderr,
          flush=True)
print(json.dumps(out))
"""


def _child(python, code, args, threads, timeout=7200):
    from gemmalens._threads import SPINCOUNT

    env = dict(os.environ, GOMP_SPINCOUNT=SPINCOUNT, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([python, "-c", code, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=env, timeout=timeout)
    for line in r.stderr.splitlines():
        if line.startswith("  "):  # the child's progress lines
            print(line, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"child failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _intkeys(d):
    """JSON's string keys back to the context lengths they were (keys that are words stay)."""
    return {k: ({(int(a) if a.isdigit() else a): b for a, b in v.items()} if isinstance(v, dict) else v)
            for k, v in d.items()}


def kv_bytes(size, pattern, ctx):
    """KV cache bytes of a bf16 model at ctx positions, batch 1 (gl.KVCache.nbytes)."""
    import gemmalens as gl

    cfg = gl.Gemma3Config.preset(size)
    if pattern == "global":
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    return gl.KVCache(cfg, 1, ctx, "bfloat16").nbytes


WINDOW = 512  # the sliding window of 270m and 1b


def pairs(n, window):
    """Query-key pairs a causal layer computes over n positions: sum over i of min(i + 1, window) (window 0: every
    earlier key)."""
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.minimum(i, window).sum() if window else i.sum())


def linear_fit(ns, ts):
    """t = a + b n by least squares: (a, b, R^2), and the quadratic fit's n^2 term at the largest n as a share of the
    time measured there (what an O(n^2) part would add)."""
    n, t = np.asarray(ns, float), np.asarray(ts, float)
    b, a = np.polyfit(n, t, 1)
    r2 = 1 - np.sum((t - (a + b * n)) ** 2) / np.sum((t - t.mean()) ** 2)
    c = np.polyfit(n, t, 2)[0]
    return a, b, r2, c * n[-1] ** 2 / t[-1]


def rows(threads=2, quick=False, sizes=None, ckpt=None, llama_python=None, hf_max=None, global_max=None):
    """Every measurement of the plan: {"ours": {(size, pattern, weights): child result}, "hf": {(size, ctx): ...},
    "llama": {(size, ctx): ...}, "attn": ..., "plan": ...}."""
    plan = dict(PLAN[quick])
    if sizes:
        plan["sizes"] = tuple(sizes)
    llama_python = llama_python or sys.executable
    res = {"ours": {}, "hf": {}, "llama": {}, "errors": [], "plan": plan, "threads": threads, "not_run": []}
    if hf_max:
        res["not_run"].append(f"HF past {hf_max} tokens (--hf-max; its 32k prefill takes 10-25 min per size here)")
    if global_max:
        res["not_run"].append(f"the every-layer-global variant past {global_max} tokens (--global-max)")
    print("sliding / global layer attention against n", flush=True)
    res["attn"] = _intkeys(_child(sys.executable, _ATTN, [json.dumps(plan["attn_n"]), 2 if quick else 5], threads))
    for size in plan["sizes"]:
        int8_ctxs = sorted(set(plan["int8"]) | {min(plan["decode"])})
        runs = [("5:1", "native", sorted(set(plan["prefill"]) | set(plan["decode"])), "model"),
                ("global", "native", [c for c in plan["prefill"] if not global_max or c <= global_max], "model"),
                ("5:1", "int8", int8_ctxs, "model"),
                ("5:1", "int8", int8_ctxs, "int8")]  # and an int8 KV cache (kv_dtype="int8")
        for pattern, weights, ctxs, kv in runs:
            decode_at = [c for c in ctxs if c in plan["decode"] or (pattern == "global" and c == max(ctxs))]
            print(f"gemmalens {size} {pattern} bf16{'' if weights == 'native' else ' + int8 weights'}"
                  f"{' + int8 KV cache' if kv == 'int8' else ''}", flush=True)
            try:
                r = _child(sys.executable, _OURS, [variant(size, pattern, ckpt), "bfloat16", weights, threads,
                                                   json.dumps(ctxs), json.dumps(decode_at), plan["n_new"],
                                                   2 if quick else 3, kv], threads)
                res["ours"][(size, pattern, weights if kv == "model" else f"{weights}+kv8")] = _intkeys(r)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                res["errors"].append(f"gemmalens {size} {pattern} {weights}: {e}")
                print(res["errors"][-1], flush=True)
        for ctx in plan["peers"]:
            print(f"HF {size} bf16 sdpa, {ctx} tokens", flush=True)
            try:
                if not (hf_max and ctx > hf_max):
                    res["hf"][(size, ctx)] = _child(sys.executable, _HF, [variant(size, "5:1", ckpt), "bfloat16",
                                                                            threads, ctx, plan["n_new"]], threads)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                res["errors"].append(f"HF {size} {ctx}: {e}")
                print(res["errors"][-1], flush=True)
            print(f"llama.cpp {size} BF16 GGUF, {ctx} tokens", flush=True)
            try:
                res["llama"][(size, ctx)] = _child(llama_python, _LLAMA, [gguf_of(size, ckpt), threads, ctx,
                                                                          plan["n_new"]], threads)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                res["errors"].append(f"llama.cpp {size} {ctx}: {e}")
                print(res["errors"][-1], flush=True)
    return res


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def section(res):
    """The README section: the 32k (quick: 4k) table against the peers, gemmalens' decode against context, KV bytes,
    the sliding layer's attention time against n with its fit, and the plot."""
    plan, threads = res["plan"], res["threads"]
    top = max(plan["peers"])
    text = (f"### Long context (batch 1, {threads} threads; prefill of the context, then decode at it; bf16 weights "
            "and KV cache)\n\n"
            "| model | context | engine | prefill tok/s | decode tok/s | KV cache MiB | peak RSS MB |\n"
            "|---|---|---|---|---|---|---|\n")
    for size in plan["sizes"]:
        o = res["ours"].get((size, "5:1", "native"))
        g = res["ours"].get((size, "global", "native"))
        i8 = res["ours"].get((size, "5:1", "int8"))
        kv8 = res["ours"].get((size, "5:1", "int8+kv8"))
        for ctx in plan["peers"]:
            cells = [("gemmalens, 5:1", o), ("gemmalens, int8 weights, 5:1", i8),
                     ("gemmalens, int8 weights + int8 KV cache, 5:1", kv8), ("gemmalens, every layer global", g)]
            for name, r in cells:
                if r and ctx in r["prefill"]:
                    text += (f"| {size} | {ctx} | {name} | {ctx / r['prefill'][ctx]:.0f} | {_f(r['decode'].get(ctx))} | "
                             f"{_f(r['kv_bytes'].get(ctx, 0) / 2**20 or None, '{:.0f}')} | {r['peak_rss'] / 1e6:.0f} |\n")
            for name, r in (("llama.cpp (SWA cache, flash attention)", res["llama"].get((size, ctx))),
                            ("HF transformers (sdpa)", res["hf"].get((size, ctx)))):
                if r:
                    text += (f"| {size} | {ctx} | {name} | {ctx / r['prefill']:.0f} | {r['decode']:.1f} | "
                             f"{r['kv_bytes'] / 2**20:.0f} | {r['peak_rss'] / 1e6:.0f} |\n")
    if res.get("not_run"):
        text += "\nNot run in this run: " + "; ".join(res["not_run"]) + ".\n"
    text += ("\nThe same random weights of the real shapes everywhere: gemmalens and HF read the HF folder, llama.cpp "
             "a BF16 GGUF written from it. gemmalens: `dtype=\"bfloat16\"` (bf16 matmul inputs, bf16 KV cache, f32 "
             "activations and softmax), int8 rows `weights=\"int8\"` with it (the CLI's fast mode), \"int8 KV cache\" "
             "also `new_cache(kv_dtype=\"int8\")` (int8 blocks of 32 with a scale each, 1.125 bytes a value); \"every layer "
             "global\" is the same folder with config.json's `layer_types` all `full_attention`. HF: `torch_dtype="
             "bfloat16`, `attn_implementation=\"sdpa\"` (eager would materialise [T, T] scores per head), "
             "`logits_to_keep=1`, its DynamicCache (sliding layers keep their window). llama.cpp: llama-cpp-python, "
             "`swa_full=False` (its SWA cache: window + ubatch cells on sliding layers), `flash_attn=True`, n_batch 2048 "
             "/ n_ubatch 512, f16 KV cache; its KV MiB from its own log. Decode: the median of one-token steps after "
             "the prompt. Peak RSS: the child process's VmHWM.\n")
    # decode against context
    dec = plan["decode"]
    text += ("\n#### gemmalens decode against context (tok/s)\n\n| model | weights | "
             + " | ".join(f"ctx {c}" for c in dec) + f" | {dec[-1]} / {dec[0]} | alternated: ctx {dec[0]} / ctx {dec[-1]} "
             f"| alternated: {dec[-1]} / {dec[0]} |\n|---|---|" + "---|" * (len(dec) + 3) + "\n")
    for size in plan["sizes"]:
        for weights, key in (("bf16", "native"), ("int8", "int8"), ("int8, int8 KV cache", "int8+kv8")):
            r = res["ours"].get((size, "5:1", key))
            if not r:
                continue
            v = [r["decode"].get(c) for c in dec]
            ratio = f"**{v[-1] / v[0]:.2f}**" if v[0] and v[-1] else "-"
            alt = r.get("alternated")
            alt_cells = (f"{alt['short_tok_s']:.1f} / {alt['long_tok_s']:.1f} | **{alt['long_tok_s'] / alt['short_tok_s']:.2f}**"
                         if alt and alt["short"] == dec[0] and alt["long"] == dec[-1] else "- | -")
            text += f"| {size} | {weights} | " + " | ".join(_f(x) for x in v) + f" | {ratio} | {alt_cells} |\n"
    text += (f"\nThe ctx columns measure each context in turn, minutes apart; the alternated columns decode at ctx "
             f"{dec[0]} and ctx {dec[-1]} again in the same process, in {ALT_BLOCKS} blocks of {ALT_STEPS} steps that "
             "alternate between the two caches (a block's first step not counted): the machine's drift falls on both.\n")
    # KV bytes, both patterns
    text += (f"\n#### KV cache at {FULL_CTX} positions (bf16, batch 1; `KVCache.nbytes`)\n\n"
             "| model | 5:1 MiB | every layer global MiB | global / 5:1 |\n|---|---|---|---|\n")
    for size in ("270m", "1b"):
        a, b = kv_bytes(size, "5:1", FULL_CTX), kv_bytes(size, "global", FULL_CTX)
        text += f"| {size} | {a / 2**20:.0f} | {b / 2**20:.0f} | {b / a:.1f}x |\n"
    # attention against n
    at = res["attn"]
    ns = sorted(at["sliding"])
    fit_ns = [n for n in ns if n >= 4 * WINDOW]
    text += ("\n#### One layer's prefill attention against the context length n (bf16 model, 4 query heads, 1 KV head, "
             "head_dim 256; `_core._testing.attention_seconds`: the kernel a forward runs, no cache)\n\n"
             f"| n | sliding layer (window {WINDOW}) ms | its query-key pairs | ns per pair | global layer ms | its pairs | "
             "ns per pair |\n|---|---|---|---|---|---|---|\n")
    for n in ns:
        ps, pg = pairs(n, WINDOW), pairs(n, 0)
        text += (f"| {n} | {at['sliding'][n] * 1e3:.2f} | {ps:.3g} | {at['sliding'][n] / ps * 1e9:.3f} | "
                 f"{at['global'][n] * 1e3:.1f} | {pg:.3g} | {at['global'][n] / pg * 1e9:.3f} |\n")
    per_pair = [at["sliding"][n] / pairs(n, WINDOW) * 1e9 for n in ns]
    text += (f"\nA query on a sliding layer meets min(i + 1, {WINDOW}) keys, so the layer's work is the sum of those, "
             f"n x {WINDOW} less a ramp up to n = {WINDOW}; its time per query-key pair ranges from "
             f"{min(per_pair):.1f} to {max(per_pair):.1f} ns over n = {ns[0]} .. {ns[-1]} (the global layer's n(n + 1) / 2 "
             "pairs, for contrast, grow quadratically).")
    if len(fit_ns) >= 3:
        a, b, r2, quad = linear_fit(fit_ns, [at["sliding"][n] for n in fit_ns])
        text += (f" Over n >= {4 * WINDOW} (past the ramp), least squares t = a + b n: a = {a * 1e3:.2f} ms, "
                 f"b = {b * 1e6:.2f} us per position, **R^2 = {r2:.4f}**; a quadratic fit's n^2 term at n = {fit_ns[-1]} "
                 f"is {quad * 100:+.1f}% of the time measured there.")
    text += (" The tiled kernel starts each block of queries at its first visible key: the keys before it are never "
             "read, not masked (csrc/tests/attention_test.cpp poisons them with NaN).\n")
    text += ("\n![KV cache memory and prefill time against context, Gemma 3's 5:1 pattern and every layer global]"
             "(longctx.png)\n")
    for e in res["errors"]:
        text += f"\nFailed: `{e[:300]}`\n"
    return text


def plot(res, path=PNG):
    """Two panels: KV cache MiB against context (both sizes, both patterns: KVCache.nbytes) and gemmalens bf16 prefill
    seconds against context (both patterns, as measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ctxs = [512 * 2 ** i for i in range(7)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"270m": "tab:blue", "1b": "tab:orange"}
    for size in ("270m", "1b"):
        for pattern, style in (("5:1", "-"), ("global", "--")):
            ax1.plot(ctxs, [kv_bytes(size, pattern, c) / 2**20 for c in ctxs], style, marker="o", ms=3,
                     color=colors[size], label=f"{size}, {'5:1 sliding' if pattern == '5:1' else 'every layer global'}")
            r = res["ours"].get((size, pattern, "native"))
            if r:
                cs = sorted(c for c in r["prefill"] if c >= 512)
                ax2.plot(cs, [r["prefill"][c] for c in cs], style, marker="o", ms=3, color=colors[size],
                         label=f"{size}, {'5:1 sliding' if pattern == '5:1' else 'every layer global'}")
    ax1.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV cache (MiB, bf16)",
            title="KV cache memory")
    ax2.set(xscale="log", yscale="log", xlabel="prompt (tokens)", ylabel="prefill (s)",
            title=f"gemmalens prefill, bf16, {res['threads']} threads")
    for ax in (ax1, ax2):
        ax.set_xticks(ctxs, [f"{c // 1024}k" if c >= 1024 else str(c) for c in ctxs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="270m only, contexts up to 4k")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--sizes", help="comma-separated sizes instead of the plan's")
    ap.add_argument("--llama-python", help="the Python whose llama-cpp-python runs llama.cpp (default: this one)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--hf-max", type=int, help="run HF only at peer contexts up to this many tokens")
    ap.add_argument("--global-max", type=int, help="run the every-layer-global variant only up to this context")
    args = ap.parse_args()
    from make_models import make

    def ckpt(size):
        p = os.path.join(WORK, f"random-{size}")
        if not os.path.exists(os.path.join(p, "model.safetensors")):
            make(size, p)
        return p

    res = rows(args.threads, args.quick, args.sizes.split(",") if args.sizes else None, ckpt, args.llama_python,
               args.hf_max, args.global_max)
    if not args.no_plot:
        print("wrote", plot(res))
    print(section(res))


if __name__ == "__main__":
    main()
