"""Real sizes within memory: load time, load throughput, peak RSS against the final weights, prefill and decode, per
model size and weight mode, on random weights of the real shapes (bf16 HF safetensors written once by make_models).

    python bench/sizes.py --sizes 4b,12b,27b [--modes 4b=bfloat16:native,bfloat16:int8 ...] [--keep] [--again]

Disk for the bf16 checkpoints (bench/_work/random-SIZE, git-ignored): 270m 0.5 GB, 1b 2.0 GB, 4b 7.8 GB, 12b 23.5 GB,
27b 54.0 GB; without --keep each is deleted after its rows (so 27b needs 54 GB free, not 85). Each row runs in a fresh
process: gl.load (its wall time; the file is read from the page cache when it fits there, else from disk), then a
128-token prefill and 16 decode steps. Peak RSS is the process's VmHWM after the load, minus its RSS before it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

DEFAULT_MODES = {"270m": ["bfloat16:native", "bfloat16:int8"], "1b": ["bfloat16:native", "bfloat16:int8"],
                 "4b": ["bfloat16:native", "bfloat16:int8", "bfloat16:int4"], "12b": ["bfloat16:int8", "bfloat16:int4"],
                 "27b": ["bfloat16:int4"]}

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import gemmalens as gl
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    path, dtype, weights = sys.argv[1:4]
    base = status("VmRSS:")
    t = time.perf_counter()
    m = gl.load(path, dtype=dtype, weights=weights, progress=False, max_seq_len=1024)
    load_s = time.perf_counter() - t
    hwm = status("VmHWM:")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 50000, 128).astype(np.int32)
    ids[0] = 2
    m.forward(ids[:8], return_type=None)  # warm-up
    t = time.perf_counter()
    cache = m.new_cache(1, 256)
    logits = m.next_token_logits(ids, cache=cache)
    prefill = 128 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(16):
        logits = m.next_token_logits(np.array([[int(np.argmax(logits[0]))]], np.int32), cache=cache)
    decode = 16 / (time.perf_counter() - t)
    r = dict(load_s=load_s, base=base, hwm=hwm, weights=m.weight_nbytes, mode=m.weights, prefill=prefill, decode=decode)
    if sys.argv[4] == "again":  # a second load into memory the first one touched (freed, still backed by the host)
        del m, cache, logits
        t = time.perf_counter()
        m = gl.load(path, dtype=dtype, weights=weights, progress=False, max_seq_len=1024)
        r["again_s"] = time.perf_counter() - t
    print(json.dumps(r))
""")

FAULT_IN = textwrap.dedent("""
    import sys, time
    import numpy as np
    n = int(sys.argv[1])
    t = time.perf_counter()
    a = np.empty(n, np.uint8)
    a[::4096] = 1  # one write per page: the kernel's page faults and zeroing, nothing else
    print(n / (time.perf_counter() - t) / 1e9)
""")


def fault_in_rate(nbytes):
    """GB/s at which a fresh process gets new memory (first touch of each page). On a VM whose host backs guest
    memory lazily this, not the load's own work, can bound a load, which writes its weights into new memory."""
    out = subprocess.run([sys.executable, "-c", FAULT_IN, str(int(nbytes))], capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


def measure(path, dtype, weights, threads=None, again=False):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", CHILD, path, dtype, weights, "again" if again else "once"],
                         capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit %d" % out.returncode])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows(sizes, modes=None, keep=False, again=False):
    from make_models import make

    out = []
    for size in sizes:
        path = os.path.join(HERE, "_work", f"random-{size}")
        made = not os.path.exists(os.path.join(path, "model.safetensors"))
        if made:
            print(f"writing {path} ...", flush=True)
            make(size, path)
        file_bytes = os.path.getsize(os.path.join(path, "model.safetensors"))
        try:
            for mode in (modes or {}).get(size, DEFAULT_MODES[size]):
                dtype, weights = mode.split(":")
                fresh = fault_in_rate(min(file_bytes, 8e9))  # just before the row: the host's state then
                r = measure(path, dtype, weights, again=again)
                r.update(size=size, dtype=dtype, req=weights, file=file_bytes, fault_in=fresh)
                print(json.dumps(r), flush=True)
                out.append(r)
        finally:
            if made and not keep and size not in ("270m", "1b"):
                shutil.rmtree(path, ignore_errors=True)
    return out


def section(rows_):
    t = ("### Real sizes within memory (random weights of the real shapes, bf16 safetensors in)\n\n"
         "| model | file GB | dtype | weights | weights GB | load s | GB/s of checkpoint | again: load s, GB/s | "
         "new memory GB/s | peak RSS / weights | prefill 128 tok/s | decode tok/s |\n"
         "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows_:
        if "error" in r:
            t += (f"| {r['size']} | {r['file'] / 1e9:.1f} | {r['dtype']} | {r['req']} | - | - | - | - | - | - | - | "
                  f"{r['error']} |\n")
            continue
        grew = r["hwm"] - r["base"]
        t += (f"| {r['size']} | {r['file'] / 1e9:.1f} | {r['dtype']} | {r['mode']} | {r['weights'] / 1e9:.2f} | "
              f"{r['load_s']:.1f} | {r['file'] / 1e9 / r['load_s']:.2f} | "
              + (f"{r['again_s']:.1f}, {r['file'] / 1e9 / r['again_s']:.2f}" if "again_s" in r else "-")
              + f" | {r['fault_in']:.2f} | **{grew / r['weights']:.2f}** | "
              f"{r['prefill']:.1f} | {r['decode']:.2f} |\n")
    t += ("\nOne fresh process per row (`python bench/sizes.py`): `gl.load(path, dtype, weights)`, then a 128-token "
          "prefill and 16 greedy decode steps with a 256-position cache. Peak RSS / weights: the load's VmHWM above the "
          "process's RSS before it, over the weights it ends with (the tensors are converted one at a time and the "
          "file's pages dropped). Again: a second `gl.load` in the same process after the first model is freed "
          "(`--again`), into memory the first load had touched. New memory GB/s: a fresh process touching one byte per "
          "page of min(file, 8 GB) just before the row, the rate at which this machine hands out new memory; every "
          "load writes its weights into new memory, so this bounds a first load.\n")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4b,12b,27b")
    ap.add_argument("--modes", nargs="*", default=None, help="SIZE=DTYPE:WEIGHTS,... (default: per size)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--again", action="store_true", help="time a second load in each row's process")
    args = ap.parse_args()
    modes = None
    if args.modes:
        modes = {k: v.split(",") for k, v in (m.split("=", 1) for m in args.modes)}
    print(section(rows(args.sizes.split(","), modes, args.keep, args.again)))


if __name__ == "__main__":
    main()
