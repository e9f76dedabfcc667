"""gemmalens serve beside llama.cpp's server (llama-cpp-python's `llama_cpp.server`) on the same GGUF, driven by the
same streaming clients: total tokens/s with 1, 4 and 8 concurrent clients, and the time to the first token under that
load. Also a section of bench/run.py (`--only serve`).

    python bench/serve_load.py [--quick] [--threads N] [--temperature T] [--requests N] [--servers auto,native,llama]

Each client sends its requests one after another (POST /v1/completions, stream: true, greedy or sampled at
--temperature with seed 1, a different prompt of ~60 tokens each time so that no server reuses a cached prefix) and
times the first non-empty text chunk. Every request
generates exactly max_tokens tokens: gemmalens with its `ignore_eos` extension, llama.cpp with a logit bias of -100 on
the end-of-sequence ids (1, 106). gemmalens runs the CLI's default mode (bfloat16, int8 weights from the Q4_K_M file) and bf16 weights
(--weights native), llama.cpp the file's own blocks. llama_cpp.server runs one request at a time (its lock; `--interrupt_requests False`,
else a new request cuts off the stream in progress); gemmalens decodes up to --max-batch 8 sequences per step.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx

BASE = ("Here is a short story about a lighthouse keeper who finds a message in a bottle on the shore one stormy "
        "night, and what she decides to do about it after reading it twice by candlelight:")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, url, log, timeout=300):
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited ({proc.returncode}); see {log.name}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[2]} did not start in {timeout} s; see {log.name}")
        time.sleep(0.2)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def servers(gguf, threads, log_dir):
    """[(name, start() -> (proc, url), the request fields that make every request run to max_tokens)]."""
    def gemmalens(weights):
        def start():
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            log = open(os.path.join(log_dir, f"gemmalens_serve_{weights}.log"), "w")
            return _start([sys.executable, "-m", "gemmalens", "serve", "--model", gguf, "--threads", str(threads),
                           "--weights", weights, "--max-batch", "8", "--max-seq-len", "1024", "--port", str(port)],
                          url, log), url
        return start

    def llama():
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(os.path.join(log_dir, "llama_cpp_server.log"), "w")
        return _start([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", str(threads),
                       "--n_threads_batch", str(threads), "--n_ctx", "1024", "--interrupt_requests", "False",
                       "--host", "127.0.0.1", "--port", str(port)], url, log), url

    return [("gemmalens serve, int8 weights (default)", gemmalens("auto"), {"ignore_eos": True}),
            ("gemmalens serve, bf16 weights", gemmalens("native"), {"ignore_eos": True}),
            ("llama.cpp server", llama, {"logit_bias": {"1": -100, "106": -100}})]


SERVERS = ("auto", "native", "llama")  # servers()'s entries, in order, as --servers names them


def _one(client, url, k, max_tokens, extra):
    body = {"model": "m", "prompt": f"({k}) {BASE}", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            **extra}
    t0 = time.perf_counter()
    first, text = None, ""
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0].get("text") or ""
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece
    if not text:
        raise RuntimeError(f"{url}: an empty completion")
    return first


def load(url, clients, per_client, max_tokens, extra):
    """clients threads, each sending per_client requests in turn: (total tok/s, median TTFT s, p90 TTFT s)."""
    ttfts, errors = [], []
    counter = iter(range(10 ** 6))
    lock = threading.Lock()

    def client_loop():
        with httpx.Client(timeout=600) as c:
            for _ in range(per_client):
                with lock:
                    k = next(counter)
                try:
                    t = _one(c, url, k, max_tokens, extra)
                except Exception as e:  # reported after the run
                    errors.append(e)
                    return
                with lock:
                    ttfts.append(t)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    ttfts.sort()
    return (clients * per_client * max_tokens / wall, statistics.median(ttfts),
            ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))])


def rows(gguf=None, threads=None, quick=False, log_dir=None, temperature=0.0, per_client=None, which=SERVERS):
    """[(server, clients, tok/s, TTFT median, TTFT p90)] for 1, 4 and 8 clients on each server named in `which`."""
    unknown = set(which) - set(SERVERS)
    if unknown or not which:
        raise ValueError(f"unknown server(s) {sorted(unknown)}: choose one or more of {', '.join(SERVERS)}" if unknown
                         else f"no server to run: choose one or more of {', '.join(SERVERS)}")
    if per_client is not None and per_client < 1:
        raise ValueError(f"requests per client must be at least 1, got {per_client}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if gguf is None:
        from gemmalens.formats import _resolve_demo

        gguf = _resolve_demo("gemma3-270m")
    threads = threads or len(os.sched_getaffinity(0))
    log_dir = log_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "_work")
    os.makedirs(log_dir, exist_ok=True)
    max_tokens = 32 if quick else 64
    per_client = per_client if per_client is not None else (2 if quick else 4)
    sampling = {"temperature": temperature, "seed": 1} if temperature > 0 else {}
    out = []
    for key, (name, start, extra) in zip(SERVERS, servers(gguf, threads, log_dir)):
        if key not in which:
            continue
        extra = {**extra, **sampling}
        proc, url = start()
        try:
            load(url, 1, 1, 8, extra)  # warm-up
            for clients in (1, 4, 8):
                tps, med, p90 = load(url, clients, per_client, max_tokens, extra)
                out.append((name, clients, tps, med, p90))
                print(f"{name}: {clients} clients {tps:.1f} tok/s, TTFT median {med:.3f} s, p90 {p90:.3f} s", flush=True)
        finally:
            _stop(proc)
    return out, dict(threads=threads, per_client=per_client, max_tokens=max_tokens, temperature=temperature)


def section(rows_, info):
    text = ("### Serving: concurrent streaming clients (270m Q4_K_M, the same GGUF for both servers)\n\n"
            "| server | clients | total tok/s | vs 1 client | time to first token, median s | p90 s |\n"
            "|---|---|---|---|---|---|\n")
    one = {name: tps for name, c, tps, _, _ in rows_ if c == 1}
    for name, c, tps, med, p90 in rows_:
        text += f"| {name} | {c} | {tps:.1f} | {tps / one[name]:.2f}x | {med:.3f} | {p90:.3f} |\n"
    how = f"temperature {info['temperature']:g}, seed 1" if info.get("temperature") else "greedy"
    text += (f"\nEach client sends {info['per_client']} requests in turn ({how}, a different ~60-token prompt each, "
             f"{info['max_tokens']} new tokens each, streamed); total tok/s = all new tokens / wall time. "
             f"{info['threads']} threads for each server. gemmalens: `gemmalens serve --max-batch 8` (requests join "
             "the running batch between decode steps) in the CLI's default mode (bfloat16; int8 weights re-quantised "
             "from the Q4_K_M blocks) and with `--weights native` (the blocks dequantised to bf16). Both decode kernels "
             "use each weight vector they load for every row of the step (int8: tiles of 16 weight rows, "
             "csrc/ops/quant.cpp), so a step of a few rows costs little more than reading the weights. llama.cpp: `python -m llama_cpp.server --interrupt_requests False` "
             "(llama-cpp-python; its server runs one request at a time, so more clients wait longer for their first "
             "token). `python bench/serve_load.py` runs this table alone.\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 requests of 32 tokens per client (else 4 of 64)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gguf", default=None, help="default: the demo Gemma 3 270M Q4_K_M")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature, seed 1 (default: greedy)")
    ap.add_argument("--requests", type=int, default=None, help="requests per client (default 4, --quick 2)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help="which servers, comma-separated from: " + ", ".join(SERVERS) + " (default: all)")
    args = ap.parse_args()
    which = [w.strip() for w in args.servers.split(",") if w.strip()]
    r, info = rows(args.gguf, args.threads, args.quick, temperature=args.temperature, per_client=args.requests,
                   which=which)
    print("\n" + section(r, info))


if __name__ == "__main__":
    main()
