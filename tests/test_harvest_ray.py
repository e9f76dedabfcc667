"""gl.harvest(engine="ray") on a real multi-process Ray cluster started on 127.0.0.1 by the test (and stopped after):
the output equals the local harvest row for row, also when an actor is SIGKILLed mid-run."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gemmalens as gl
from test_harvest import HOOKS, TEXTS, spm_dir, tiny  # noqa: F401  (fixtures)

pytest.importorskip("ray")  # the test extra installs gemmalens[ray]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --num-cpus 2` on 127.0.0.1: a GCS, a raylet and worker processes, as on a cluster's head node.
    (Ray swaps a loopback --node-ip-address for this host's own address, ray/_private/services.py
    resolve_ip_for_localhost; either way nothing leaves the machine.) Token authentication is off for this throwaway
    cluster (RAY_AUTH_MODE=disabled, for it and for this process as its client)."""
    ray_bin = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter's Ray
    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env = dict(os.environ)
    subprocess.run([*ray_bin, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--include-dashboard", "false", "--disable-usage-stats"], check=True, env=env, timeout=180,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*ray_bin, "stop", "--force"], env=env, timeout=180, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rows(result):
    return result.load().with_format("numpy")[:]


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory):  # noqa: F811
    _, model = tiny
    return _rows(gl.harvest(model, TEXTS * 3, HOOKS, tmp_path_factory.mktemp("local") / "o", context_size=16,
                            shard_bytes=12_000, progress=False))


def _assert_same(a, b):
    assert len(a["token_ids"]) == len(b["token_ids"]) > 100
    for col in HOOKS + ["token_ids"]:
        np.testing.assert_array_equal(a[col], b[col])  # same rows, same order, same values


def test_ray_equals_local(tiny, local, ray_cluster, tmp_path):  # noqa: F811
    _, model = tiny
    r = gl.harvest(model, TEXTS * 3, HOOKS, tmp_path / "ray", context_size=16, shard_bytes=40_000, progress=False,
                   engine="ray", num_workers=2, threads_per_worker=1, ray_address=ray_cluster)
    assert r.shards > 50 and r.computed_rows == r.rows
    _assert_same(_rows(r), local)
    assert not (tmp_path / "ray" / ".gemmalens_tmp").exists()


def test_ray_actor_killed_mid_run(tiny, local, ray_cluster, tmp_path):  # noqa: F811
    """SIGKILL one actor once shards are flowing: Ray restarts it and redoes its shard; every row is there once."""
    _, model = tiny
    out = tmp_path / "killed"
    result, error = {}, {}

    def run():
        try:
            result["r"] = gl.harvest(model, TEXTS * 3, HOOKS, out, context_size=16, shard_bytes=12_000, progress=False,
                                     engine="ray", num_workers=2, ray_address=ray_cluster)
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            error["e"] = e

    t = threading.Thread(target=run)
    t.start()
    workers, manifest = out / ".gemmalens_tmp" / "workers", out / "gemmalens_harvest.json"
    victim, deadline = None, time.time() + 300
    while t.is_alive() and time.time() < deadline and victim is None:
        try:
            done = len(json.loads(manifest.read_text())["shards"])
            pids = sorted(int(p.name) for p in workers.iterdir())
        except (OSError, ValueError, KeyError):
            done, pids = 0, []
        if done >= 5 and len(pids) == 2:
            victim = pids[0]
            os.kill(victim, signal.SIGKILL)
            at_kill = done
        time.sleep(0.02)
    seen = set()
    while t.is_alive() and time.time() < deadline:  # the restarted actor writes its own pid file
        try:
            seen |= {int(p.name) for p in workers.iterdir()}
        except OSError:
            pass
        time.sleep(0.02)
    t.join(timeout=max(1.0, deadline - time.time()))
    assert victim is not None, "the harvest ended before an actor could be killed"
    assert "e" not in error, error.get("e")
    r = result["r"]
    print(f"killed actor {victim} after {at_kill} of {r.shards} shards; worker pids seen after: {sorted(seen)}")
    assert at_kill < r.shards  # killed part way
    assert len(seen - {victim}) >= 2  # Ray started a replacement actor (its own pid file)
    _assert_same(_rows(r), local)  # and every row is there, once, in order
