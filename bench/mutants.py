#!/usr/bin/env python3
"""Mutation testing: does the test suite notice a one-line numeric mistake? (Not run in CI.)

Each mutant below changes one spot of csrc/ or python/gemmalens/ (an eps dropped, a window off by one, a GGUF key
ignored, a VJP term lost, a sampling filter off by one ...). For each one the script applies the change to a scratch
checkout of HEAD, rebuilds the extension incrementally, runs a fast selection of the tests with `pytest -x` and
records the first test that fails: the mutant is *killed* by it. A mutant no test notices *survives* (a gap in the
tests, or an equivalent mutant that belongs off the list). Every mutant should be killed.

    python bench/mutants.py --check                # every entry's original text occurs exactly once at HEAD (no build)
    python bench/mutants.py --list                 # ids, files, descriptions
    python bench/mutants.py                        # the whole list: a Markdown table, also written to --report
    python bench/mutants.py --only window_off_by_one,py_top_k_drops_kth --keep-tree

Run it with the Python of an environment that has the package's test extra (torch, transformers, pytest, gguf,
...) and its build requirements (scikit-build-core, pybind11, oneDNN devel, nlohmann-json, cmake, ninja). The
script makes its own venv (--venv, default build/mutants/venv) on top of that environment's site-packages (a .pth
file), so the mutated builds never replace the gemmalens installed there, and a detached git worktree of HEAD
(--tree, default build/mutants/tree; only committed code is mutated). Each mutant is built with
`pip install --no-build-isolation --no-deps -C build-dir=build/mut .` from the scratch tree (ninja recompiles the
touched file; link-time optimisation is off unless --lto, so the relink takes seconds), then tested with
`python -m pytest -x -q -p no:cacheprovider <selection>`, the mutant's own test file (if it names one) moved to the
front. The file is restored after every mutant, whatever happened. A clean build first runs the whole selection
once (the baseline: it must pass, else every mutant would look killed). The scratch tree is removed at the end
unless --keep-tree (keep it for an incremental rerun: the first build of a fresh tree compiles everything).

Results: killed (by the named test), survived, build failed, timeout, stale (the original text no longer occurs
exactly once: the code moved on, update the entry). The exit status is nonzero unless every mutant was killed.
Logs per mutant go to build/mutants/logs/. --extra FILE adds ad-hoc mutants from a JSON list of
{id, desc, file, original, replacement} (try one before adding it to the list).

Time, measured 2026-11-26 on 2 shared cores (AMD EPYC, load 4-5): the first build of a fresh tree 109 s, the
baseline run of the selection 65 s (332 tests), then per mutant 10-25 s (an incremental build of one .cpp file and
the tests up to the killing one; a header such as ops/attention.h recompiles several files, ~1 min). The whole list
(46 mutants): about 20-30 minutes on 2 cores, under an hour on a loaded machine; a surviving mutant costs the whole
selection (~1-2 min).
"""
import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    desc: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    front: str = ""  # a test file run first for this mutant (where it is expected to die), then the selection


