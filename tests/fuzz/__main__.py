"""Command line: python -m tests.fuzz [--minutes N | --seconds S] [--formats a,b] [--seed S] [--save-dir DIR]."""
import os
import sys

# OpenMP must see one thread before gemmalens (and oneDNN) load: children are forked from this process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

if __package__ in (None, ""):  # run as a script (python tests/fuzz): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    __package__ = "tests.fuzz"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from . import engine  # noqa: E402
from .harnesses import FORMATS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--minutes", type=float, help="total wall time, split evenly across the formats")
    ap.add_argument("--seconds", type=float, help="seconds per format (overrides --minutes)")
    ap.add_argument("--formats", default="all", help="comma-separated: " + ",".join(FORMATS))
    ap.add_argument("--seed", type=int, default=None, help="run seed (default: time-based; printed)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel children (default: the cores available)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--save-dir", default=engine.CRASHERS, help="where findings go (default tests/fuzz/crashers)")
    ap.add_argument("--no-save", action="store_true", help="report findings without saving them")
    ap.add_argument("--minimise-seconds", type=float, default=20.0, help="time spent shrinking each new finding")
    ap.add_argument("--json", help="write the per-format results here")
    ap.add_argument("--stats", help="accumulate executions and outcome counts across runs in this JSON file")
    ap.add_argument("--replay", nargs="*", help="run these saved cases (none given: every seed and crasher) once each")
    ap.add_argument("--no-seeds", action="store_true", help="with --replay: skip the seeds")
    ap.add_argument("--extract", nargs=2, metavar=("CASE", "DIR"), help="write a saved case's files into DIR")
    a = ap.parse_args(argv)

    import gemmalens  # noqa: F401  (imported once here; forked children inherit it)
    from gemmalens import formats, sae, tokenizer  # noqa: F401
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except ImportError:
        pass

    seeds = engine.load_seeds()
    if a.extract:
        fmt, base, files = engine.file_to_case(a.extract[0], seeds)
        for n, d in files.items():
            p = os.path.join(a.extract[1], n)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            open(p, "wb").write(d)
        print("%s case (base %s) written to %s: %s" % (fmt, base, a.extract[1], ", ".join(sorted(files))))
        return 0
    if a.replay is not None:
        res = engine.replay(a.replay or None, seeds, a.timeout, include_seeds=not a.no_seeds)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        bad = [k for k, v in res.items() if v["class"] not in ("ok", "expected", "skip")]
        print("%d cases, %d findings" % (len(res), len(bad)))
        return 1 if bad else 0

    fmts = FORMATS if a.formats == "all" else [f.strip() for f in a.formats.split(",") if f.strip()]
    for f in fmts:
        if f not in FORMATS:
            ap.error("unknown format %r (choose from %s)" % (f, ", ".join(FORMATS)))
    if a.seconds is not None:
        per = a.seconds
    elif a.minutes is not None:
        per = a.minutes * 60.0 / len(fmts)
    else:
        per = 30.0
    run_seed = a.seed if a.seed is not None else int(time.time()) % 1000000
    print("gemmalens fuzz: seed %d, %s, %.0f s per format, %s jobs" % (run_seed, ",".join(fmts), per,
                                                                    a.jobs or len(os.sched_getaffinity(0))))
    results = {}
    for f in fmts:
        results[f] = engine.fuzz_format(f, per, seeds, run_seed=run_seed, jobs=a.jobs,
                                        save_dir=None if a.no_save else a.save_dir, timeout=a.timeout,
                                        minimise_s=a.minimise_seconds)
        st = results[f]
        print("%s: %d execs in %.0f s (%.0f/s); %s" % (f, st.execs, st.seconds, st.execs / max(st.seconds, 1e-9),
                                                     engine._summary(st)), flush=True)
    print()
    print(engine.table(results))
    findings = {f: st.unique for f, st in results.items() if st.unique}
    if findings:
        print("\ndistinct findings:")
        for f, u in findings.items():
            for sig, n in sorted(u.items()):
                engine._print("  %-11s %5d x %s" % (f, n, sig))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({f: st.as_dict() for f, st in results.items()}, fh, indent=1)
    if a.stats:
        tot = {}
        if os.path.exists(a.stats):
            tot = json.load(open(a.stats))
        for f, st in results.items():
            t = tot.setdefault(f, {"execs": 0, "seconds": 0.0, "classes": {}})
            t["execs"] += st.execs
            t["seconds"] = round(t["seconds"] + st.seconds, 1)
            for c, n in st.by_class.items():
                t["classes"][c] = t["classes"].get(c, 0) + n
        with open(a.stats, "w") as fh:
            json.dump(tot, fh, indent=1, sort_keys=True)
    return 1 if any(st.by_class[c] for st in results.values() for c in engine.FINDINGS) else 0


if __name__ == "__main__":
    sys.exit(main())
