"""gemmalens benchmark: the machine's limits, then gemmalens beside its peers on the same weights, in one run.

    python bench/run.py                        # full: 270m and 1b shapes
    python bench/run.py --quick                # 270m only (the gradient table: 270m and 1b), fewer repeats
    python bench/run.py --quick --only grad    # measure and rewrite one table (or several: --only hooks,grad)
    python bench/run.py --only serve           # gemmalens serve beside llama.cpp's server (bench/serve_load.py)
    python bench/run.py --only isa             # gemmalens forced to each CPU class beside llama.cpp (bench/isa_bench.py)
    python bench/run.py --only longctx         # prefill / decode to 32k, both patterns, peers (bench/longctx_bench.py)

Writes the tables to bench/README.md (between the BENCH markers; each table between its own bench:NAME markers, so
--only replaces just those and stamps them with their own date and command) with the date and machine.
Random-weight checkpoints of the real shapes are generated once under bench/_work/ (git-ignored).
Peers: HF transformers (torch 2.13 CPU; default attention; prefill with `logits_to_keep=1`, as gemmalens'
last-position mode; decode with `generate`), TransformerLens 4 (TransformerBridge loaded from the same checkpoint
folder; its version is in the header), llama.cpp (llama-cpp-python; for the serving table its server,
llama_cpp.server, from llama-cpp-python[server]). All at the same thread count.
"""
import argparse
import datetime
import gc
import os
import re
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, "_work")
sys.path.insert(0, HERE)


