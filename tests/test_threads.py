"""Threads on a busy machine: the libgomp waiting policy gemmalens sets at import (gemmalens/_threads.py), and the CLI
at its default thread count with every core taken by busy loops."""
import os
import subprocess
import sys
import time

import gemmalens as gl


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gemmalens", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def _busy_loops(n):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    time.sleep(0.3)  # running before the measured process starts
    return procs


def test_cli_with_every_core_busy(real_gguf_path):
    """Two busy loops per core while the CLI decodes at its default thread count: it finishes (within the time-out)
    with the same text as the same mode in this process (greedy, same thread count). With libgomp's own spin-waiting
    this run was several times slower than --threads 1 (bench/threads_under_load.py measures it)."""
    model = gl.load(real_gguf_path, dtype="bfloat16", weights="auto")
    expected = model.generate("The capital of France is", max_new_tokens=12)
    assert expected.strip()
    loops = _busy_loops(2 * len(os.sched_getaffinity(0)))
    try:
        out = _cli("generate", "--max-new-tokens", "12", "--verbose", "The capital of France is", timeout=300)
    finally:
        for p in loops:
            p.kill()
        for p in loops:
            p.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert f"{len(os.sched_getaffinity(0))} threads" in out.stderr and "tok/s" in out.stderr


def _env_without_omp():
    return {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


_PROBE = "import os, gemmalens; print(gemmalens._threads.state, os.environ.get('GOMP_SPINCOUNT'))"


def test_openmp_waiting_policy_set_before_libgomp_loads():
    from gemmalens import _threads

    env = _env_without_omp()
    out = subprocess.run([sys.executable, "-W", "error", "-c", _PROBE], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["set", _threads.SPINCOUNT]
    # the user's choice wins, untouched
    for var, value in (("OMP_WAIT_POLICY", "active"), ("GOMP_SPINCOUNT", "12345")):
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=dict(env, **{var: value}),
                             timeout=120)
        assert out.stdout.split() == ["user", "12345" if var == "GOMP_SPINCOUNT" else "None"], out.stderr
    # torch first: its libgomp already runs with the default policy; gemmalens says so and how to fix it
    out = subprocess.run([sys.executable, "-c", "import torch; " + _PROBE], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.stdout.split() == ["late", "None"], out.stderr
    if (os.cpu_count() or 1) > 1:
        assert "RuntimeWarning" in out.stderr and "Import gemmalens before torch" in out.stderr