M = Mutant
MUTANTS = [
    # ---- csrc/ops: kernels ----
    M("rmsnorm_eps_dropped", "RMSNorm without eps in the mean square", "csrc/ops/kernels.cpp",
      "return std::sqrt(ss / static_cast<float>(D) + eps);", "return std::sqrt(ss / static_cast<float>(D));"),
    M("rmsnorm_one_plus_w", "RMSNorm scales by w instead of (1 + w)", "csrc/ops/kernels.cpp",
      "yr[d] = (xr[d] * r) * (1.f + w[d]);", "yr[d] = (xr[d] * r) * w[d];"),
    M("rope_rotation_sign", "RoPE: second half rotated with the wrong sign of sin", "csrc/ops/kernels.cpp",
      "v[j + half] = b * c[j] + a * sj;", "v[j + half] = b * c[j] - a * sj;"),
    M("rope_scaling_inverted", "linear RoPE scaling multiplies inv_freq instead of dividing", "csrc/ops/kernels.cpp",
      "inv[j] = scaling != 1.0 ? f / static_cast<float>(scaling) : f;",
      "inv[j] = scaling != 1.0 ? f * static_cast<float>(scaling) : f;"),
    M("gelu_cubic_constant", "GELU tanh approximation: cubic coefficient 0.044715 -> 0.035 (AVX-512 kernel)",
      "csrc/ops/kernels.cpp", "k1 = _mm512_set1_ps(0.044715f)", "k1 = _mm512_set1_ps(0.035f)"),
    M("window_off_by_one", "sliding window sees one key too many (i - window instead of i - window + 1)",
      "csrc/ops/attention.h", "lo = std::max<int64_t>(lo, i - a.window + 1);", "lo = std::max<int64_t>(lo, i - a.window);"),
    M("row_start_off_by_one", "left padding: each padded row also sees its last padding key", "csrc/ops/attention.h",
      "std::max<int64_t>(a.row_start[b], 0)", "std::max<int64_t>(a.row_start[b] - 1, 0)"),
    M("gqa_map_shifted", "GQA: query head h reads KV head (h + 1) / group (reference kernel)", "csrc/ops/attention.cpp",
      "const int kvh = h / group;", "const int kvh = (h + 1) / group % a.KV;"),
    M("attn_softcap_skipped", "attention logit soft-capping skipped (the online softmax's rows)", "csrc/ops/vmath.h",
      "s[c] = softcap * tanh_f32(s[c] * scale / softcap);", "s[c] = s[c] * scale;"),
    M("online_softmax_rescale_dropped", "tiled attention: running sum not rescaled when the max grows",
      "csrc/ops/attention_tiled.cpp", "l[r] = l[r] * cr + sum;", "l[r] = l[r] + sum;"),
    M("splitk_merge_rescale_dropped", "split-K decode: chunk sums merged without their exp(m_c - m) weights",
      "csrc/ops/attention_decode.cpp", "l += w * pl[slot];", "l += pl[slot];", front="tests/test_cache.py"),
    M("pattern_not_normalised", "materialised softmax (hook_pattern path) not divided by its sum", "csrc/ops/attention.cpp",
      "for (int64_t j = 0; j < S; ++j) p[j] *= inv;", "for (int64_t j = 0; j < S; ++j) p[j] *= 1.f;",
      front="tests/test_hooks.py"),
    M("bf16_rounding_skipped", "bf16 weights truncated instead of rounded to nearest even (the blocked layout)",
      "csrc/ops/gemv_bf16.cpp", "f32_to_bf16_n(w + n * K, row.data(), K);",
      "for (int64_t k = 0; k < K; ++k) { uint32_t u; std::memcpy(&u, w + n * K + k, 4); row[k] = static_cast<uint16_t>(u >> 16); }"),
    # ---- csrc/model: the forward pass, the KV cache ----
    M("embed_sqrt_d_dropped", "embedding not scaled by sqrt(hidden_size)", "csrc/model/gemma3.cpp",
      "float normalizer = static_cast<float>(std::sqrt(static_cast<double>(D)));", "float normalizer = 1.f;"),
    M("query_scalar_ignored", "scores scaled by head_dim ** -0.5, query_pre_attn_scalar ignored", "csrc/model/gemma3.cpp",
      "at.scale = static_cast<float>(std::pow(c.query_pre_attn_scalar, -0.5));",
      "at.scale = static_cast<float>(std::pow(c.head_dim, -0.5));"),
    M("global_layers_windowed", "full-attention layers get the sliding window too", "csrc/model/gemma3.cpp",
      "at.window = c.is_sliding(l) ? c.sliding_window : 0;", "at.window = c.sliding_window;"),
    M("rope_bases_swapped", "sliding layers' RoPE table built with rope_theta (the global base)", "csrc/model/gemma3.cpp",
      "ops::rope_tables(pos.data(), p.M, c.head_dim, c.rope_local_base_freq, 1.0,",
      "ops::rope_tables(pos.data(), p.M, c.head_dim, c.rope_theta, 1.0,"),
    M("final_softcap_skipped", "final logit soft-capping skipped in the forward", "csrc/model/gemma3.cpp",
      "if (c.final_logit_softcapping > 0) ops::softcap_inplace(a.logits,",
      "if (c.final_logit_softcapping < 0) ops::softcap_inplace(a.logits,"),
    M("residual_add_replaced", "residual add replaced by a copy (x = branch instead of x += branch)", "csrc/model/gemma3.cpp",
      "ops::add_inplace(p.x, p.out, p.M * D);", "std::memcpy(p.x, p.out, sizeof(float) * p.M * D);"),
    M("ring_commit_off_by_one", "KV cache: staged rows committed one ring slot late", "csrc/model/kv_cache.cpp",
      "L.staged, 0, L.staged, seq_len_ + T - L.staged);", "L.staged, 0, L.staged, seq_len_ + T - L.staged + 1);",
      front="tests/test_cache.py"),
    # ---- csrc/model: config.json and GGUF metadata ----
    M("cfg_sliding_window_ignored", "config.json sliding_window ignored (default 4096)", "csrc/model/config.cpp",
      'c.sliding_window = get_num<int>(*j, "sliding_window", 4096);', "c.sliding_window = 4096;"),
    M("cfg_rms_norm_eps_ignored", "config.json rms_norm_eps ignored (default 1e-6)", "csrc/model/config.cpp",
      'c.rms_norm_eps = get_num<double>(*j, "rms_norm_eps", 1e-6);', "c.rms_norm_eps = 1e-6;"),
    M("cfg_rope_theta_swapped", "config.json v5: rope_theta read from the sliding_attention entry", "csrc/model/config.cpp",
      'c.rope_theta = get_num<double>(rp["full_attention"], "rope_theta", 1000000.0);',
      'c.rope_theta = get_num<double>(rp["sliding_attention"], "rope_theta", 1000000.0);'),
    M("cfg_rope_local_base_ignored", "config.json v5: sliding layers' rope_theta ignored (default 1e4)",
      "csrc/model/config.cpp",
      'c.rope_local_base_freq = get_num<double>(rp["sliding_attention"], "rope_theta", 10000.0);',
      "c.rope_local_base_freq = 10000.0;"),
    M("cfg_rope_scaling_ignored", "config.json v5: linear RoPE scaling of full layers ignored", "csrc/model/config.cpp",
      'c.rope_scaling_factor = rope_factor(rp["full_attention"], "rope_parameters.full_attention");',
      "c.rope_scaling_factor = 1.0;"),
    M("layer_types_pattern_shifted", "default layer types: global layer at i % 6 == 0 instead of (i + 1) % 6 == 0",
      "csrc/model/config.cpp", "(pattern > 0 && (i + 1) % pattern == 0)", "(pattern > 0 && i % pattern == 0)"),
    M("gguf_sliding_window_ignored", "GGUF loader ignores gemma3.attention.sliding_window (falls back to 512)",
      "csrc/io/gguf.cpp",
      'c.sliding_window = f.find("gemma3.attention.sliding_window") ? i("attention.sliding_window", 1, kMaxPositions) : 512;',
      "c.sliding_window = 512;", front="tests/test_gguf.py"),
    M("gguf_rope_freq_base_ignored", "GGUF loader ignores gemma3.rope.freq_base (falls back to 1e6)", "csrc/io/gguf.cpp",
      'c.rope_theta = f.find("gemma3.rope.freq_base") ? req("gemma3.rope.freq_base").as_float("rope.freq_base") : 1000000.0;',
      "c.rope_theta = 1000000.0;", front="tests/test_gguf.py"),
    M("gguf_norm_offset_kept", "GGUF norms kept as stored (1 + w): the 1 is not subtracted", "csrc/io/gguf.cpp",
      "for (auto& x : w) x -= 1.f;", "for (auto& x : w) x -= 0.f;", front="tests/test_gguf.py"),
    # ---- the reverse pass: csrc/ops/grad.cpp, csrc/model/gemma3_grad.cpp, hooks.cpp ----
    M("grad_gelu_cubic_term", "GELU VJP: d/dx of the cubic term loses its factor 3", "csrc/ops/grad.cpp",
      "(1.f + 3.f * k1 * x * x)", "(1.f + k1 * x * x)", front="tests/test_grad.py"),
    M("grad_rmsnorm_mean_term", "RMSNorm VJP without the term through the mean square", "csrc/ops/grad.cpp",
      "const float g = r * dy[d] * (1.f + w[d]) - x[d] * c;", "const float g = r * dy[d] * (1.f + w[d]);",
      front="tests/test_grad.py"),
    M("grad_softmax_dot_term", "softmax VJP without the - sum(p * dp) term", "csrc/ops/grad.cpp",
      "ds[j] = p[j] * (dp[j] - static_cast<float>(dot));", "ds[j] = p[j] * dp[j];", front="tests/test_grad.py"),
    M("grad_gqa_dv_not_summed", "attention VJP: dv keeps only the last query head of each KV group", "csrc/ops/grad.cpp",
      "KV * Hd, h % group != 0);", "KV * Hd, false);", front="tests/test_grad.py"),
    M("grad_mlp_residual_dropped", "reverse pass: the MLP block's input gradient replaces the residual's",
      "csrc/model/gemma3_grad.cpp",
      "t.x_mid.data(), D, p.normed, D, dx, D,\n                true);",
      "t.x_mid.data(), D, p.normed, D, dx, D,\n                false);", front="tests/test_grad.py"),
    M("hooks_scale_vjp_ignored", "the VJP of interventions.scale ignores the scale", "csrc/model/hooks.cpp",
      "g.for_each([&](float& x, const int64_t* idx) {\n        if (sel(idx)) x *= a.scale;",
      "g.for_each([&](float& x, const int64_t* idx) {\n        if (sel(idx)) x *= 1.f;", front="tests/test_grad.py"),
    # ---- python/gemmalens ----
    M("py_loss_target_unshifted", "loss: position t scored against token t instead of t + 1",
      "python/gemmalens/metrics.py", "targets[:, :-1] = tokens[:, 1:]", "targets[:, :-1] = tokens[:, :-1]"),
    M("py_logit_diff_sign", "logit_diff value is bad - good", "python/gemmalens/metrics.py",
      "value = float(np.mean(logits[rows, p, good].astype(np.float64) - logits[rows, p, bad]))",
      "value = float(np.mean(logits[rows, p, bad].astype(np.float64) - logits[rows, p, good]))"),
    M("py_top_p_one_fewer", "top_p keeps one token fewer than the prefix reaching top_p", "python/gemmalens/sampling.py",
      'ids = order[: int(np.searchsorted(cum, top_p, side="left")) + 1]',
      'ids = order[: int(np.searchsorted(cum, top_p, side="left"))]', front="tests/test_generation.py"),
    M("py_top_k_drops_kth", "top_k also drops the k-th largest logit", "python/gemmalens/sampling.py",
      "support = np.flatnonzero(x >= kth)", "support = np.flatnonzero(x > kth)", front="tests/test_generation.py"),
    M("py_repetition_penalty_inverted", "repetition penalty multiplies positive logits, divides negative ones",
      "python/gemmalens/sampling.py",
      "x[idx] = np.where(v > 0, v / self.repetition_penalty, v * self.repetition_penalty)",
      "x[idx] = np.where(v > 0, v * self.repetition_penalty, v / self.repetition_penalty)",
      front="tests/test_generation.py"),
    M("py_bos_twice", "tokenizer prepends BOS even when the text starts with <bos>", "python/gemmalens/tokenizer.py",
      "if add_bos and self.bos_id >= 0 and (not ids or ids[0] != self.bos_id):",
      "if add_bos and self.bos_id >= 0:", front="tests/test_tokenizer.py"),
    M("py_intervention_scale_ignored", "interventions: scale= ignored (always 1)", "python/gemmalens/interventions.py",
      "self.scale = float(scale)", "self.scale = 1.0", front="tests/test_hooks.py"),
    M("py_pad_offset_off_by_one", "attention_mask -> padding count one too high", "python/gemmalens/model.py",
      "return np.ascontiguousarray(starts, dtype=np.int32)", "return np.ascontiguousarray(starts + 1, dtype=np.int32)"),
    M("py_chat_system_stripped", "chat: the system prompt stripped before folding (Gemma 3's template keeps it)",
      "python/gemmalens/tokenizer.py", 'prefix = c + "\\n\\n"', 'prefix = c.strip() + "\\n\\n"',
      front="tests/test_chat.py"),
    M("py_saelens_rescale_ignored", "SAELens TopK rescale_acts_by_decoder_norm ignored", "python/gemmalens/sae.py",
      'if cfg.get("rescale_acts_by_decoder_norm"):', "if False:", front="tests/test_sae.py"),
    M("py_gemma_pytorch_text_token_embedder", "gemma_pytorch: multimodal text_token_embedder not read as the embedding",
      "python/gemmalens/formats.py", 'if name in ("embedder.weight", "text_token_embedder.weight"):',
      'if name == "embedder.weight":', front="tests/test_formats.py"),
]

