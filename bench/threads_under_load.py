"""Decode speed of the CLI at its default thread count against --threads 1, on an idle machine and with busy-loop
competitors (one and two `while True: pass` processes per core): the default must never lose to one thread.

    python bench/threads_under_load.py [--repeats N] [--env VAR=VALUE ...]   # prints the table

--env sets variables for the measured runs only (e.g. GOMP_SPINCOUNT=300000, libgomp's own default, to see the
runtime without gemmalens' waiting policy). bench/run.py calls rows() and section() for its README table.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is"
N_NEW = 24


def _decode_rate(extra_args, env):
    cmd = [sys.executable, "-m", "gemmalens", "generate", "--max-new-tokens", str(N_NEW), "--verbose", *extra_args,
           PROMPT]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    m = re.search(r"decode \d+ pieces in [\d.]+ s \(([\d.]+) tok/s\)", out.stderr)
    if not m:
        raise RuntimeError(f"no decode speed in the CLI's --verbose output:\n{out.stderr[-2000:]}")
    return float(m.group(1))


def rows(repeats=3, weights=("auto",), env=None, loads=(0, 1, 2)):
    """([(weights, busy loops per core, default-threads tok/s, 1-thread tok/s)], the load average before): medians of
    `repeats` runs of the CLI (bf16), default and --threads 1 alternating."""
    ambient = os.getloadavg()[0]
    env = dict(os.environ, **(env or {}))
    ncpu = len(os.sched_getaffinity(0))
    out = []
    for k in loads:
        loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k * ncpu)]
        try:
            time.sleep(0.5)
            for w in weights:
                base = ["--dtype", "bfloat16", "--weights", w]
                d, one = [], []
                for _ in range(repeats):
                    d.append(_decode_rate(base, env))
                    one.append(_decode_rate(base + ["--threads", "1"], env))
                out.append((w, k, statistics.median(d), statistics.median(one)))
                print(f"weights {w}, {k} busy loop(s) per core: default {d} tok/s, --threads 1 {one} tok/s", flush=True)
        finally:
            for p in loops:
                p.kill()
            for p in loops:
                p.wait()
    return out, ambient


def section(table_rows, ambient, env=None):
    spin = (env or {}).get("GOMP_SPINCOUNT", os.environ.get("GOMP_SPINCOUNT"))
    policy = f"GOMP_SPINCOUNT={spin} from the environment" if spin else "gemmalens' default waiting policy"
    text = ("\n### Threads on a busy machine (real 270M, CLI `gemmalens generate --dtype bfloat16 --max-new-tokens "
            f"{N_NEW}`, decode tok/s, median of runs; {policy})\n\n"
            "| weights | busy loops per core | default threads | --threads 1 | default / 1 thread |\n"
            "|---|---|---|---|---|\n")
    for w, k, d, one in table_rows:
        text += f"| {w} | {k} | {d:.1f} | {one:.1f} | **{d / one:.2f}** |\n"
    text += (f"\n{len(os.sched_getaffinity(0))} cores; load average {ambient:.1f} before the runs (other processes). "
             "Competitors are `python -c 'while True: pass'` processes, started before the runs and killed after. "
             "libgomp's own default (workers spin ~300000 times before sleeping) made the default several times slower "
             "than one thread here; gemmalens sets GOMP_SPINCOUNT before libgomp loads (README, \"Threads\").\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--weights", default="auto", help="comma-separated --weights modes (default: auto)")
    ap.add_argument("--loads", default="0,1,2", help="busy loops per core, comma-separated (default: 0,1,2)")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    r, ambient = rows(args.repeats, tuple(args.weights.split(",")), env, tuple(int(x) for x in args.loads.split(",")))
    print(section(r, ambient, env))


if __name__ == "__main__":
    main()
