"""gemmalens benchmark: the machine's limits, then gemmalens beside its peers on the same weights, in one run.

    python bench/run.py            # full: 270m and 1b shapes
    python bench/run.py --quick    # 270m only, fewer repeats

Writes the tables to bench/README.md (between the BENCH markers) with the date and machine.
Random-weight checkpoints of the real shapes are generated once under bench/_work/ (git-ignored).
Peers: HF transformers (torch 2.13 CPU; default attention; prefill with `logits_to_keep=1`, as gemmalens'
last-position mode; decode with `generate`), TransformerLens (TransformerBridge over the same HF model; its version is in the header).
All at the same thread count.
"""
import argparse
import datetime
import gc
import os
import platform
import re
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")
sys.path.insert(0, HERE)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timeit(fn, repeats):
    fn()  # warm-up (primitive creation, page faults)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_gemmalens(path, dtype, lengths, threads, repeats):
    import gemmalens as gl

    model = gl.load(path, dtype=dtype, threads=threads)
    rng = np.random.default_rng(0)
    out = {}
    for T in lengths:
        toks = model.to_tokens(rng.integers(0, model.config.vocab_size, T))
        out[T] = T / timeit(lambda: model.next_token_logits(toks), repeats)
    del model
    gc.collect()
    return out


def bench_hf(path, dtype, lengths, threads, repeats):
    import torch
    from transformers import Gemma3ForCausalLM

    torch.set_num_threads(threads)
    model = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    rng = np.random.default_rng(0)
    out = {}
    for T in lengths:
        ids = torch.as_tensor(rng.integers(0, model.config.vocab_size, (1, T)))

        def run():
            with torch.inference_mode():
                model(ids, logits_to_keep=1, use_cache=False)

        out[T] = T / timeit(run, repeats)
    del model
    gc.collect()
    return out


def machine_limits(threads):
    from gemmalens import _core

    bw = _core._testing.read_bandwidth(1 << 30, 5)
    # oneDNN matmul with the weights prepared once, as a model layer holds them (best of 5 calls)
    flops = {dt: _core._testing.matmul_rate(512, 2048, 2048, dt, 5) for dt in ("float32", "bfloat16")}
    return bw, flops


def prefill_flops_per_token(path, T):
    """Matmul FLOPs per token of a T-token prefill (last-position logits): 2 x layer weights, plus attention
    (QK^T and PV over each position's visible keys, causal, sliding layers capped at the window)."""
    import json as _json

    c = _json.load(open(os.path.join(path, "config.json")))
    c = c.get("text_config", c)
    D, F, H, KV, Hd, L = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"],
                          c["head_dim"], c["num_hidden_layers"])
    per_layer = 2 * (D * (H + 2 * KV) * Hd + H * Hd * D + 3 * D * F)
    pattern = c.get("sliding_window_pattern", 6)
    types = c.get("layer_types") or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(L)]
    attn = 0.0
    for t in types:
        w = c["sliding_window"] if t == "sliding_attention" else T
        attn += 4 * H * Hd * np.mean([min(p + 1, w) for p in range(T)])
    return L * per_layer + attn


