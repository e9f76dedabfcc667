#!/usr/bin/env bash
# CI hardening: build gemmalens._core with AddressSanitizer + UBSan (CMake option GEMMALENS_SANITIZE) into a
# throw-away directory and run the C++ unit tests and the parsing / error / cache / ops tests (and the fuzz corpus)
# against it.
#
# Run from .ci/run after the main test command, inside the same (activated) venv, which already has the test
# dependencies. The normal install in the venv is not touched: the sanitized build goes to its own build dir and
# its own `pip install --target` directory, which is put first on PYTHONPATH. Nothing is cached between runs.
#
# Fails (non-zero) when the build fails, when a test fails, or when ASan / UBSan reports anything, in the test
# process or in any child process (reports go to log files under a temp dir; any file there fails the run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  echo "sanitize.sh: expects an activated venv with the test dependencies (see .ci/run)" >&2
  exit 2
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/gemmalens-asan.XXXXXX")"
SITE="$TMP/asan-site"
BUILD="$TMP/asan-build"
LOGS="$TMP/logs"
mkdir -p "$SITE" "$LOGS"
# GEMMALENS_SANITIZE_KEEP=1 keeps the directory (build tree, sanitizer logs) for a look afterwards.
if [[ -z "${GEMMALENS_SANITIZE_KEEP:-}" ]]; then
  trap 'rm -rf "$TMP"' EXIT
else
  echo "sanitize.sh: keeping $TMP"
fi

# --- build ------------------------------------------------------------------------------------------------------
# --no-build-isolation builds against the venv, so it needs pyproject.toml's [build-system] requires there
# (the test install got them only in pip's isolated build env). A no-op when they are already satisfied.
mapfile -t BUILD_REQUIRES < <(python - <<'EOF'
try:
    import tomllib
    with open("pyproject.toml", "rb") as f:
        reqs = tomllib.load(f)["build-system"]["requires"]
except ImportError:  # Python < 3.11
    reqs = ["scikit-build-core>=0.10", "pybind11>=2.12", "onednn-cpu-gomp==2023.2.0",
            "onednn-devel-cpu-gomp==2023.2.0", "nlohmann-json>=3.11"]
print("\n".join(reqs))
EOF
)
python -m pip install --quiet "${BUILD_REQUIRES[@]}"
# scikit-build-core asks the build frontend for cmake / ninja when the machine has none; without build isolation
# nobody installs them, so do it here when missing.
if ! cmake --version >/dev/null 2>&1; then python -m pip install --quiet "cmake>=3.18"; fi
if ! ninja --version >/dev/null 2>&1; then python -m pip install --quiet ninja; fi

export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
echo "sanitize.sh: building the ASan+UBSan extension into $SITE"
t0=$SECONDS
# Debug: pybind11 adds neither -flto nor strip (frames with file:line in the reports); the CMake option adds the
# sanitizer flags and -O1. No strip at install either. nlohmann_json's JSON_ASSERTs (NDEBUG unset) are live.
# GEMMALENS_BUILD_TESTS: the C++ unit tests too, from the same objects (run below; not installed).
python -m pip install --quiet --no-build-isolation --no-deps --no-cache-dir --target "$SITE" \
  -C cmake.define.GEMMALENS_SANITIZE=ON -C cmake.define.GEMMALENS_BUILD_TESTS=ON -C cmake.build-type=Debug \
  -C install.strip=false -C build-dir="$BUILD" "$ROOT"
build_s=$((SECONDS - t0))
echo "sanitize.sh: build took ${build_s}s"

CORE="$(find "$SITE/gemmalens" -maxdepth 1 -name '_core*.so' -print -quit)"
if [[ -z "$CORE" ]]; then
  echo "sanitize.sh: no $SITE/gemmalens/_core*.so after the build" >&2
  exit 1