# The fast selection, quickest and most telling files first (pytest -x stops at the first failure, so a killed mutant
# costs only the files before its killer): ~2 min of tests on 2 cores. Left out: test_real_model.py (the real 270m,
# ~3.5 min), test_fuzz.py (a time budget), test_cpp_units.py (its own CMake build; add it with --tests to check the
# C++ unit tests too).
DEFAULT_TESTS = [
    "tests/test_config.py",
    "tests/test_ops.py",
    "tests/test_metrics.py",
    "tests/test_tokenizer.py",
    "tests/test_model_hf.py",
    "tests/test_cache.py",
    "tests/test_generation.py",
    "tests/test_gguf.py",
    "tests/test_hooks.py",
    "tests/test_grad.py",
    "tests/test_activation_cache.py",
    "tests/test_grad_hooks.py",
    "tests/test_attribution_eap.py",
    "tests/test_sae.py",
    "tests/test_errors.py",
    "tests/test_api_errors.py",
    "tests/test_hardening.py",
    "tests/test_formats.py",
]

RESULT_OK = "killed"


def git(*args, cwd=ROOT, check=True):
    r = subprocess.run(["git", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout.strip()


def load_extra(path):
    """Extra mutants from a JSON list of {id, desc, file, original, replacement[, front]} (ad-hoc mutants)."""
    with open(path) as f:
        items = json.load(f)
    return [Mutant(**item) for item in items]


def check_list(mutants):
    """Duplicate ids and no-op entries are errors of the list itself."""
    seen, errors = set(), []
    for m in mutants:
        if m.id in seen:
            errors.append(f"duplicate id {m.id}")
        seen.add(m.id)
        if m.original == m.replacement:
            errors.append(f"{m.id}: the replacement equals the original")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", m.id):
            errors.append(f"{m.id}: ids are letters, digits, '_', '.', '-'")
        if m.front and not (ROOT / m.front.split("::")[0]).is_file():
            errors.append(f"{m.id}: its test file {m.front} does not exist")
    if errors:
        raise SystemExit("the mutant list is broken:\n  " + "\n  ".join(errors))


def occurrences(text, m):
    return text.count(m.original)


def head_text(path):
    r = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return r.stdout.decode() if r.returncode == 0 else None


def stale_reason(text, m):
    if text is None:
        return f"{m.file} does not exist at HEAD"
    n = occurrences(text, m)
    return None if n == 1 else f"the original text occurs {n} times in {m.file} (needs exactly 1)"


# ---- the scratch tree and the venv ----

def setup_tree(tree):
    sha = git("rev-parse", "HEAD")
    if tree.exists():
        top = git("rev-parse", "--show-toplevel", cwd=tree, check=False)
        if not top or Path(top).resolve() != tree.resolve():
            raise SystemExit(f"{tree} exists but is not a git worktree; remove it or pass another --tree")
        git("checkout", "-q", "--detach", "--force", sha, cwd=tree)
        git("reset", "-q", "--hard", sha, cwd=tree)  # an interrupted run's mutation, if any, is undone here
    else:
        tree.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "-q", "--detach", str(tree), sha)
    return sha


def remove_tree(tree):
    git("worktree", "remove", "--force", str(tree), check=False)
    git("worktree", "prune", check=False)


def venv_python(venv):
    return venv / "bin" / "python"


def setup_venv(venv, base_site):
    py = venv_python(venv)
    if not py.exists():
        print(f"creating the venv {venv} on top of {base_site}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
        (site / "base.pth").write_text(base_site + "\n")
    probe = "import torch, transformers, pytest, scikit_build_core, pybind11"
    r = subprocess.run([str(py), "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SystemExit(f"the venv {venv} cannot import the test and build requirements ({probe}):\n{r.stdout[-2000:]}\n"
                         "run this script with the Python of an environment that has them (pip install '.[test]' "
                         "scikit-build-core), or pass --base-site")


def build_env(venv, jobs):
    env = dict(os.environ)
    scripts = [str(venv / "bin"), sysconfig.get_path("scripts")]  # cmake / ninja from the base environment too
    env["PATH"] = os.pathsep.join(scripts + [env.get("PATH", "")])
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    # libgomp's threads spin while they wait: on a shared machine passive waiting keeps the tests' time sane.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_logged(cmd, cwd, env, timeout, log):
    """Runs cmd in its own process group; returns (exit status or None on timeout, seconds, output)."""
    t0 = time.time()
    with open(log, "w") as out:
        out.write("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
        out.flush()
        p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, time.time() - t0, Path(log).read_text(errors="replace")


def build(tree, venv, env, args, log):
    cmd = [venv_python(venv), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--force-reinstall", "-q",
           "-C", "build-dir=build/mut"]
    if not args.lto:
        cmd += ["-C", "cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF"]
    cmd.append(".")
    return run_logged(cmd, tree, env, args.build_timeout, log)


def run_tests(tree, venv, env, tests, timeout, log, extra=()):
    cmd = [venv_python(venv), "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *extra, *tests]
    return run_logged(cmd, tree, env, timeout, log)


def first_failure(output):
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    if m:
        return m.group(1)
    m = re.search(r'File "[^"]*/(tests/[^"]+\.py)", line \d+ in (\w+)', output)  # faulthandler's trace of a crash
    return f"{m.group(1)}::{m.group(2)} (crashed)" if m else None


def ordered_tests(tests, front):
    if not front:
        return list(tests)
    return [front] + [t for t in tests if t != front and not t.startswith(front + "::")]


# ---- the report ----

def write_report(path, rows, header):
    lines = [header, "", "| id | description | result | killing test |", "|---|---|---|---|"]
    for r in rows:
        test = f"`{r['test']}`" if r["test"] else ""
        lines.append(f"| {r['id']} | {r['desc']} | {r['result']} | {test} |")
    counts = {}
    for r in rows:
        counts[r["result"]] = counts.get(r["result"], 0) + 1
    lines += ["", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)})"]
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (head of bench/mutants.py) for the details.")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--check", action="store_true",
                    help="check that every mutant's original text occurs exactly once at HEAD (no build); exit 1 if not")
    ap.add_argument("--only", help="comma-separated mutant ids to run")
    ap.add_argument("--extra", help="a JSON file with more mutants: [{id, desc, file, original, replacement}, ...]")
    ap.add_argument("--tests", help="the test selection, as pytest arguments (default: %s)" % " ".join(DEFAULT_TESTS))
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one mutant's tests (default 900)")
    ap.add_argument("--build-timeout", type=float, default=2400, help="seconds for one build (default 2400)")
    ap.add_argument("--venv", default="build/mutants/venv", help="the venv the mutants are installed into (created if "
                    "missing; relative to the repository root)")
    ap.add_argument("--base-site", default=sysconfig.get_paths()["purelib"],
                    help="site-packages with the test and build requirements, put under a new venv (default: this "
                    "Python's)")
    ap.add_argument("--tree", default="build/mutants/tree", help="the scratch worktree (relative to the repository root)")
    ap.add_argument("--keep-tree", action="store_true", help="keep the scratch worktree and its build for a rerun")
    ap.add_argument("--report", default="build/mutants/report.md", help="where the Markdown table is written")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selection")
    ap.add_argument("--no-front", action="store_true", help="ignore the mutants' own test files: the selection's order only")
    ap.add_argument("--lto", action="store_true", help="build with link-time optimisation, as released (slower relinks)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build parallelism")
    args = ap.parse_args()

    mutants = list(MUTANTS) + (load_extra(args.extra) if args.extra else [])
    check_list(mutants)
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        by_id = {m.id: m for m in mutants}
        unknown = [w for w in want if w not in by_id]
        if unknown:
            raise SystemExit(f"unknown mutant id(s): {', '.join(unknown)} (--list shows them)")
        mutants = [by_id[w] for w in want]

    if args.list or args.check:
        bad = 0
        for m in mutants:
            reason = stale_reason(head_text(m.file), m) if args.check else None
            bad += reason is not None
            status = ("STALE: " + reason) if reason else ("ok" if args.check else "")
            print(f"{m.id:32s} {m.file:32s} {m.desc}" + (f"  [{status}]" if status else ""))
        if args.check:
            print(f"\n{len(mutants) - bad} of {len(mutants)} mutants apply exactly once at HEAD")
        return 1 if bad else 0

    tests = shlex.split(args.tests) if args.tests else list(DEFAULT_TESTS)
    tree, venv = (ROOT / args.tree).resolve(), (ROOT / args.venv).resolve()
    report = ROOT / args.report  # an absolute --report stays as given
    logs = report.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "python", "tests", "CMakeLists.txt", "pyproject.toml"):
        print("note: uncommitted changes in csrc/ python/ tests/ are not part of the run (the scratch tree is HEAD)")

    sha = setup_tree(tree)
    setup_venv(venv, args.base_site)
    env = build_env(venv, args.jobs)
    header = (f"Mutants of gemmalens at {sha[:10]}, {time.strftime('%Y-%m-%d %H:%M')}; tests: "
              f"`pytest -x {' '.join(tests)}`" + ("" if args.no_front else " (each mutant's own test file first, where it names one)"))
    rows, t_start = [], time.time()
    try:
        if not args.no_baseline:
            print("baseline: building the unmutated tree ...", flush=True)
            rc, secs, out = build(tree, venv, env, args, logs / "baseline.build.log")
            if rc != 0:
                raise SystemExit(f"the unmutated build failed ({'timeout' if rc is None else rc}); see {logs / 'baseline.build.log'}")
            print(f"  built in {secs:.0f} s; running the selection ...", flush=True)
            rc, secs, out = run_tests(tree, venv, env, tests, args.timeout, logs / "baseline.tests.log", ["--durations=25"])
            if rc != 0:
                raise SystemExit(f"the unmutated tree fails the selection ({'timeout' if rc is None else f'exit {rc}'}: "
                                 f"{first_failure(out)}); see {logs / 'baseline.tests.log'}")
            print(f"  the selection passes in {secs:.0f} s", flush=True)
        for i, m in enumerate(mutants, 1):
            path = tree / m.file
            text = path.read_text() if path.exists() else None
            row = {"id": m.id, "desc": m.desc, "test": "", "file": m.file}
            reason = stale_reason(text, m)
            print(f"[{i}/{len(mutants)}] {m.id} ({m.file}) ...", end=" ", flush=True)
            if reason:
                row["result"] = "stale"
                row["test"] = reason
                print("STALE: " + reason, flush=True)
                rows.append(row)
                write_report(report, rows, header)
                continue
            t0 = time.time()
            try:
                path.write_text(text.replace(m.original, m.replacement, 1))
                rc, bsecs, out = build(tree, venv, env, args, logs / f"{m.id}.build.log")
                if rc != 0:
                    row["result"] = "build failed" if rc is not None else "build timeout"
                else:
                    order = ordered_tests(tests, "" if args.no_front else m.front)
                    rc, tsecs, out = run_tests(tree, venv, env, order, args.timeout, logs / f"{m.id}.tests.log")
                    if rc is None:
                        row["result"] = "timeout"
                    elif rc == 0:
                        row["result"] = "SURVIVED"
                    elif rc in (1, 2) or rc < 0 or rc > 128:  # failures, collection errors, a crash (signal)
                        row["result"] = RESULT_OK
                        row["test"] = first_failure(out) or f"(exit status {rc}, see logs/{m.id}.tests.log)"
                    else:  # pytest's internal / usage error, no tests collected: the selection is broken
                        row["result"] = f"pytest error {rc}"
            finally:
                path.write_text(text)  # restored whatever happened (the next build recompiles it)
            print(f"{row['result']} {row['test']} ({time.time() - t0:.0f} s)", flush=True)
            rows.append(row)
            write_report(report, rows, header)
    finally:
        if not args.keep_tree:
            remove_tree(tree)
    text = write_report(report, rows, header)
    print("\n" + text)
    print(f"written to {report} ({(time.time() - t_start) / 60:.1f} min)")
    return 0 if rows and all(r["result"] == RESULT_OK for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
