"""Forward timings of the gemmalens installed in the running Python, as one JSON line: for A/B checks of a change
("speed unchanged"), run it alternately with two installs (e.g. a venv built from the base commit and one from the
change) on the same machine, two or more rounds each.

    python bench/ab_forward.py [model dir]     # default: bench/_work/random-270m (bench/run.py writes it)

Best of 5 (3 for the cache run), 2 threads: last-position prefill at 128 / 512 tokens (float32 and bfloat16), bf16
decode steps at context 128, and run_with_cache of every hook over 256 tokens.
"""
import json
import os
import sys
import time

import numpy as np

import gemmalens as gl

HERE = os.path.dirname(os.path.abspath(__file__))


def best(fn, n=5):
    fn()
    b = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t)
    return b


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "_work", "random-270m")
    out = {}
    for dt in ("float32", "bfloat16"):
        m = gl.load(path, dtype=dt, threads=2)
        V = m.config.vocab_size
        # The core's last-position forward: the call both sides of an A/B have (next_token_logits is newer).
        ids = lambda T: np.ascontiguousarray(np.random.default_rng(0).integers(0, V, (1, T)), dtype=np.int32)  # noqa: E731
        step = lambda toks, cache=None: m._core.forward(toks, None, cache, "last", None)  # noqa: E731
        for T in (128, 512):
            toks = ids(T)
            out[f"{dt} prefill {T} tok/s"] = T / best(lambda: step(toks))
        if dt == "bfloat16":
            def decode():
                cache = m.new_cache(1, 256)
                step(ids(128), cache)
                one = np.array([[5]], np.int32)
                t = time.perf_counter()
                for _ in range(16):
                    step(one, cache)
                return time.perf_counter() - t
            decode()
            out["bf16 decode tok/s"] = 16 / min(decode() for _ in range(3))
        else:
            toks = ids(256)
            out["f32 run_with_cache every hook ms"] = 1e3 * best(lambda: m.run_with_cache(toks), 3)
    print(json.dumps({k: round(v, 1) for k, v in out.items()}))


if __name__ == "__main__":
    main()