fi
CORE_SYMS="$(nm -D --undefined-only "$CORE")"
if [[ "$CORE_SYMS" != *__asan_report_load* || "$CORE_SYMS" != *__ubsan_handle_* ]]; then
  echo "sanitize.sh: $CORE is not instrumented with both ASan and UBSan" >&2
  exit 1
fi

# --- runtime environment -----------------------------------------------------------------------------------------
# Python is not instrumented, so the ASan runtime must come first (LD_PRELOAD), together with libstdc++: python
# does not link it, and ASan resolves its __cxa_throw interceptor at start-up; without it the first C++ exception
# thrown by another extension (jaxlib, under the orbax test) dies in "CHECK failed ... real___cxa_throw". The
# UBSan runtime (libubsan.so.1) is a dependency of the module and loads with it. All from the GCC that built it.
LIBASAN="$(readlink -f "$(gcc -print-file-name=libasan.so)")"
LIBSTDCXX="$(readlink -f "$(gcc -print-file-name=libstdc++.so.6)")"
LIBUBSAN="$(ldd "$CORE" | awk '$1 ~ /^libubsan\.so/ {print $3}')"
for lib in "$LIBASAN" "$LIBSTDCXX" "$LIBUBSAN"; do
  if [[ ! -f "$lib" ]]; then
    echo "sanitize.sh: sanitizer runtime not found: '$lib' (libasan, libstdc++ from gcc; libubsan from ldd $CORE)" >&2
    exit 1
  fi
done

mkdir -p "$TMP/py"
# UBSan's log file. With GCC's separate libasan + libubsan, libubsan passes UBSAN_OPTIONS' log_path to
# __sanitizer_set_report_path, which binds to libasan's copy (LD_PRELOAD comes first), so UBSan's own reports
# would stay on stderr, where a child process's report is lost (captured by the test). So every Python process,
# children included, sets libubsan's own report path at start-up through a handle on libubsan itself.
cat >"$TMP/py/sitecustomize.py" <<'PY'
import ctypes
import os

_lib, _log = os.environ.get("GEMMALENS_UBSAN_LIB"), os.environ.get("GEMMALENS_UBSAN_LOG")
if _lib and _log:
    ctypes.CDLL(_lib)["__sanitizer_set_report_path"](_log.encode())

# Then the sitecustomize this one shadows, if the interpreter has one.
import importlib.machinery
import importlib.util
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
PY
# A pytest plugin that fails the session unless gemmalens comes from the sanitized install.
cat >"$TMP/py/gemmalens_asan_guard.py" <<'PY'
import os


def pytest_sessionstart(session):
    import gemmalens
    import gemmalens._core

    site = os.path.realpath(os.environ["GEMMALENS_ASAN_SITE"]) + os.sep
    for mod in (gemmalens, gemmalens._core):
        path = os.path.realpath(mod.__file__)
        if not path.startswith(site):
            raise RuntimeError(f"sanitize.sh: {mod.__name__} was imported from {path}, not from the sanitized build in {site}")
    print(f"\nsanitize.sh: testing the sanitized build {os.path.realpath(gemmalens._core.__file__)}")
PY