def timings(fn, repeats):
    """Seconds of each of repeats calls, after one warm-up call (primitive creation, page faults)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def timeit(fn, repeats):
    return statistics.median(timings(fn, repeats))


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


def flops_per_token(path, T):
    """Matmul FLOPs per token of a T-token forward: (the layers' weights, attention, the LM head at that token).
    Layers: 2 x their weights; attention: QK^T and PV over each position's visible keys (causal, sliding layers capped
    at the window); LM head: 2 x the tied embedding."""
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
    return L * per_layer, attn, 2 * D * c["vocab_size"]


def prefill_flops_per_token(path, T):
    """Matmul FLOPs per token of a T-token prefill with last-position logits (the LM head's share is negligible)."""
    layers, attn, _ = flops_per_token(path, T)
    return layers + attn


def grad_flop_ratio(path, T):
    """Matmul FLOPs of a gradient run as gemmalens does it over those of a forward with all-position logits: the
    forward, which also computes each block's attention scores beside the fast attention path (kept for the reverse
    pass, as are the block's other intermediates); then per block the VJPs of its matmuls for the input only (one
    matmul each; two for attention's: dQ from dS, dK and dV), and the LM head's VJP."""
    layers, attn, head = flops_per_token(path, T)
    forward = layers + attn + head
    return (forward + attn / 2 + (layers + 2 * attn) + head) / forward


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
    """TransformerLens 4's TransformerBridge over the HF checkpoint folder in path, loaded by TransformerLens itself
    (`boot_transformers` on a local folder: transformers' from_pretrained, eager attention, weights cast to dtype,
    no weight processing), with no network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    # TransformerLens wants a tokenizer object; the random-weight model has none, so give it a stub (ids are passed).
    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    stub_dir = os.path.join(WORK, "stub-tokenizer")
    stub.save_pretrained(stub_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(stub_dir)
    return TransformerBridge.boot_transformers(os.path.abspath(path), tokenizer=tok, device="cpu",
                                               dtype=getattr(torch, dtype))


def _is_resid_post(name):
    return name.endswith("hook_resid_post")


def _median_shown(label, ts):
    """The median of timings, after printing them all (how noisy the machine was is part of the result)."""
    print(f"  {label}: {', '.join(f'{t * 1e3:.0f}' for t in ts)} ms", flush=True)
    return statistics.median(ts)


def bench_grad(path, dtype, threads, repeats, T=256):
    """A gradient run (forward + reverse, the loss's gradient at every hook_resid_post) against a plain forward, and
    TransformerLens's run_with_cache(incl_bwd=True, return_type="loss") on the same weights in the same dtype.

    Returns (plain s, gradient run s, TransformerLens s, largest difference between the two's gradients relative to
    the largest gradient, why TransformerLens failed); the TransformerLens entries are None where it failed."""
    import gemmalens as gl

    model = gl.load(path, dtype=dtype, threads=threads)
    L = model.config.num_hidden_layers
    toks = model.to_tokens(np.random.default_rng(0).integers(0, model.config.vocab_size, T))
    plain = _median_shown(f"{dtype} plain forward", timings(lambda: model.forward(toks), repeats))
    last = {}

    def ours():
        last["cache"] = model.run_with_cache(toks, names_filter=_is_resid_post, incl_bwd=True, metric="loss")[1]

    grad = _median_shown(f"{dtype} gradient run", timings(ours, repeats))
    g_ours = {f"blocks.{i}.hook_resid_post_grad": np.array(last["cache"][f"blocks.{i}.hook_resid_post_grad"])
              for i in range(L)}
    del model, last
    gc.collect()
    tl_time = diff = error = None
    try:
        import torch

        bridge = tl_bridge(path, threads, dtype)
        ids = torch.as_tensor(np.asarray(toks, dtype=np.int64))
        out = {}

        def theirs():
            # run_with_cache calls the loss's backward() itself (TransformerLens 4's incl_bwd). It also fills the
            # weights' .grad (it refuses weights with requires_grad=False); drop them between runs, as a loop would.
            bridge.zero_grad(set_to_none=True)
            out["cache"] = bridge.run_with_cache(ids, names_filter=_is_resid_post, incl_bwd=True, return_type="loss")[1]

        tl_time = _median_shown(f"{dtype} TransformerLens gradient run", timings(theirs, repeats))
        missing = [n for n in g_ours if n not in out["cache"]]
        if missing:
            raise RuntimeError(f"TransformerLens captured no {missing[0]} (and {len(missing) - 1} more)")
        scale = max(float(np.abs(g).max()) for g in g_ours.values())
        diff = max(float(np.abs(out["cache"][n].float().numpy() - g).max()) for n, g in g_ours.items()) / scale
        bridge.zero_grad(set_to_none=True)
        del bridge, out
        gc.collect()
    except Exception as e:  # report, do not hide: the table says why the cell is empty
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"TransformerLens gradient run ({dtype}) failed: {error}", flush=True)
        tl_time = diff = None
    return plain, grad, tl_time, diff, error


_GRAD_RSS_SCRIPT = r"""
import json, os, sys
import numpy as np
bench_dir, engine, path, dtype, threads, T = sys.argv[1:7]
threads, T = int(threads), int(T)
sys.path.insert(0, bench_dir)

def status_bytes(key):  # a /proc/self/status line in kB, as bytes
    return int([l for l in open("/proc/self/status") if l.startswith(key + ":")][0].split()[1]) * 1024

c = json.load(open(os.path.join(path, "config.json")))
toks = np.random.default_rng(0).integers(0, c.get("text_config", c)["vocab_size"], (1, T))
resid = lambda n: n.endswith("hook_resid_post")
if engine == "gemmalens":
    import gemmalens as gl
    m = gl.load(path, dtype=dtype, threads=threads)
    t = m.to_tokens(toks)
    run = lambda: m.run_with_cache(t, names_filter=resid, incl_bwd=True, metric="loss")
else:
    import torch
    from run import tl_bridge
    m = tl_bridge(path, threads, dtype)
    ids = torch.as_tensor(toks)
    run = lambda: m.run_with_cache(ids, names_filter=resid, incl_bwd=True, return_type="loss")
# The peaks are read from VmHWM, the peak RSS of this process's memory map. getrusage's ru_maxrss is the same figure
# but also keeps the parent's peak, handed over at exec (the child of a benchmark process holding GBs would report them).
loaded, load_peak = status_bytes("VmRSS"), status_bytes("VmHWM")
try:  # "5" resets VmHWM to the current RSS: the next peak is the gradient run's own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
out, cache = run()
n_grads = sum(1 for k in cache.keys() if k.endswith("_grad"))
peak = status_bytes("VmHWM")
print(json.dumps({"loaded": loaded, "load_peak": load_peak, "run_peak": peak if reset else None,
                  "peak": max(peak, load_peak), "grads": n_grads}))
"""


def grad_rss(engine, path, dtype, threads, T=256):
    """Memory of one gradient run (as in bench_grad) in a fresh process, in bytes: RSS after the load ("loaded"), the
    peak during the load ("load_peak") and during the gradient run ("run_peak"; None where /proc/self/clear_refs cannot
    reset the peak) and the process's peak ("peak": the larger of the two). engine: "gemmalens" or "transformer_lens"."""
    import json as _json
    import subprocess

    out = subprocess.run([sys.executable, "-c", _GRAD_RSS_SCRIPT, HERE, engine, path, dtype, str(threads), str(T)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} gradient-run memory process failed (exit {out.returncode}): "
                           f"{out.stderr.strip()[-1000:]}")
    return _json.loads(out.stdout.strip().splitlines()[-1])


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


# The tables, in the order they appear in bench/README.md; --only picks some of them.
SECTIONS = ("prefill", "decode", "hooks", "grad", "llama", "scaling", "sae", "threads", "harvest", "serve", "isa",
            "longctx")
GRAD_SIZES = ("270m", "1b")  # the gradient table has both sizes with --quick too


def _mb(n):
    return f"{n / 1e6:.0f}"


def grad_section(rows, mem_rows):
    """The gradient table (bench_grad rows) and its memory table (grad_rss rows)."""
    text = ("### Gradients (256 tokens; the loss's gradient at every hook_resid_post)\n\n"
            "| model | dtype | plain forward ms | forward + reverse ms | vs plain | FLOPs vs plain | TransformerLens ms | "
            "TransformerLens / gemmalens | gradients differ by |\n|---|---|---|---|---|---|---|---|---|\n")
    failures = {}
    for size, dtype, flop_ratio, p_, g_, t_, diff, err in rows:
        if t_:
            tl = f"{t_ * 1e3:.0f} | **{t_ / g_:.2f}x** | {diff:.1e}"
        else:
            mark = failures.setdefault(err, f"[{len(failures) + 1}]")
            tl = f"-{mark} | - | -"
        text += f"| {size} | {dtype} | {p_ * 1e3:.0f} | {g_ * 1e3:.0f} | **{g_ / p_:.2f}** | {flop_ratio:.2f} | {tl} |\n"
    text += ("\ngemmalens: `run_with_cache(tokens, names_filter=<every hook_resid_post>, incl_bwd=True, metric=\"loss\")` "
             "(forward, next-token loss, reverse; all-position logits) against `forward(tokens)` of the same model. "
             "TransformerLens: `TransformerBridge.boot_transformers(<checkpoint folder>, dtype=...)` (transformers' "
             "`from_pretrained`, eager attention, no weight processing) and `run_with_cache(ids, names_filter=..., "
             "incl_bwd=True, return_type=\"loss\")`, which calls the loss's `backward()` itself; it refuses weights that "
             "do not require grad, so its time includes the weights' gradients (set to None before each run), which "
             "gemmalens does not compute. Both in the row's dtype, at the same thread count. \"Gradients differ by\": the "
             "largest difference between the two's `hook_resid_post_grad` over all layers, relative to the largest "
             "gradient.\n")
    for err, mark in failures.items():
        text += f"\n{mark} TransformerLens failed: `{err}`.\n"
    text += ("\nA gradient run's forward keeps each block's intermediates for the reverse pass (within "
             "`gl.grad.keep_bytes`, 2 GiB; a plain forward keeps none), and the reverse pass widens each layer's weights "
             "to f32 for its VJP. \"FLOPs vs plain\" counts the matmuls that way: the forward (with the attention "
             "scores computed beside its fast attention path, for the reverse pass), the VJPs for the inputs (one "
             "matmul per matmul, two for attention's) and the LM head's VJP, over the forward's (the 262144-row LM head "
             "at all 256 positions is 62% of the 270m forward, 30% of the 1b one). In the bfloat16 rows the reverse "
             "matmuls run in f32, at the f32 matmul rate, which is why they stay near 4x. The bfloat16 gradients "
             "differ more: transformers keeps the residual stream in bf16, gemmalens in f32.\n")
    if mem_rows:
        text += ("\n#### Memory of a gradient run (a fresh process loads the model and does one gradient run as above)\n\n"
                 "| model | dtype | gemmalens after load MB | gemmalens peak MB | of which the run | TransformerLens after "
                 "load MB | TransformerLens peak MB | of which the run | gemmalens / TransformerLens peak |\n"
                 "|---|---|---|---|---|---|---|---|---|\n")
        for size, dtype, ours, theirs in mem_rows:
            def cells(r):
                if r is None:
                    return "- | - | -"
                run = f"+{_mb(r['run_peak'] - r['loaded'])}" if r["run_peak"] is not None else "-"
                return f"{_mb(r['loaded'])} | {_mb(r['peak'])} | {run}"
            ratio = f"**{ours['peak'] / theirs['peak']:.2f}x**" if ours and theirs else "-"
            text += f"| {size} | {dtype} | {cells(ours)} | {cells(theirs)} | {ratio} |\n"
        text += ("\n\"After load\": RSS once the model is loaded (Python, numpy or torch, the extension, the weights). "
                 "\"Peak\": the process's peak RSS (`VmHWM`: the load's peak or the gradient run's, the larger; `ru_maxrss` "
                 "would also count the launching benchmark process's peak, which Linux hands over at exec). \"Of which the "
                 "run\": the gradient run's own peak (the peak is reset through `/proc/self/clear_refs` after the load) "
                 "above the RSS after load; for TransformerLens it includes the weights' gradients. TransformerLens "
                 "in bfloat16 is small after load because transformers maps the bf16 file and reads the weights on first "
                 "use; its peak counts them.\n")
    return text


def write_readme(head, sections, only):
    """Rewrite bench/README.md between the BENCH markers: everything on a full run, else only the sections in only
    (each table sits between <!-- bench:NAME --> and <!-- /bench:NAME -->)."""
    readme = os.path.join(HERE, "README.md")
    doc = open(readme).read()
    m = re.search(r"<!-- BENCH START -->\n(.*)<!-- BENCH END -->", doc, flags=re.S)
    if m is None:
        raise SystemExit("bench/README.md has no <!-- BENCH START --> ... <!-- BENCH END --> block")

    def wrapped(name):
        return f"<!-- bench:{name} -->\n{sections[name]}\n<!-- /bench:{name} -->\n\n"

    if only is None:
        block = head + "".join(wrapped(n) for n in SECTIONS)
    else:
        block = m.group(1)
        for name in only:
            pat = re.compile(rf"<!-- bench:{name} -->\n.*?<!-- /bench:{name} -->\n\n?", flags=re.S)
            if not pat.search(block):
                raise SystemExit(f"bench/README.md has no '{name}' table to replace; run `python bench/run.py --quick` "
                                 "once without --only")
            block = pat.sub(lambda _: wrapped(name), block)
    with open(readme, "w") as f:
        f.write(doc[:m.start(1)] + block + doc[m.end(1):])


def main():
    ap = argparse.ArgumentParser(description="Measure gemmalens beside its peers and rewrite bench/README.md's tables.")
    ap.add_argument("--quick", action="store_true", help="270m only (the gradient table: 270m and 1b), fewer repeats")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--only", metavar="TABLES",
                    help="comma-separated tables to measure and rewrite, leaving the others in bench/README.md as they "
                         f"are: {', '.join(SECTIONS)}")
    ap.add_argument("--sizes", metavar="SIZES",
                    help="comma-separated model sizes for every table instead of the defaults (trying things out: "
                         "needs --no-write)")
    ap.add_argument("--no-write", action="store_true", help="print the tables, do not update bench/README.md")
    ap.add_argument("--longctx-hf-max", type=int, metavar="N", help="longctx: run HF only up to N tokens")
    ap.add_argument("--longctx-global-max", type=int, metavar="N",
                    help="longctx: run the every-layer-global variant only up to N tokens")
    ap.add_argument("--llama-build", action="append", default=[], metavar="CLASS=DIR",
                    help="the isa table: a llama-cpp-python built for CPU class CLASS, installed with pip install "
                         "--target DIR (default: the installed build for every class)")
    args = ap.parse_args()
    only = None
    if args.only:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in only if n not in SECTIONS]
        if unknown or not only:
            ap.error(f"--only: unknown table {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(SECTIONS)}")
    if args.sizes and not args.no_write:
        ap.error("--sizes changes the tables' rows: use it with --no-write")

    from make_models import make

    import gemmalens
    import torch
    import transformers

    def want(name):
        return only is None or name in only

    sizes = args.sizes.split(",") if args.sizes else ["270m"] if args.quick else ["270m", "1b"]
    grad_sizes = args.sizes.split(",") if args.sizes else list(GRAD_SIZES)
    lengths = [128, 512]
    repeats = 2 if args.quick else 3
    paths = {}

    def ckpt(size):
        """The random-weight checkpoint of a size, written on first use."""
        if size not in paths:
            paths[size] = os.path.join(WORK, f"random-{size}")
            if not os.path.exists(os.path.join(paths[size], "model.safetensors")):
                print(f"writing {paths[size]} ...", flush=True)
                make(size, paths[size])
        return paths[size]

    text = {}
    bw = flops = None
    if only is None or want("prefill") or want("decode"):
        bw, flops = machine_limits(args.threads)
        print(f"read bandwidth {bw / 1e9:.1f} GB/s; matmul f32 {flops['float32'] / 1e9:.0f} GFLOP/s, "
              f"bf16 {flops['bfloat16'] / 1e9:.0f} GFLOP/s", flush=True)

    if want("prefill"):
        prefill = []
        for size in sizes:
            for dtype in ("float32", "bfloat16"):
                ours = bench_gemmalens(ckpt(size), dtype, lengths, args.threads, repeats)
                hf = bench_hf(ckpt(size), dtype, lengths, args.threads, repeats)
                for T in lengths:
                    prefill.append((size, dtype, T, ours[T], hf[T]))
                    print(f"{size:5s} {dtype:9s} prefill {T:4d}: gemmalens {ours[T]:8.1f} tok/s  HF {hf[T]:8.1f} tok/s  "
                          f"x{ours[T] / hf[T]:.2f}", flush=True)
        t = ("### Prefill (batch 1, last-position logits)\n\n"
             "| model | dtype | tokens | gemmalens tok/s | HF tok/s | ratio | gemmalens GFLOP/s | fraction of the matmul "
             "rate |\n|---|---|---|---|---|---|---|---|\n")
        for size, dtype, T, o, h in prefill:
            gf = o * prefill_flops_per_token(ckpt(size), T)
            t += (f"| {size} | {dtype} | {T} | {o:.1f} | {h:.1f} | **{o / h:.2f}x** | {gf / 1e9:.0f} | "
                  f"{gf / flops[dtype]:.2f} |\n")
        t += ("\nGFLOP/s counts the layers' matmuls and attention (QK^T, PV over the visible keys); the fraction divides "
              "it by the oneDNN matmul rate of the same dtype measured above.\n")
        text["prefill"] = t

    if want("decode"):
        decode = []
        for size in sizes:
            for batch in (1, 8):
                o, h, wbytes = bench_decode(ckpt(size), "bfloat16", batch, 128, 16 if args.quick else 32, args.threads,
                                            repeats)
                bound = bw / wbytes * batch  # every step reads all weights once
                decode.append((size, "bfloat16", batch, o, h, o / bound))
                print(f"{size:5s} bf16 decode batch {batch}: gemmalens {o:7.1f} tok/s  HF {h:7.1f} tok/s  x{o / h:.2f}  "
                      f"{o / bound:.2f} of the bandwidth bound", flush=True)
        t = ("### Decode (context 128, greedy; tok/s over all sequences)\n\n"
             "| model | dtype | batch | gemmalens tok/s | HF generate tok/s | ratio | fraction of bandwidth bound |\n"
             "|---|---|---|---|---|---|---|\n")
        for size, dtype, batch, o, h, frac in decode:
            t += f"| {size} | {dtype} | {batch} | {o:.1f} | {h:.1f} | **{o / h:.2f}x** | {frac:.2f} |\n"
        t += ("\nThe bandwidth bound is `bandwidth / bytes of weights read per step` (the tied 262144-row embedding is "
              "read for the LM head every step).\n")
        text["decode"] = t

    if want("hooks"):
        plain, resid, every, tl_time = bench_hooks(ckpt("270m"), args.threads, repeats)
        import gemmalens as gl

        n_hooks = len(gl._core.hook_names(18))  # the 270m's 18 layers
        print(f"hooks: plain {plain * 1e3:.0f} ms, cache resid_post {resid * 1e3:.0f} ms, cache all {every * 1e3:.0f} ms, "
              f"TL {tl_time * 1e3 if tl_time else float('nan'):.0f} ms", flush=True)
        t = ("### Hooks (270m, float32, 256 tokens, all-position logits)\n\n"
             "| run | ms | vs plain forward |\n|---|---|---|\n"
             f"| plain forward | {plain * 1e3:.0f} | 1.00 |\n"
             f"| run_with_cache, all 18 hook_resid_post | {resid * 1e3:.0f} | {resid / plain:.2f} |\n"
             f"| run_with_cache, every hook ({n_hooks}) | {every * 1e3:.0f} | {every / plain:.2f} |\n")
        if tl_time:
            t += (f"| TransformerLens run_with_cache, every hook | {tl_time * 1e3:.0f} | {tl_time / plain:.2f} |\n\n"
                  f"TransformerLens time / gemmalens time for `run_with_cache` of every hook: **{tl_time / every:.2f}**.\n")
        text["hooks"] = t

    if want("grad"):
        grad_rows, mem_rows = [], []
        for size in grad_sizes:
            for dtype in ("float32", "bfloat16"):
                row = bench_grad(ckpt(size), dtype, args.threads, repeats)
                p_, g_, t_, diff, err = row
                grad_rows.append((size, dtype, grad_flop_ratio(ckpt(size), 256)) + row)
                print(f"{size} {dtype} gradient run: plain {p_ * 1e3:.0f} ms, forward + reverse {g_ * 1e3:.0f} ms "
                      f"(x{g_ / p_:.2f}), TL {t_ * 1e3 if t_ else float('nan'):.0f} ms"
                      + (f" (x{t_ / g_:.2f}; gradients differ by {diff:.1e})" if t_ else ""), flush=True)
        for size in grad_sizes:
            for dtype in ("float32", "bfloat16"):
                mem = []
                for engine in ("gemmalens", "transformer_lens"):
                    try:
                        mem.append(grad_rss(engine, ckpt(size), dtype, args.threads))
                    except Exception as e:  # the cells say "-"; the reason is printed
                        print(f"{size} {dtype} {engine} gradient-run memory failed: {e}", flush=True)
                        mem.append(None)
                mem_rows.append((size, dtype) + tuple(mem))
                print(f"{size} {dtype} gradient-run memory: "
                      + ", ".join(f"{eng} after load {_mb(r['loaded'])} MB, peak {_mb(r['peak'])} MB"
                                  for eng, r in zip(("gemmalens", "TL"), mem) if r), flush=True)
        text["grad"] = grad_section(grad_rows, mem_rows)

    if want("llama"):
        llama_rows = []
        from gemmalens.formats import _resolve_demo
        from make_models import write_bf16_gguf

        gguf_models = [("270m Q4_K_M (real)", _resolve_demo("gemma3-270m"))]
        if "1b" in sizes:
            g1b = os.path.join(WORK, "random-1b-bf16.gguf")
            if not os.path.exists(g1b):
                write_bf16_gguf(ckpt("1b"), g1b)
            gguf_models.append(("1b BF16 (random)", g1b))
        thread_counts = [args.threads] + ([1] if args.threads != 1 else [])
        for label, gpath in gguf_models:
            for th in thread_counts:
                last = None
                for dtype, weights in (("bfloat16", "native"), ("bfloat16", "int8"), ("bfloat16", "int4")):
                    r = bench_llama_cpp(gpath, dtype, th, repeats, weights=weights, with_llama=last is None)
                    if last is None:
                        last = r
                    else:
                        r = r[:2] + last[2:]  # the same llama.cpp run
                    tag = "bf16" if weights == "native" else f"{weights} (bf16 compute)"
                    llama_rows.append((label, th, tag) + r)
                    print(f"{label} {th} threads gemmalens({dtype}) prefill {r[0]:.1f} decode {r[1]:.1f} | llama.cpp "
                          f"prefill {r[2] or float('nan'):.1f} decode {r[3] or float('nan'):.1f}", flush=True)
        t = ("### Against llama.cpp on the same GGUF file (llama-cpp-python; prefill 512 tokens, decode at context 128, "
             "batch 1)\n\n| file | threads | gemmalens weights | gemmalens prefill | llama.cpp prefill | ratio | gemmalens "
             "decode | llama.cpp decode | ratio |\n|---|---|---|---|---|---|---|---|---|\n")
        for label, th, dtype, po, do, pt, dt in llama_rows:
            if pt:
                t += (f"| {label} | {th} | {dtype} | {po:.1f} | {pt:.1f} | **{po / pt:.2f}x** | {do:.1f} | {dt:.1f} | "
                      f"**{do / dt:.2f}x** |\n")
        t += ("\nbf16 rows: gemmalens dequantises the GGUF at load to bf16; llama.cpp computes on the file's own blocks "
              "(Q4_K/Q5_0/Q8_0/Q6_K: ~3-4x fewer bytes per decoded token). int8 rows: gemmalens re-quantises the weights "
              "at load to int8 blocks of 32 (`weights=\"int8\"`), int4 rows to 4-bit layer blocks with an int8 LM head "
              "(`weights=\"int4\"`, accuracy in the top-level README), both with `dtype=\"bfloat16\"` (the CLI's fast "
              "mode); prefill and decode multiply them with activations quantised to int8 blocks (VNNI, or `vpmaddubsw` "
              "on AVX2; the CPU-class table below runs each class). On the BF16 file both are lossier than llama.cpp's "
              "BF16 arithmetic, so those rows compare speed at different precision.\n")
        text["llama"] = t

    if want("scaling"):
        extra = []
        for size in sizes:
            d128 = decode_only(ckpt(size), "bfloat16", 128, args.threads)
            d4k = decode_only(ckpt(size), "bfloat16", 4096, args.threads)
            t1 = decode_only(ckpt(size), "bfloat16", 128, 1)
            i8 = decode_only(ckpt(size), "float32", 128, args.threads, weights="int8")
            i4 = decode_only(ckpt(size), "float32", 128, args.threads, weights="int4")
            r = rss_and_load(ckpt(size), "bfloat16")
            extra.append((size, d128, d4k, t1, i8, i4, r))
            print(f"{size}: decode bf16 ctx128 {d128:.1f}, ctx4096 {d4k:.1f}, 1 thread {t1:.1f}, int8 {i8:.1f}, "
                  f"int4 {i4:.1f} tok/s; rss {r['rss'] / 1e6:.0f} MB vs weights+cache "
                  f"{(r['weights'] + r['cache']) / 1e6:.0f} MB; load {r['load_s']:.2f} s", flush=True)
        t = ("### Decode scaling, threads, memory (gemmalens, batch 1)\n\n| model | bf16 ctx 128 | bf16 ctx 4096 | "
             "4096 / 128 | bf16 1 thread | int8 weights (f32 compute) | int4 weights (f32 compute) | "
             "peak RSS / (weights + cache) | load (warm) |\n|---|---|---|---|---|---|---|---|---|\n")
        for size, d128, d4k, t1, i8, i4, r in extra:
            t += (f"| {size} | {d128:.1f} | {d4k:.1f} | {d4k / d128:.2f} | {t1:.1f} | {i8:.1f} | {i4:.1f} | "
                  f"{r['rss'] / (r['weights'] + r['cache']):.2f} ({r['rss'] / 1e6:.0f} MB) | {r['load_s']:.2f} s |\n")
        t += ("\nPeak RSS includes the Python interpreter, numpy and the extension; the process prefills 512 tokens and "
              "decodes 16 with a 1024-position bf16 cache.\n")
        text["scaling"] = t

    if want("sae"):
        sae_rows = []
        for size in sizes:
            p_, s_ = bench_sae(ckpt(size), args.threads, repeats)
            sae_rows.append((size, p_, s_))
            print(f"{size} SAE 16k splice: plain {p_ * 1e3:.0f} ms, with SAE {s_ * 1e3:.0f} ms "
                  f"(+{(s_ / p_ - 1) * 100:.1f}%)", flush=True)
        t = ("### SAE splice (one 16384-wide JumpReLU SAE at the middle layer's hook_resid_post, error term on, 128 "
             "tokens, float32)\n\n| model | plain forward ms | with the SAE ms | cost |\n|---|---|---|---|\n")
        for size, p_, s_ in sae_rows:
            t += f"| {size} | {p_ * 1e3:.0f} | {s_ * 1e3:.0f} | +{(s_ / p_ - 1) * 100:.1f}% |\n"
        text["sae"] = t

    if want("threads"):  # the CLI's default thread count against --threads 1, with busy-loop competitors
        import threads_under_load

        text["threads"] = threads_under_load.section(*threads_under_load.rows(repeats=repeats)).lstrip("\n")

    if want("harvest"):  # gl.harvest local and on Ray beside the loop of SAELens's CacheActivationsRunner
        import harvest_bench

        hv_sizes = args.sizes.split(",") if args.sizes else ["270m", "1b"]
        text["harvest"] = harvest_bench.section(harvest_bench.rows(hv_sizes, threads=args.threads, ckpt=ckpt),
                                                args.threads)

    if want("serve"):  # gemmalens serve beside llama.cpp's server, 1 / 4 / 8 concurrent streaming clients
        import serve_load

        text["serve"] = serve_load.section(*serve_load.rows(threads=args.threads, quick=args.quick))

    if want("isa"):  # gemmalens forced to each CPU class beside llama.cpp, real 270M (bench/isa_bench.py)
        import isa_bench

        builds = dict(a.split("=", 1) for a in args.llama_build)
        text["isa"] = isa_bench.section(isa_bench.rows(args.threads, args.quick, builds), args.threads)

    if want("longctx"):  # prefill and decode to 32k tokens, 5:1 and every layer global, beside llama.cpp and HF
        import longctx_bench

        lc = longctx_bench.rows(args.threads, args.quick, args.sizes.split(",") if args.sizes else None, ckpt,
                                hf_max=args.longctx_hf_max, global_max=args.longctx_global_max)
        print("wrote", longctx_bench.plot(lc), flush=True)
        text["longctx"] = longctx_bench.section(lc)

    command = "python bench/run.py" + (" --quick" if args.quick else "") + (f" --only {','.join(only)}" if only else "")
    command += "".join(f" --llama-build {b}" for b in args.llama_build)
    command += f" --longctx-hf-max {args.longctx_hf_max}" if args.longctx_hf_max else ""
    command += f" --longctx-global-max {args.longctx_global_max}" if args.longctx_global_max else ""
    from gemmalens._cpu import cpu_name

    measured = (f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, {args.threads} threads "
                f"({os.cpu_count()} cores visible); gemmalens {gemmalens.__version__} (oneDNN "
                f"{gemmalens._core.dnnl_version()}), transformers {transformers.__version__}, torch {torch.__version__}, "
                f"transformer_lens {_tl_version()}. Command: `{command}`. Random weights of the real shapes, except where a table names the real 270M GGUF.\n\n")
    head = None
    machine = "" if bw is None else (
        f"Machine, measured in the same run: streaming read bandwidth **{bw / 1e9:.1f} GB/s**; oneDNN matmul "
        f"512x2048x2048 f32 **{flops['float32'] / 1e9:.0f} GFLOP/s**, bf16 **{flops['bfloat16'] / 1e9:.0f} GFLOP/s**.\n\n")
    if only is None:
        head = measured + machine
    else:  # a table measured on its own says when and where, below its title (prefill and decode: with the machine's
        # limits, which their fractions divide by)
        for name in only:
            title, rest = text[name].split("\n\n", 1)
            text[name] = f"{title}\n\n{measured}{machine if name in ('prefill', 'decode') else ''}{rest}"
    print("\n" + (head or "") + "\n".join(text[n] for n in SECTIONS if n in text))
    if not args.no_write:
        write_readme(head, text, only)


if __name__ == "__main__":
    main()
