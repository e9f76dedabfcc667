"""Time one decode step (one new token per row against a KV cache) for batches of rows: what `gemmalens serve` runs
per step with that many streaming clients. Per weight mode, the median step time of many steps, and the rows' total
tokens per second against one row's.

    python bench/decode_batch.py bench/_work/random-270m --weights int8 int4 native --rows 1 2 4 8 --steps 40

Each step appends one token per row to a cache that holds a prompt of --prompt tokens, then is truncated back, so
every step sees the same cache length. --repeat passes go over the row counts in turn, so a busy spell on a shared
machine spreads over all of them; the last column is the rows' tokens/s over one row's.
"""
import argparse
import statistics
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a model path gl.load takes (HF directory, GGUF, ...)")
    ap.add_argument("--weights", nargs="+", default=["int8", "int4", "native"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per row count (median reported)")
    ap.add_argument("--prompt", type=int, default=64, help="cached positions before each step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="passes over the row counts (medians over all passes)")
    args = ap.parse_args()

    import gemmalens as gl

    print(f"cpu class: {gl.cpu_info()['class']}, threads {args.threads}")
    for weights in args.weights:
        model = gl.load(args.model, dtype=args.dtype, weights=weights, threads=args.threads)
        core = model._core
        V = model.config.vocab_size
        rng = np.random.default_rng(0)
        caches = {}
        for B in args.rows:
            c = core.new_cache(B, args.prompt + 2)
            core.forward(rng.integers(3, V, (B, args.prompt)).astype(np.int32), None, c, "none", None)
            caches[B] = c
        times = {B: [] for B in args.rows}
        for _ in range(args.repeat):
            for B in args.rows:
                c = caches[B]
                tok = rng.integers(3, V, (B, 1)).astype(np.int32)
                for s in range(args.steps + 2):
                    t0 = time.perf_counter()
                    core.forward(tok, None, c, "last", None)
                    dt = time.perf_counter() - t0
                    c.truncate(args.prompt)
                    if s >= 2:  # warm-up steps
                        times[B].append(dt)
        base = None
        for B in args.rows:
            med = statistics.median(times[B])
            tps = B / med
            base = base or tps / B  # one row's tokens/s (from the first row count's step time)
            print(f"{weights:>6} rows {B:2d}: step median {med * 1e3:7.2f} ms (min {min(times[B]) * 1e3:6.2f}, "
                  f"p90 {np.percentile(times[B], 90) * 1e3:6.2f})  {tps:7.1f} tok/s  {tps / base:5.2f}x", flush=True)
        del model, core, caches


if __name__ == "__main__":
    main()