# run_san LOGDIR CMD...: run CMD under the sanitizer runtimes; a report from any process lands in LOGDIR.
#   detect_leaks=0: CPython (and torch) leak on purpose at exit. abort_on_error / halt_on_error: the first report
#   kills the process. UBSan's log_path names ASan's file on purpose (see sitecustomize.py above).
#   allow_user_segv_handler=0: ASan keeps SIGSEGV; Python's faulthandler (pytest enables it; the fuzz children too)
#   would take it first and chain to ASan on its small alternate stack, where the report dies as a "nested bug"
#   without frames. faulthandler still prints the Python stack on the SIGABRT that follows a report.
#   allocator_may_return_null=1: malloc / realloc that cannot be served return NULL as with glibc (Python raises
#   MemoryError: the fuzz corpus has pickles with huge memo indices, under the fuzz children's RLIMIT_DATA cap);
#   a C++ `new` that cannot be served is still reported (ASan's operator new never throws bad_alloc).
#   symbolize=0: ASan's in-process symbolizer (libbacktrace) needs more stack than the alternate signal stack that
#   faulthandler installs, so a SEGV / FPE / stack-overflow report in a process with faulthandler on (the fuzz
#   children) would stop after its first line; the frames are symbolized afterwards by .ci/asan_symbolize.py.
#   PYTHONMALLOC=malloc: Python objects (small bytes, ...) handed to the extension get ASan redzones too.
#   GEMMALENS_FUZZ_SECONDS=0: tests/test_fuzz.py runs its regression corpus only (random fuzzing is in the normal
#   test job). PYTHONFAULTHANDLER: an abort prints the Python stack, i.e. the test that was running.
run_san() {
  local logs="$1"
  shift
  mkdir -p "$logs"
  env \
    "PYTHONPATH=$SITE:$TMP/py${PYTHONPATH:+:$PYTHONPATH}" \
    "GEMMALENS_ASAN_SITE=$SITE" \
    "LD_PRELOAD=$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}" \
    "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$logs/asan:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:allow_user_segv_handler=0:allocator_may_return_null=1:symbolize=0${ASAN_OPTIONS_EXTRA:+:$ASAN_OPTIONS_EXTRA}" \
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$logs/asan" \
    "GEMMALENS_UBSAN_LIB=$LIBUBSAN" \
    "GEMMALENS_UBSAN_LOG=$logs/ubsan" \
    "PYTHONMALLOC=malloc" \
    "GEMMALENS_FUZZ_SECONDS=0" \
    "PYTHONFAULTHANDLER=1" \
    "$@"
}

# --- self-test of the reporting path: a heap overflow (ASan) and a signed overflow (UBSan), each in a child process
# whose death the parent ignores, must each leave a report in the log directory.
ST="$TMP/selftest"
mkdir -p "$ST"
cat >"$ST/bug.cpp" <<'CPP'
#include <climits>
#include <cstdlib>
extern "C" int heap_overflow(int i) {
  int* p = static_cast<int*>(std::malloc(8 * sizeof(int)));
  for (int k = 0; k < 8; ++k) p[k] = k;
  int v = p[i];
  std::free(p);
  return v;
}
extern "C" int signed_overflow(int x) { return x + INT_MAX; }
CPP
g++ -shared -fPIC -O1 -g -fsanitize=address -fno-omit-frame-pointer "$ST/bug.cpp" -o "$ST/libasan_bug.so"
g++ -shared -fPIC -O1 -g -fsanitize=undefined -fno-sanitize-recover=undefined "$ST/bug.cpp" -o "$ST/libubsan_bug.so"
for kind in asan ubsan; do
  fn=heap_overflow
  if [[ $kind == ubsan ]]; then fn=signed_overflow; fi
  run_san "$ST/logs-$kind" python - "$ST/lib${kind}_bug.so" "$fn" <<'PY'
import subprocess, sys
lib, fn = sys.argv[1], sys.argv[2]
child = f"import ctypes; ctypes.CDLL({lib!r}).{fn}(8)"
rc = subprocess.run([sys.executable, "-c", child], capture_output=True).returncode
sys.exit(0 if rc != 0 else f"sanitize.sh self-test: {fn} in {lib} did not kill the child")
PY
  if ! compgen -G "$ST/logs-$kind/$kind.*" >/dev/null; then
    echo "sanitize.sh: self-test failed: a $kind report in a child process left no file in $ST/logs-$kind" >&2
    ls -la "$ST/logs-$kind" >&2
    exit 1
  fi
done
echo "sanitize.sh: self-test ok (ASan and UBSan reports from child processes reach the log directory)"

