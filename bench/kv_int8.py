"""The int8 KV cache (new_cache(kv_dtype="int8")) against the model's bf16 cache, on this machine:

1. one decode step's attention over a 262144-slot cache (4 query heads, 1 KV head, head_dim 256: the 270M's global
   layer; `_core._testing.attention_seconds`, bf16 model), the two caches alternated, with the cache bytes read per
   second beside the streaming read bandwidth;
2. the random-weight 270M with a 32k position table (bench/longctx_bench.py's 5:1 variant), int8 weights, bf16
   compute: prefill of 32768 tokens, then decode at 32768 and at 128, alternated in one process (longctx_bench's
   child), once with each cache, ROUNDS times.

    python bench/kv_int8.py [--rounds 2] [--threads N]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def attention(rounds):
    from gemmalens import _core

    t = _core._testing
    past = 262144
    for rnd in range(rounds):
        cells = []
        for kv_int8 in (False, True):
            nbytes = past * (256 + 32 if kv_int8 else 512) * 2  # keys and values
            s = min(t.attention_seconds(1, past, 4, 1, 256, 0, "bfloat16", 10, kv_int8) for _ in range(3))
            cells.append(f"{'int8' if kv_int8 else 'bf16'} cache {s * 1e3:.2f} ms ({nbytes / s / 1e9:.1f} GB/s)")
        bw = t.read_bandwidth(256 << 20, 3) / 1e9
        print(f"attention, round {rnd}: " + ", ".join(cells) + f"; streaming reads {bw:.1f} GB/s", flush=True)


def model(rounds, threads):
    import longctx_bench as lb
    from make_models import make

    def ckpt(size):
        p = os.path.join(lb.WORK, f"random-{size}")
        if not os.path.exists(os.path.join(p, "model.safetensors")):
            make(size, p)
        return p

    ctxs = [128, 32768]
    for rnd in range(rounds):
        for kv in ("model", "int8"):
            out = lb._intkeys(lb._child(sys.executable, lb._OURS, [lb.variant("270m", "5:1", ckpt), "bfloat16", "int8", threads,
                                                        json.dumps(ctxs), json.dumps(ctxs), 16, 1, kv], threads))
            alt = out["alternated"]
            print(f"270m int8 weights, {'bf16' if kv == 'model' else 'int8'} cache, round {rnd}: prefill 32768 "
                  f"{32768 / out['prefill'][32768]:.0f} tok/s; decode alternated ctx 128 {alt['short_tok_s']:.1f}, "
                  f"ctx 32768 {alt['long_tok_s']:.1f} tok/s ({alt['long_tok_s'] / alt['short_tok_s']:.3f}); KV cache "
                  f"{out['kv_bytes'][32768] / 2**20:.0f} MiB; peak RSS {out['peak_rss'] / 1e6:.0f} MB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be >= 1")
    from gemmalens._cpu import cpu_name

    print(f"{cpu_name()}, {args.threads} threads", flush=True)
    attention(3 * args.rounds)
    model(args.rounds, args.threads)


if __name__ == "__main__":
    main()
