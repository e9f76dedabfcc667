"""Harvest throughput: gl.harvest (local, and Ray Data with 2 workers x 1 thread) beside the loop SAELens's
CacheActivationsRunner runs, on the same random-weight checkpoint, rows and hooks.

    python bench/harvest_bench.py [--sizes 270m,1b] [--tokens N]     # prints the table

SAELens's runner loads its model by hub name through TransformerLens (it cannot take a local random-weight folder),
so the peer is the loop it runs (sae_lens/cache_activations_runner.py, training/activations_store.py): TransformerLens
`run_with_cache(tokens, names_filter=hooks, stop_at_layer=deepest + 1)` per batch of rows, activations gathered into a
buffer, and each buffer written with `datasets.Dataset.from_dict(..., features=Array2D ...).save_to_disk` (the
runner's `_create_shard`), here over TransformerLens 4's TransformerBridge on the same HF folder (transformers
underneath), in float32. bench/run.py --only harvest calls rows() and section() for its README table.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def hook_sets(n_layers):
    mid = n_layers // 2
    one = [f"blocks.{mid}.hook_resid_post"]
    four = [f"blocks.{mid}.hook_resid_mid", f"blocks.{mid}.hook_attn_out", f"blocks.{mid}.hook_mlp_out",
            f"blocks.{mid}.hook_resid_post"]
    return one, four


def _rows(n_rows, T, vocab, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(3, min(vocab, 50000), (n_rows, T)).astype(np.int32)
    rows[:, 0] = 2  # BOS
    return rows


def gemmalens_local(path, rows, hooks, threads, out):
    import gemmalens as gl

    model = gl.load(path, threads=threads, progress=False)
    gl.harvest(model, rows[:4], hooks, out + "-warm", context_size=rows.shape[1], progress=False)  # warm-up
    t = time.perf_counter()
    r = gl.harvest(model, rows, hooks, out, context_size=rows.shape[1], progress=False, shard_bytes=64 << 20)
    return time.perf_counter() - t, r


def gemmalens_ray(path, rows, hooks, workers, threads_per_worker, out):
    import gemmalens as gl
    import ray

    model = gl.load(path, threads=1, progress=False)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=workers * threads_per_worker, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # the cluster is up before the clock starts, as in use
    try:
        # 8 shards per worker: the pool stays busy to the end while a shard is still minutes of work at scale
        row_bytes = rows.shape[1] * (sum(_widths(model, hooks)) * 4 + 4)
        shard = max(row_bytes, len(rows) * row_bytes // (8 * workers))
        t = time.perf_counter()
        r = gl.harvest(model, rows, hooks, out, context_size=rows.shape[1], progress=False, engine="ray",
                       num_workers=workers, threads_per_worker=threads_per_worker, shard_bytes=shard)
        return time.perf_counter() - t, r
    finally:
        ray.shutdown()


def _widths(model, hooks):
    d = model.config.hidden_size
    return [d for _ in hooks]


def saelens_loop(path, rows, hooks, threads, out, batch=16):
    """The loop of SAELens's CacheActivationsRunner over TransformerLens (see the module docstring)."""
    import datasets
    import torch
    from run import tl_bridge

    bridge = tl_bridge(path, threads)
    T = rows.shape[1]
    stop = max(int(h.split(".")[1]) for h in hooks) + 1
    d = bridge.cfg.d_model
    feats = datasets.Features({**{h: datasets.Array2D((T, d), "float32") for h in hooks},
                               "token_ids": datasets.Sequence(datasets.Value("int32"), length=T)})
    with torch.no_grad():
        bridge.run_with_cache(torch.as_tensor(rows[:2], dtype=torch.long), names_filter=hooks, stop_at_layer=stop)
    t = time.perf_counter()
    buf = {h: [] for h in hooks}
    with torch.no_grad():
        for s in range(0, len(rows), batch):
            tok = torch.as_tensor(rows[s:s + batch], dtype=torch.long)
            _, cache = bridge.run_with_cache(tok, names_filter=hooks, stop_at_layer=stop)
            for h in hooks:
                buf[h].append(cache[h].float().numpy())
    data = {h: np.concatenate(v) for h, v in buf.items()}
    data["token_ids"] = rows
    datasets.Dataset.from_dict(data, features=feats).save_to_disk(os.path.join(out, "shard_00000"), num_shards=1)
    return time.perf_counter() - t, data