# report_and_fail WHAT: print every report in $LOGS (symbolized) and exit 1; returns when there is none.
report_and_fail() {
  local reports f
  shopt -s nullglob
  reports=("$LOGS"/*)
  shopt -u nullglob
  if ((${#reports[@]} == 0)); then return 0; fi
  for f in "${reports[@]}"; do
    echo "===== sanitizer report: $(basename "$f") ====="
    python "$ROOT/.ci/asan_symbolize.py" "$f" || cat "$f"
  done
  echo "sanitize.sh: FAILED: ${#reports[@]} sanitizer report(s) ($1)" >&2
  exit 1
}

# The module imports under the preloaded runtimes.
rc=0
run_san "$LOGS" python -c "import gemmalens._core as c; print('sanitize.sh: import ok:', c.__file__)" || rc=$?
report_and_fail "importing gemmalens._core, exit status $rc"
if ((rc != 0)); then
  echo "sanitize.sh: FAILED: importing the sanitized gemmalens._core (exit status $rc)" >&2
  exit "$rc"
fi

# --- tests -------------------------------------------------------------------------------------------------------
# The C++ unit tests (csrc/tests: the attention variants, the KV cache, quantisation), linked with the sanitizers.
echo "sanitize.sh: running the C++ unit tests under ASan+UBSan"
rc=0
run_san "$LOGS" "$BUILD/gemmalens_ops_test" || rc=$?
report_and_fail "gemmalens_ops_test exit status $rc"
if ((rc != 0)); then
  echo "sanitize.sh: FAILED: gemmalens_ops_test exit status $rc (no sanitizer report)" >&2
  exit "$rc"
fi

TESTS=(tests/test_formats.py tests/test_errors.py tests/test_api_errors.py tests/test_cache.py tests/test_continuous_batching.py tests/test_ops.py
       tests/test_gguf.py tests/test_config.py tests/test_sae.py tests/test_grad.py tests/test_grad_hooks.py tests/test_attribution_eap.py tests/test_metrics.py)
if [[ -f tests/test_fuzz.py ]]; then TESTS+=(tests/test_fuzz.py); fi

# test_fuzz_finds_nothing (random fuzzing) runs in the main test job; here the saved corpus is replayed.
echo "sanitize.sh: running ${TESTS[*]} under ASan+UBSan"
t0=$SECONDS
rc=0
run_san "$LOGS" python -m pytest -q -p no:cacheprovider -p gemmalens_asan_guard "${TESTS[@]}" -k "not test_fuzz_finds_nothing" || rc=$?
test_s=$((SECONDS - t0))
echo "sanitize.sh: tests took ${test_s}s (build ${build_s}s)"

report_and_fail "pytest exit status $rc"
if ((rc != 0)); then
  echo "sanitize.sh: FAILED: pytest exit status $rc (no sanitizer report)" >&2
  exit "$rc"
fi
# The AVX2 class's own kernels (widening bf16 GEMM and decode, vpmaddubsw int8/int4, tiled attention) run only where
# the class is forced: the C++ unit tests and the kernel tests again under GEMMALENS_MAX_ISA=avx2.
echo "sanitize.sh: the C++ unit tests and tests/test_ops.py under ASan+UBSan with GEMMALENS_MAX_ISA=avx2"
rc=0
run_san "$LOGS" env GEMMALENS_MAX_ISA=avx2 "$BUILD/gemmalens_ops_test" || rc=$?
report_and_fail "gemmalens_ops_test (avx2) exit status $rc"
if ((rc != 0)); then exit "$rc"; fi
run_san "$LOGS" env GEMMALENS_MAX_ISA=avx2 python -m pytest -q -p no:cacheprovider -p gemmalens_asan_guard tests/test_ops.py || rc=$?
report_and_fail "pytest tests/test_ops.py (avx2) exit status $rc"
if ((rc != 0)); then exit "$rc"; fi
echo "sanitize.sh: OK (no sanitizer reports; build ${build_s}s, tests ${test_s}s)"