def bench_decode(path, dtype, batch, prompt_len, n_new, threads, repeats):
    """Decode tok/s (per sequence step x batch) after a prompt_len prefill: gemmalens and HF generate."""
    import gemmalens as gl

    model = gl.load(path, dtype=dtype, threads=threads)
    rng = np.random.default_rng(0)
    toks = model.to_tokens(rng.integers(0, model.config.vocab_size, (batch, prompt_len)))

    def run():
        cache = model.new_cache(batch=batch, max_seq_len=prompt_len + n_new + 1)
        model.next_token_logits(toks, cache=cache)
        step = toks[:, -1:].copy()
        t0 = time.perf_counter()
        for _ in range(n_new):
            model.next_token_logits(step, cache=cache)
        return time.perf_counter() - t0

    run()
    ours = batch * n_new / min(run() for _ in range(repeats))
    wbytes = model.weight_nbytes
    del model
    gc.collect()

    import torch
    from transformers import Gemma3ForCausalLM

    torch.set_num_threads(threads)
    hf = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    ids = torch.as_tensor(np.asarray(toks, dtype=np.int64))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=0)

    def hf_time(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, **kw)
        return time.perf_counter() - t0

    hf_time(2)
    hf_n = max(4, n_new // 2)
    theirs = batch * (hf_n - 1) / max(1e-9, min(hf_time(hf_n) for _ in range(max(1, repeats - 1))) - hf_time(1))
    del hf
    gc.collect()
    return ours, theirs, wbytes


def bench_hooks(path, threads, repeats, T=256):
    """270m f32, T tokens: plain forward vs run_with_cache (all resid_post / every hook), and TransformerLens."""
    import gemmalens as gl

    model = gl.load(path, threads=threads)
    toks = model.to_tokens(np.random.default_rng(0).integers(0, model.config.vocab_size, T))
    plain = timeit(lambda: model.forward(toks), repeats)
    resid = timeit(lambda: model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post")), repeats)
    every = timeit(lambda: model.run_with_cache(toks), repeats)
    del model
    gc.collect()
    tl_time = None
    try:
        import torch

        bridge = tl_bridge(path, threads)
        ids = torch.as_tensor(np.asarray(toks, dtype=np.int64))

        def tl_run():
            with torch.no_grad():
                bridge.run_with_cache(ids)

        tl_time = timeit(tl_run, repeats)
        del bridge
        gc.collect()
    except Exception as e:  # report, do not hide: the table says why the cell is empty
        print(f"TransformerLens run failed: {type(e).__name__}: {e}", flush=True)
    return plain, resid, every, tl_time


def _tl_version():
    try:
        from importlib.metadata import version

        return version("transformer-lens")
    except Exception:  # not installed: the TransformerLens cells say why they are empty
        return "not installed"


def tl_bridge(path, threads, dtype="float32"):
    """TransformerLens's TransformerBridge over the HF model in path (float32 eager)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import Gemma3ForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    torch.set_num_threads(threads)
    hf = Gemma3ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager").eval()
    # TransformerLens wants a tokenizer object; the random-weight model has none, so give it a stub.
    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    stub_dir = os.path.join(WORK, "stub-tokenizer")
    stub.save_pretrained(stub_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(stub_dir)
    return TransformerBridge.boot_transformers(path, hf_model=hf, tokenizer=tok, device="cpu")


def bench_grad(path, dtype, threads, repeats, T=256):
    """A gradient run (forward + reverse, the loss's gradient at every hook_resid_post) against a plain forward,
    and TransformerLens's run_with_cache(incl_bwd=True) on the same weights (float32 only)."""
    import gemmalens as gl

    model = gl.load(path, dtype=dtype, threads=threads)
    toks = model.to_tokens(np.random.default_rng(0).integers(0, model.config.vocab_size, T))
    resid = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    plain = timeit(lambda: model.forward(toks), repeats)
    grad = timeit(lambda: model.run_with_cache(toks, names_filter=resid, incl_bwd=True, metric="loss"), repeats)
    del model
    gc.collect()
    tl_time = None
    if dtype == "float32":
        try:
            import torch

            bridge = tl_bridge(path, threads)
            ids = torch.as_tensor(np.asarray(toks, dtype=np.int64))
            tl_time = timeit(lambda: bridge.run_with_cache(ids, names_filter=resid, incl_bwd=True, return_type="loss"),
                             repeats)
            del bridge
            gc.collect()
        except Exception as e:  # report, do not hide: the table says why the cell is empty
            print(f"TransformerLens gradient run failed: {type(e).__name__}: {e}", flush=True)
    return plain, grad, tl_time


_LLAMA_SCRIPT = r"""
import json, statistics, sys, time
from llama_cpp import Llama
path, threads, repeats, prompt_len, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
toks = json.loads(sys.argv[6])
llm = Llama(model_path=path, n_ctx=len(toks) + 64, n_batch=len(toks), n_threads=threads, n_threads_batch=threads,
            verbose=False)

def lpf():
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(toks)
    return time.perf_counter() - t0

def ldec():
    llm.reset()
    llm.eval(toks[:prompt_len])
    t0 = time.perf_counter()
    for i in range(n_new):
        llm.eval([toks[i]])
    return time.perf_counter() - t0

lpf()
pf = len(toks) / statistics.median(lpf() for _ in range(repeats))  # median, as timeit() for gemmalens
ldec()
dec = n_new / min(ldec() for _ in range(repeats))
print(json.dumps([pf, dec]))
"""


def bench_llama_cpp(gguf_path, dtype, threads, repeats, prompt_len=128, n_new=32, T_prefill=512, weights="native",
                    with_llama=True):
    """gemmalens vs llama.cpp (llama-cpp-python) on the same GGUF: prefill tok/s at T_prefill, decode tok/s at context
    prompt_len."""
    import gemmalens as gl

    rng = np.random.default_rng(0)
    model = gl.load(gguf_path, dtype=dtype, threads=threads, weights=weights)
    V = model.config.vocab_size
    toks = rng.integers(4, min(V, 200000), T_prefill).tolist()
    t = model.to_tokens(toks)
    pf_ours = T_prefill / timeit(lambda: model.next_token_logits(t), repeats)

    def dec():
        cache = model.new_cache(max_seq_len=prompt_len + n_new + 1)
        model.next_token_logits(model.to_tokens(toks[:prompt_len]), cache=cache)
        step = model.to_tokens([toks[0]])
        t0 = time.perf_counter()
        for _ in range(n_new):
            model.next_token_logits(step, cache=cache)
        return time.perf_counter() - t0

    dec()
    dec_ours = n_new / min(dec() for _ in range(repeats))
    del model
    gc.collect()
    if not with_llama:
        return pf_ours, dec_ours, None, None
    # llama.cpp runs in a child process: a crash there (see README: ggml's AMX backend) costs its cells, not the run.
    import json as _json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _LLAMA_SCRIPT, gguf_path, str(threads), str(repeats), str(prompt_len),
                          str(n_new), _json.dumps(toks)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"llama.cpp failed (exit {out.returncode}): {out.stderr.strip()[-300:]}", flush=True)
        return pf_ours, dec_ours, None, None
    pf_theirs, dec_theirs = _json.loads(out.stdout.strip().splitlines()[-1])
    return pf_ours, dec_ours, pf_theirs, dec_theirs


def decode_only(path, dtype, ctx, threads, n_new=16, weights="native"):
    """gemmalens decode tok/s (batch 1) after a ctx-token prefill."""
    import gemmalens as gl

    model = gl.load(path, dtype=dtype, threads=threads, weights=weights)
    toks = model.to_tokens(np.random.default_rng(0).integers(0, model.config.vocab_size, ctx))
    cache = model.new_cache(max_seq_len=ctx + n_new + 2)
    model.next_token_logits(toks, cache=cache)
    step = toks[:, -1:].copy()
    model.next_token_logits(step, cache=cache)
    t0 = time.perf_counter()
    for _ in range(n_new):
        model.next_token_logits(step, cache=cache)
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    return n_new / dt


_RSS_SCRIPT = r"""
import json, sys, time
import numpy as np
import gemmalens as gl
path, dtype, weights = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter(); m = gl.load(path, dtype=dtype, weights=weights); t_load = time.perf_counter() - t0
cache = m.new_cache(max_seq_len=1024)
toks = m.to_tokens(np.random.default_rng(0).integers(0, m.config.vocab_size, 512))
m.next_token_logits(toks, cache=cache)
for _ in range(16):
    m.next_token_logits(toks[:, -1:], cache=cache)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]  # peak RSS, kB (reset at exec)
print(json.dumps({"load_s": t_load, "weights": m.weight_nbytes, "cache": cache.nbytes, "rss": int(hwm) * 1024}))
"""


def rss_and_load(path, dtype, weights="native"):
    """Peak RSS of a fresh process that loads, prefills 512 and decodes 16 (cache 1024), and its load time
    (warm page cache: the file was just read)."""
    import json as _json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, path, dtype, weights], capture_output=True, text=True,
                         timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return _json.loads(out.stdout.strip().splitlines()[-1])


def bench_sae(path, threads, repeats, T=128, width=16384):
    """One 16k-wide JumpReLU SAE spliced at one site (resid_post of the middle layer) vs the plain forward."""
    import gemmalens as gl

    model = gl.load(path, threads=threads)
    D = model.config.hidden_size
    rng = np.random.default_rng(0)
    sae = gl.SAE(W_enc=rng.standard_normal((D, width), dtype=np.float32) * 0.02, b_enc=np.zeros(width, np.float32),
                 W_dec=rng.standard_normal((width, D), dtype=np.float32) * 0.02, b_dec=np.zeros(D, np.float32),
                 threshold=np.full(width, 0.05, np.float32), architecture="jumprelu",
                 hook_name=f"blocks.{model.config.num_hidden_layers // 2}.hook_resid_post")
    toks = model.to_tokens(rng.integers(0, model.config.vocab_size, T))
    plain = timeit(lambda: model.forward(toks), repeats)
    spliced = timeit(lambda: model.run_with_saes(toks, saes=[sae], use_error_term=True), repeats)
    del model
    gc.collect()
    return plain, spliced


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-write", action="store_true", help="print the table, do not update bench/README.md")
    args = ap.parse_args()

    from make_models import make

    import gemmalens
    import torch
    import transformers

    sizes = ["270m"] if args.quick else ["270m", "1b"]
    lengths = [128, 512]
    repeats = 2 if args.quick else 3
    paths = {}
    for size in sizes:
        paths[size] = os.path.join(WORK, f"random-{size}")
        if not os.path.exists(os.path.join(paths[size], "model.safetensors")):
            print(f"writing {paths[size]} ...", flush=True)
            make(size, paths[size])

    bw, flops = machine_limits(args.threads)
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; matmul f32 {flops['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {flops['bfloat16'] / 1e9:.0f} GFLOP/s", flush=True)

    prefill = []
    for size in sizes:
        for dtype in ("float32", "bfloat16"):
            ours = bench_gemmalens(paths[size], dtype, lengths, args.threads, repeats)
            hf = bench_hf(paths[size], dtype, lengths, args.threads, repeats)
            for T in lengths:
                prefill.append((size, dtype, T, ours[T], hf[T]))
                print(f"{size:5s} {dtype:9s} prefill {T:4d}: gemmalens {ours[T]:8.1f} tok/s  HF {hf[T]:8.1f} tok/s  "
                      f"x{ours[T] / hf[T]:.2f}", flush=True)

    decode = []
    for size in sizes:
        for batch in (1, 8):
            o, h, wbytes = bench_decode(paths[size], "bfloat16", batch, 128, 16 if args.quick else 32, args.threads, repeats)
            bound = bw / wbytes * batch  # every step reads all weights once
            decode.append((size, "bfloat16", batch, o, h, o / bound))
            print(f"{size:5s} bf16 decode batch {batch}: gemmalens {o:7.1f} tok/s  HF {h:7.1f} tok/s  x{o / h:.2f}  "
                  f"{o / bound:.2f} of the bandwidth bound", flush=True)

    plain, resid, every, tl_time = bench_hooks(paths["270m"], args.threads, repeats)
    print(f"hooks: plain {plain * 1e3:.0f} ms, cache resid_post {resid * 1e3:.0f} ms, cache all {every * 1e3:.0f} ms, "
          f"TL {tl_time * 1e3 if tl_time else float('nan'):.0f} ms", flush=True)

    grad_rows = []
    for size in sizes:
        for dtype in ("float32", "bfloat16"):
            p_, g_, t_ = bench_grad(paths[size], dtype, args.threads, repeats)
            grad_rows.append((size, dtype, p_, g_, t_))
            print(f"{size} {dtype} gradient run: plain {p_ * 1e3:.0f} ms, forward + reverse {g_ * 1e3:.0f} ms "
                  f"(x{g_ / p_:.2f}), TL {t_ * 1e3 if t_ else float('nan'):.0f} ms", flush=True)

    llama_rows = []
    from gemmalens.formats import _resolve_demo
    from make_models import write_bf16_gguf

    gguf_models = [("270m Q4_K_M (real)", _resolve_demo("gemma3-270m"))]
    if not args.quick:
        g1b = os.path.join(WORK, "random-1b-bf16.gguf")
        if not os.path.exists(g1b):
            write_bf16_gguf(paths["1b"], g1b)
        gguf_models.append(("1b BF16 (random)", g1b))
    thread_counts = [args.threads] + ([1] if args.threads != 1 else [])
    for label, gpath in gguf_models:
        for th in thread_counts:
            last = None
            for dtype, weights in (("bfloat16", "native"), ("float32", "int8"), ("float32", "int4")):
                r = bench_llama_cpp(gpath, dtype, th, repeats, weights=weights, with_llama=last is None)
                if last is None:
                    last = r
                else:
                    r = r[:2] + last[2:]  # the same llama.cpp run
                tag = "bf16" if weights == "native" else f"{weights} (f32 compute)"
                llama_rows.append((label, th, tag) + r)
                print(f"{label} {th} threads gemmalens({dtype}) prefill {r[0]:.1f} decode {r[1]:.1f} | llama.cpp prefill "
                      f"{r[2] or float('nan'):.1f} decode {r[3] or float('nan'):.1f}", flush=True)

    extra = []
    for size in sizes:
        d128 = decode_only(paths[size], "bfloat16", 128, args.threads)
        d4k = decode_only(paths[size], "bfloat16", 4096, args.threads)
        t1 = decode_only(paths[size], "bfloat16", 128, 1)
        i8 = decode_only(paths[size], "float32", 128, args.threads, weights="int8")
        i4 = decode_only(paths[size], "float32", 128, args.threads, weights="int4")
        r = rss_and_load(paths[size], "bfloat16")
        extra.append((size, d128, d4k, t1, i8, i4, r))
        print(f"{size}: decode bf16 ctx128 {d128:.1f}, ctx4096 {d4k:.1f}, 1 thread {t1:.1f}, int8 {i8:.1f}, int4 {i4:.1f} tok/s; "
              f"rss {r['rss'] / 1e6:.0f} MB vs weights+cache {(r['weights'] + r['cache']) / 1e6:.0f} MB; "
              f"load {r['load_s']:.2f} s", flush=True)

    sae_rows = []
    for size in sizes:
        p_, s_ = bench_sae(paths[size], args.threads, repeats)
        sae_rows.append((size, p_, s_))
        print(f"{size} SAE 16k splice: plain {p_ * 1e3:.0f} ms, with SAE {s_ * 1e3:.0f} ms (+{(s_ / p_ - 1) * 100:.1f}%)", flush=True)

    head = (f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, {args.threads} threads "
            f"({os.cpu_count()} cores visible); gemmalens {gemmalens.__version__} (oneDNN {gemmalens._core.dnnl_version()}), "
            f"transformers {transformers.__version__}, torch {torch.__version__}, transformer_lens {_tl_version()}. Command: `python bench/run.py"
            f"{' --quick' if args.quick else ''}`. Random weights of the real shapes.\n\n"
            f"Machine, measured in the same run: streaming read bandwidth **{bw / 1e9:.1f} GB/s**; oneDNN matmul "
            f"512x2048x2048 f32 **{flops['float32'] / 1e9:.0f} GFLOP/s**, bf16 **{flops['bfloat16'] / 1e9:.0f} GFLOP/s**.\n\n")
    text = head + "### Prefill (batch 1, last-position logits)\n\n"
    text += ("| model | dtype | tokens | gemmalens tok/s | HF tok/s | ratio | gemmalens GFLOP/s | fraction of the matmul "
             "rate |\n|---|---|---|---|---|---|---|---|\n")
    for size, dtype, T, o, h in prefill:
        gf = o * prefill_flops_per_token(paths[size], T)
        text += (f"| {size} | {dtype} | {T} | {o:.1f} | {h:.1f} | **{o / h:.2f}x** | {gf / 1e9:.0f} | "
                 f"{gf / flops[dtype]:.2f} |\n")
    text += ("\nGFLOP/s counts the layers' matmuls and attention (QK^T, PV over the visible keys); the fraction divides it "
             "by the oneDNN matmul rate of the same dtype measured above.\n")
    text += ("\n### Decode (context 128, greedy; tok/s over all sequences)\n\n"
             "| model | dtype | batch | gemmalens tok/s | HF generate tok/s | ratio | fraction of bandwidth bound |\n"
             "|---|---|---|---|---|---|---|\n")
    for size, dtype, batch, o, h, frac in decode:
        text += f"| {size} | {dtype} | {batch} | {o:.1f} | {h:.1f} | **{o / h:.2f}x** | {frac:.2f} |\n"
    text += ("\nThe bandwidth bound is `bandwidth / bytes of weights read per step` (the tied 262144-row embedding is "
             "read for the LM head every step).\n\n### Hooks (270m, float32, 256 tokens, all-position logits)\n\n"
             "| run | ms | vs plain forward |\n|---|---|---|\n"
             f"| plain forward | {plain * 1e3:.0f} | 1.00 |\n"
             f"| run_with_cache, all 18 hook_resid_post | {resid * 1e3:.0f} | {resid / plain:.2f} |\n"
             f"| run_with_cache, every hook (398) | {every * 1e3:.0f} | {every / plain:.2f} |\n")
    if tl_time:
        text += (f"| TransformerLens run_with_cache, every hook | {tl_time * 1e3:.0f} | {tl_time / plain:.2f} |\n\n"
                 f"TransformerLens time / gemmalens time for `run_with_cache` of every hook: **{tl_time / every:.2f}**.\n")
    text += ("\n### Gradients (256 tokens; the loss's gradient at every hook_resid_post; `run_with_cache(incl_bwd=True)`)\n\n"
             "| model | dtype | plain forward ms | forward + reverse ms | vs plain | TransformerLens ms | TransformerLens / "
             "gemmalens |\n|---|---|---|---|---|---|---|\n")
    for size, dtype, p_, g_, t_ in grad_rows:
        tl = f"{t_ * 1e3:.0f} | **{t_ / g_:.2f}**" if t_ else "- | -"
        text += f"| {size} | {dtype} | {p_ * 1e3:.0f} | {g_ * 1e3:.0f} | {g_ / p_:.2f} | {tl} |\n"
    text += ("\nThe reverse pass runs each block again from its recorded input (a plain forward keeps no "
             "intermediates) and widens each layer's weights to f32 for its VJP.\n")
    text += ("\n### Against llama.cpp on the same GGUF file (llama-cpp-python; prefill 512 tokens, decode at context 128, "
             "batch 1)\n\n| file | threads | gemmalens weights | gemmalens prefill | llama.cpp prefill | ratio | gemmalens decode | "
             "llama.cpp decode | ratio |\n|---|---|---|---|---|---|---|---|---|\n")
    for label, th, dtype, po, do, pt, dt in llama_rows:
        if pt:
            text += (f"| {label} | {th} | {dtype} | {po:.1f} | {pt:.1f} | **{po / pt:.2f}x** | {do:.1f} | {dt:.1f} | "
                     f"**{do / dt:.2f}x** |\n")
    text += ("\nbf16 rows: gemmalens dequantises the GGUF at load to bf16; llama.cpp computes on the file's own blocks "
             "(Q4_K/Q5_0/Q8_0/Q6_K: ~3-4x fewer bytes per decoded token). int8 rows: gemmalens re-quantises the weights at "
             "load to int8 blocks of 32 (`weights=\"int8\"`), int4 rows to 4-bit layer blocks with an int8 LM head "
             "(`weights=\"int4\"`, accuracy in the top-level README); decode runs them on VNNI with int8 activations, "
             "prefill on a machine with AMX dequantises them a chunk at a time to bf16 for oneDNN's AMX matmul. On the BF16 "
             "file both are lossier than llama.cpp's BF16 arithmetic, so those rows compare speed at different precision.\n")
    text += ("\n### Decode scaling, threads, memory (gemmalens, batch 1)\n\n| model | bf16 ctx 128 | bf16 ctx 4096 | "
             "4096 / 128 | bf16 1 thread | int8 weights (f32 compute) | int4 weights (f32 compute) | "
             "peak RSS / (weights + cache) | load (warm) |\n|---|---|---|---|---|---|---|---|---|\n")
    for size, d128, d4k, t1, i8, i4, r in extra:
        text += (f"| {size} | {d128:.1f} | {d4k:.1f} | {d4k / d128:.2f} | {t1:.1f} | {i8:.1f} | {i4:.1f} | "
                 f"{r['rss'] / (r['weights'] + r['cache']):.2f} ({r['rss'] / 1e6:.0f} MB) | {r['load_s']:.2f} s |\n")
    text += ("\nPeak RSS includes the Python interpreter, numpy and the extension; the process prefills 512 tokens and "
             "decodes 16 with a 1024-position bf16 cache.\n")
    text += ("\n### SAE splice (one 16384-wide JumpReLU SAE at the middle layer's hook_resid_post, error term on, 128 tokens, "
             "float32)\n\n| model | plain forward ms | with the SAE ms | cost |\n|---|---|---|---|\n")
    for size, p_, s_ in sae_rows:
        text += f"| {size} | {p_ * 1e3:.0f} | {s_ * 1e3:.0f} | +{(s_ / p_ - 1) * 100:.1f}% |\n"
    # Threads on a busy machine: the CLI's default thread count against --threads 1, with busy-loop competitors.
    import threads_under_load

    text += threads_under_load.section(*threads_under_load.rows(repeats=repeats))
    print("\n" + text)
    if not args.no_write:
        readme = os.path.join(HERE, "README.md")
        doc = open(readme).read()
        new = re.sub(r"<!-- BENCH START -->.*<!-- BENCH END -->",
                     "<!-- BENCH START -->\n" + text + "<!-- BENCH END -->", doc, flags=re.S)
        open(readme, "w").write(new)


if __name__ == "__main__":
    main()