def rows(sizes=("270m", "1b"), tokens=None, threads=2, ckpt=None):
    """[(size, n hooks, local tok/s, ray tok/s, saelens-loop tok/s, max |diff| gemmalens vs TL)]"""
    import gemmalens as gl

    out = []
    for size in sizes:
        path = ckpt(size)
        cfg = gl.Gemma3Config.from_pretrained(path)
        T = 128
        n_tok = tokens or (65536 if size == "270m" else 16384)  # long enough that a Ray actor's start is amortised
        data = _rows(n_tok // T, T, cfg.vocab_size)
        for hooks in hook_sets(cfg.num_hidden_layers):
            work = tempfile.mkdtemp(prefix="gl-harvest-bench-")
            try:
                t_loc, r = gemmalens_local(path, data, hooks, threads, os.path.join(work, "local"))
                t_ray, _ = gemmalens_ray(path, data, hooks, 2, 1, os.path.join(work, "ray"))
                t_sl, ref = saelens_loop(path, data, hooks, threads, os.path.join(work, "saelens"))
                got = r.load().with_format("numpy")[:]
                diff = max(float(np.abs(got[h] - ref[h]).max() / np.abs(ref[h]).max()) for h in hooks)
                n = data.size
                out.append((size, len(hooks), n / t_loc, n / t_ray, n / t_sl, diff))
                print(f"{size} {len(hooks)} hook(s): gemmalens {n / t_loc:.0f} tok/s, Ray 2x1 {n / t_ray:.0f}, "
                      f"SAELens loop {n / t_sl:.0f}; rel diff {diff:.1e}", flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return out


def section(rows_, threads=2):
    t = ("### Harvest (float32 activations at the middle layer, 128-token rows, SAELens's folder format)\n\n"
         "| model | hooks | gemmalens tok/s | Ray 2 workers x 1 thread tok/s | Ray / local | SAELens runner's loop "
         "tok/s | gemmalens / SAELens | values differ by |\n|---|---|---|---|---|---|---|---|\n")
    for size, k, loc, ray_, sl, diff in rows_:
        t += (f"| {size} | {k} | {loc:.0f} | {ray_:.0f} | **{ray_ / loc:.2f}** | {sl:.0f} | **{loc / sl:.2f}x** | "
              f"{diff:.1e} |\n")
    t += (f"\ngemmalens: `gl.harvest(model, rows, hooks, out, context_size=128)` ({threads} threads; one hook: "
          "`hook_resid_post`; four: `hook_resid_mid`, `hook_attn_out`, `hook_mlp_out`, `hook_resid_post`), the whole "
          "call (its forward stops after the hooked block; Arrow shards written). Ray: the same call with "
          f"`engine=\"ray\", num_workers=2, threads_per_worker=1` on a local Ray started before the clock, including "
          "the actors' start and model load. SAELens's loop: TransformerLens 4 `run_with_cache(..., stop_at_layer=)` "
          "per batch of 16 rows over the TransformerBridge of the same folder, and `datasets` "
          "`Dataset.from_dict(...).save_to_disk`, as `CacheActivationsRunner` does (it cannot load a local random-weight "
          "folder itself). \"Values differ by\": the largest difference between the two's stored activations, relative "
          "to the largest activation.\n")
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="270m,1b")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    from make_models import make

    def ckpt(size):
        p = os.path.join(HERE, "_work", f"random-{size}")
        if not os.path.exists(os.path.join(p, "model.safetensors")):
            make(size, p)
        return p

    print(section(rows(args.sizes.split(","), args.tokens, args.threads, ckpt), args.threads))


if __name__ == "__main__":
    main()
