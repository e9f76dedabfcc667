"""gemmalens benchmark: prefill beside HF transformers on the same weights, in one run.

    python bench/run.py            # full: 270m and 1b shapes, fp32 and bf16, 128 and 512 tokens
    python bench/run.py --quick    # 270m only, fewer repeats

Writes the table to bench/README.md (between the BENCH markers) with the date and machine.
Random-weight checkpoints of the real shapes are generated once under bench/_work/ (git-ignored).
HF transformers (torch 2.13 CPU) runs with its default attention, `logits_to_keep=1` (last-position
logits only, as gemmalens' "last" mode) and the same thread count.
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
        out[T] = T / timeit(lambda: model._core.forward(toks, None, None, "last"), repeats)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-write", action="store_true", help="print the table, do not update bench/README.md")
    args = ap.parse_args()

    from make_models import make

    sizes = ["270m"] if args.quick else ["270m", "1b"]
    lengths = [128, 512]
    repeats = 2 if args.quick else 3
    rows = []
    for size in sizes:
        path = os.path.join(WORK, f"random-{size}")
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            print(f"writing {path} ...", flush=True)
            make(size, path)
        for dtype in ("float32", "bfloat16"):
            ours = bench_gemmalens(path, dtype, lengths, args.threads, repeats)
            hf = bench_hf(path, dtype, lengths, args.threads, repeats)
            for T in lengths:
                rows.append((size, dtype, T, ours[T], hf[T]))
                print(f"{size:5s} {dtype:9s} prefill {T:4d}: gemmalens {ours[T]:8.1f} tok/s  HF {hf[T]:8.1f} tok/s  "
                      f"x{ours[T] / hf[T]:.2f}", flush=True)

    import gemmalens
    import torch
    import transformers

    head = (f"Measured {datetime.date.today().isoformat()} on {cpu_name()}, {args.threads} threads "
            f"({os.cpu_count()} cores visible); gemmalens {gemmalens.__version__} (oneDNN {gemmalens._core.dnnl_version()}), "
            f"transformers {transformers.__version__}, torch {torch.__version__}. Command: `python bench/run.py"
            f"{' --quick' if args.quick else ''}`.\n\n")
    table = ("| model | dtype | prefill tokens | gemmalens tok/s | HF tok/s | ratio |\n"
             "|---|---|---|---|---|---|\n")
    for size, dtype, T, o, h in rows:
        table += f"| {size} (random weights) | {dtype} | {T} | {o:.1f} | {h:.1f} | **{o / h:.2f}x** |\n"
    text = head + table
    print("\n" + text)
    if not args.no_write:
        readme = os.path.join(HERE, "README.md")
        doc = open(readme).read()
        new = re.sub(r"<!-- BENCH START -->.*<!-- BENCH END -->",
                     "<!-- BENCH START -->\n" + text + "<!-- BENCH END -->", doc, flags=re.S)
        open(readme, "w").write(new)


if __name__ == "__main__":
    main()
