"""The C++ unit tests (csrc/tests): every attention variant against a naive double-precision reference (ring caches,
left padding, windows, GQA, soft-capping, split-K decode), the KV cache's stage / commit / truncate rules, and the
int8 / int4 block quantisation. CMake builds the `gemmalens_ops_test` target (option GEMMALENS_BUILD_TESTS), then it runs
once per CPU class this machine supports (GEMMALENS_MAX_ISA; README, "CPU classes").

The build goes to build/cpp-tests-<generator> under the repository (GEMMALENS_CPP_TEST_BUILD_DIR overrides it), so a
rerun only recompiles what changed. CMake runs with the Python running pytest, so CMakeLists.txt finds pybind11,
nlohmann_json and oneDNN as `pip install .` does (python/gemmalens/_deps.py; the test extra installs them, with cmake
and ninja). One case alone: build/cpp-tests-ninja/gemmalens_ops_test attention_decode (--list shows them).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = "gemmalens_ops_test"


def _tool(name):
    """cmake / ninja: this interpreter's scripts directory (its venv, activated or not), the PyPI package's own
    binary directory, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / name]
    try:
        module = __import__(name)
        candidates.append(Path(module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR) / name)
    except (ImportError, AttributeError):
        pass
    candidates.append(shutil.which(name))
    return next((str(c) for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _run(cmd, what, timeout):
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{what} failed (exit status {r.returncode}): {' '.join(cmd)}\n{r.stdout[-30000:]}", pytrace=False)
    return r.stdout


@pytest.fixture(scope="module")
def ops_test_binary():
    cmake = _tool("cmake")
    if cmake is None:
        pytest.fail("cmake not found: pip install 'cmake>=3.18' (the test extra has it)", pytrace=False)
    ninja = _tool("ninja")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []  # else CMake's default (make)
    build = Path(os.environ.get("GEMMALENS_CPP_TEST_BUILD_DIR") or ROOT / "build" / f"cpp-tests-{'ninja' if ninja else 'make'}")
    _run([cmake, "-S", ROOT, "-B", build, *generator, "-DCMAKE_BUILD_TYPE=Release", "-DGEMMALENS_BUILD_TESTS=ON",
          f"-DPython_EXECUTABLE={sys.executable}"], "configuring the C++ tests", timeout=600)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    _run([cmake, "--build", build, "--target", TARGET, "--parallel", jobs], "building the C++ tests", timeout=1800)
    return build / TARGET


def _classes():
    import gemmalens

    return gemmalens.cpu_info()["supported"]


@pytest.mark.parametrize("cls", _classes())
def test_cpp_units(ops_test_binary, cls):
    """Runs every case under the forced class; on failure the binary's report (file:line, values, the case's
    parameters) is the message."""
    env = {**os.environ, "GEMMALENS_MAX_ISA": cls}
    r = subprocess.run([str(ops_test_binary)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600, env=env)
    print(r.stdout)  # per-case lines, notes and skips (pytest -rP shows them)
    assert r.returncode == 0 and " 0 failed" in r.stdout.splitlines()[-1], r.stdout[-30000:]
    assert f"CPU class: {cls}\n" in r.stdout
