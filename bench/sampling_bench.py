"""Generation with sampling on the real 270M GGUF: gemmalens `generate` beside llama.cpp (llama-cpp-python) with the same
sampling settings, and the time of one draw from a 262144-id row (gemmalens's sampler against the same filters written
directly in numpy, the way gemmalens sampled before 2026-11-28: one fresh float64 array per step, a stable argsort of
the whole row for top-p, numpy's Generator.choice).

    python bench/sampling_bench.py [--threads N] [--new 200] [--repeats 3]   # prints a Markdown table

Both engines decode `--new` tokens after the same short prompt with the same settings (end of text ignored), the best
of `--repeats` runs; tok/s counts the new tokens over the whole call (prompt, decode, sampling, detokenising).
gemmalens: `weights="int8"`, `dtype="bfloat16"` (the CLI's default mode) and bf16 weights; llama.cpp computes on the
file's own Q4_K/Q8_0 blocks.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SETTINGS = (  # (label, gemmalens kwargs); llama.cpp gets the same values (top_k 0 = off there, min_p 0 = off)
    ("greedy", dict(temperature=0.0)),
    ("temperature 1", dict(temperature=1.0)),
    ("top-k 64, top-p 0.95 (Gemma 3's)", dict(temperature=1.0, top_k=64, top_p=0.95)),
    ("top-p 0.9", dict(temperature=1.0, top_p=0.9)),
    ("min-p 0.05", dict(temperature=1.0, min_p=0.05)),
)
PROMPT = "The history of the printing press"

_LLAMA = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n_new, repeats, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
settings = json.loads(sys.argv[6])
llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
out = {}
for label, kw in settings:
    args = dict(temperature=kw.get("temperature", 0.0), top_k=kw.get("top_k") or 0, top_p=kw.get("top_p") or 1.0,
                min_p=kw.get("min_p") or 0.0, repeat_penalty=1.0, seed=0)
    best = None
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        r = llm.create_completion(prompt, max_tokens=n_new, logit_bias={1: -1e9, 106: -1e9}, **args)  # EOS off
        dt = time.perf_counter() - t0
        n = r["usage"]["completion_tokens"]
        best = max(best or 0, n / dt)
    out[label] = best
print(json.dumps(out))
"""


def _plain_probs():
    """tests/sampling_reference.py: the filters written directly (gemmalens before 2026-11-28)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from sampling_reference import plain_probs

    return plain_probs


def plain_sample(rng, logits, temperature, top_k=None, top_p=None, min_p=None, plain_probs=None):
    """A draw through the direct filters (plain_probs) and numpy's Generator.choice."""
    plain_probs = plain_probs or _plain_probs()
    if temperature == 0:
        return int(np.argmax(np.asarray(logits, dtype=np.float64)))
    return int(rng.choice(len(logits), p=plain_probs(temperature, top_k, top_p, min_p, None, logits, None)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--new", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import gemmalens as gl
    from gemmalens.formats import _resolve_demo
    from gemmalens.sampling import SamplingParams

    path = _resolve_demo("gemma3-270m")
    plain = _plain_probs()
    rows = {}
    for mode, kw in (("int8", dict(dtype="bfloat16", weights="int8")), ("bf16", dict(dtype="bfloat16"))):
        m = gl.load(path, threads=args.threads, progress=False, **kw)
        logits = m.next_token_logits(m.to_tokens(PROMPT))[0]  # a real row for the sampler timings
        for label, s in SETTINGS:
            m.generate(PROMPT, max_new_tokens=8, ignore_eos=True, seed=0, **s)
            best = 0.0
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = m.generate(m.to_tokens(PROMPT), max_new_tokens=args.new, ignore_eos=True, seed=0, **s)
                best = max(best, np.asarray(out).size / (time.perf_counter() - t0))
            rows.setdefault(label, {})[mode] = best
            if mode == "int8":
                sp, rng = SamplingParams(seed=0, **s), np.random.default_rng(0)
                for name, f in (("ours", lambda: sp.sample(logits)),
                                ("plain", lambda: plain_sample(rng, logits, plain_probs=plain, **s))):
                    f()
                    t0 = time.perf_counter()
                    for _ in range(20):
                        f()
                    rows[label][name] = (time.perf_counter() - t0) / 20 * 1e3
        del m
    res = subprocess.run([sys.executable, "-c", _LLAMA, path, str(args.threads), str(args.new), str(args.repeats), PROMPT,
                          json.dumps(SETTINGS)], capture_output=True, text=True, timeout=3600)
    theirs = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
    if res.returncode != 0:
        print(f"llama.cpp failed (exit {res.returncode}): {res.stderr.strip()[-300:]}", file=sys.stderr)
    print(f"real 270M Q4_K_M GGUF, {args.threads} threads, {args.new} new tokens, best of {args.repeats}; "
          f"{gl.cpu_info()['class']} class\n")
    print("| sampling | gemmalens int8 tok/s | gemmalens bf16 tok/s | llama.cpp tok/s | int8 / llama.cpp | "
          "one draw, gemmalens ms | one draw, plain numpy ms |\n|---|---|---|---|---|---|---|")
    for label, _ in SETTINGS:
        r, t = rows[label], theirs.get(label)
        ratio = f"**{r['int8'] / t:.2f}x**" if t else "-"
        print(f"| {label} | {r['int8']:.1f} | {r['bf16']:.1f} | {t:.1f} | {ratio} | {r['ours']:.2f} | {r['plain']:.2f} |"
              if t else f"| {label} | {r['int8']:.1f} | {r['bf16']:.1f} | - | - | {r['ours']:.2f} | {r['plain']:.2f} |")


if __name__ == "__main__":
    main()
