"""The fuzzing regression corpus and short fuzzing runs (tests/fuzz; long runs: python -m tests.fuzz --minutes N).

(a) every seed and every saved crasher (tests/fuzz/crashers/<format>/) runs once, alone in a forked child with a
    memory cap and a timeout: it must load or be refused with a documented error (ValueError / CheckpointError,
    OSError, pickle.UnpicklingError) - no other exception type, signal, hang or excess allocation;
(b) each format's harness fuzzes for GEMMALENS_FUZZ_SECONDS (default 15; 0 = the corpus only) and must find
    nothing. GEMMALENS_FUZZ_SEED fixes the run seed (default: time-based, printed on failure).

The fuzzer runs in a subprocess: it forks, so it must not inherit pytest's threads (torch's pool, OpenMP)."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FUZZ = os.path.join(HERE, "fuzz")
SECONDS = float(os.environ.get("GEMMALENS_FUZZ_SECONDS", "15"))
FORMATS = ["gguf", "safetensors", "config", "ckpt", "orbax", "sae", "tokenizer"]
SEED_IDS = ["gguf/f32", "gguf/q8_0", "gguf/f16", "safetensors/f32", "safetensors/bf16", "safetensors/f16",
            "safetensors/sharded", "safetensors/multimodal", "config/v5", "config/v4", "config/multimodal", "ckpt/torch", "ckpt/f32",
            "ckpt/bf16", "ckpt/views", "orbax/real", "orbax/meta", "sae/scope", "sae/scope_transcoder", "sae/saelens",
            "sae/saelens_topk", "tokenizer/meta", "tokenizer/gguf"]


def _crashers():
    return sorted(p for p in glob.glob(os.path.join(FUZZ, "crashers", "*", "*")) if not p.endswith(".txt"))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _fuzz(args, tmp, timeout):
    out = os.path.join(tmp, "result.json")
    r = subprocess.run([sys.executable, "-m", "tests.fuzz", *args, "--json", out], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    if not os.path.exists(out):
        raise AssertionError("the fuzzer did not finish (exit %d):\n%s\n%s" % (r.returncode, r.stdout[-4000:], r.stderr[-4000:]))
    with open(out) as f:
        return json.load(f), r


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    res, _ = _fuzz(["--replay"], str(tmp_path_factory.mktemp("replay")), timeout=900)
    return res


def _describe(path):
    txt = os.path.splitext(path)[0] + ".txt"
    return open(txt, encoding="utf-8").read().strip() if os.path.exists(txt) else "(no description)"


@pytest.mark.parametrize("seed_id", SEED_IDS)
def test_seed_loads(replayed, seed_id):
    key = "seed:" + seed_id
    if key not in replayed:
        pytest.skip("seed %s was not generated here (its writer, e.g. orbax-checkpoint, is not installed)" % seed_id)
    out = replayed[key]
    assert out["class"] in ("ok", "expected"), out


@pytest.mark.parametrize("path", _crashers(), ids=lambda p: os.path.relpath(p, os.path.join(FUZZ, "crashers")))
def test_crasher_is_refused_cleanly(replayed, path):
    out = replayed.get(os.path.relpath(path, ROOT))
    assert out is not None, "case not replayed: %s" % path
    if out["class"] == "skip":
        pytest.skip(out["message"])
    assert out["class"] in ("ok", "expected"), "%s %s at %s: %s\nfound as: %s" % (
        out["class"], out["type"], out["where"], out["message"], _describe(path))


@pytest.mark.skipif(SECONDS <= 0, reason="GEMMALENS_FUZZ_SECONDS=0: regression corpus only")
@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_finds_nothing(fmt, tmp_path):
    seed = int(os.environ.get("GEMMALENS_FUZZ_SEED", str(int(time.time()) % 1000000)))
    res, r = _fuzz(["--seconds", str(SECONDS), "--formats", fmt, "--seed", str(seed), "--no-save"], str(tmp_path),
                   timeout=4 * SECONDS + 300)
    st = res[fmt]
    print("%s: %d executions in %.0f s, %s" % (fmt, st["execs"], st["seconds"], st["classes"]))
    assert st["execs"] > 0
    found = {k: v for k, v in st["classes"].items() if k in ("bug", "crash", "hang", "alloc") and v}
    assert not found, ("fuzzing %s (seed %d; reproduce: python -m tests.fuzz --formats %s --seed %d --seconds %g) found %s:\n"
                       "%s\n%s" % (fmt, seed, fmt, seed, SECONDS, found, json.dumps(st["unique_findings"], indent=1),
                                   r.stdout[-3000:]))
