"""The fuzzing engine: forked children with a memory cap and a timeout, batches for throughput, outcome
classification, confirmation of findings in a fresh child, minimisation and the crasher corpus.

Outcome classes of one case:
  ok        the target ran to the end
  expected  a documented refusal: ValueError (gemmalens.CheckpointError is one), OSError, pickle.UnpicklingError,
            ImportError naming a pip extra; or the harness itself could not form an input (Skip)
  bug       any other exception (IndexError, KeyError, TypeError, RuntimeError, OverflowError, RecursionError,
            UnicodeError even though it is a ValueError, ...), or a ValueError carrying a raw C++ standard-library
            message (std::length_error and friends that escaped the native code)
  crash     the child was killed by a signal (SIGSEGV, SIGFPE, SIGABRT, SIGBUS, ...)
  hang      the case ran past the timeout
  alloc     MemoryError under the child's memory cap (RLIMIT_DATA: 2 GiB above the child's start), or peak RSS
            growth during the case above 2x the seed's tensor bytes (float32) + 64 MiB + 10x the case's own bytes
            (parsing text legitimately costs memory in proportion to its length; memory in proportion to a size the
            file merely claims is the finding)
"""
import errno
import faulthandler
import hashlib
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib

from . import harnesses
from .harnesses import FORMATS, HARNESSES, Skip

HERE = os.path.dirname(os.path.abspath(__file__))
CRASHERS = os.path.join(HERE, "crashers")
FINDINGS = ("bug", "crash", "hang", "alloc")
CLASSES = ("ok", "expected", "bug", "crash", "hang", "alloc")
RSS_SLACK = 64 << 20
DATA_CAP = 2 << 30

_STD_MSG = re.compile(r"vector::|basic_string|_M_[a-z]|std::|\bstoi\b|\bstol\b|\bstoull?\b|max_size\(\)|bad_array_new_length|"
                      r"map::at|unordered_map|bad_alloc|cannot create std::vector")


# ---------------------------------------------------------------- seeds

def seed_dir():
    """The generated seed corpus (cached per seedgen.py version under the temp dir; made on first use)."""
    src = open(os.path.join(HERE, "seedgen.py"), "rb").read()
    versions = []
    for mod in ("numpy", "torch", "gguf", "safetensors"):
        try:
            from importlib.metadata import version

            versions.append(version(mod))
        except Exception:
            versions.append("-")
    key = hashlib.sha1(src + repr(versions).encode()).hexdigest()[:12]
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    out = os.path.join(base, "gemmalens-fuzz-seeds-" + key)
    if not os.path.exists(os.path.join(out, "manifest.json")):
        import fcntl

        with open(out + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(os.path.join(out, "manifest.json")):
                env = dict(os.environ, OMP_NUM_THREADS="1")
                r = subprocess.run([sys.executable, os.path.join(HERE, "seedgen.py"), out], env=env, capture_output=True,
                                   text=True)
                if r.returncode != 0 or not os.path.exists(os.path.join(out, "manifest.json")):
                    raise RuntimeError("seed generation failed:\n" + r.stdout[-3000:] + r.stderr[-3000:])
    return out


def read_tree(d):
    files = {}
    for root, _, names in os.walk(d):
        for n in sorted(names):
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                files[os.path.relpath(p, d)] = f.read()
    return files


def load_seeds():
    """{seed id: (files, claimed_bytes)} for every seed that was generated."""
    d = seed_dir()
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    return {sid: (read_tree(os.path.join(d, sid)), m["claimed_bytes"]) for sid, m in sorted(manifest.items())
            if os.path.isdir(os.path.join(d, sid))}


# ---------------------------------------------------------------- cases

def gen_case(h, corpus, snap, key):
    """Case `key` of a batch: mutations of a corpus entry chosen among the first `snap` (deterministic)."""
    rng = random.Random(key)
    # Seeds (the first entries) are picked as often as all derived entries together.
    n_seeds = sum(1 for c in corpus[:snap] if c[2])
    if n_seeds and (rng.random() < 0.5 or snap == n_seeds):
        i = rng.randrange(n_seeds)
    else:
        i = rng.randrange(snap)
    base_id, base, _ = corpus[i]
    base_id = base_id.split("+", 1)[0]  # derived entries are named "<seed id>+<what made them new>"
    files = dict(base)

    def other():
        return corpus[rng.randrange(snap)][1]

    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        try:
            h.mutate(files, rng, other)
        except Exception:  # a structure-aware mutator tripped on an odd input: fall back to bytes (deterministic)
            from . import mutators

            name = rng.choice(sorted(files))
            files[name] = mutators.mutate_bytes(files[name], rng)
    return files, base_id


class CaseDir:
    """A directory holding the current case; files unchanged since the last case (same object) are not rewritten."""

    def __init__(self, root):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.current = {}

    def write(self, files):
        for name in list(self.current):
            if name not in files:
                try:
                    os.unlink(os.path.join(self.root, name))
                except OSError:
                    pass
                del self.current[name]
        for name, data in files.items():
            if self.current.get(name) is data:
                continue
            p = os.path.join(self.root, name)
            d = os.path.dirname(p)
            if d != self.root:
                os.makedirs(d, exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
            self.current[name] = data


def _frame(tb):
    """'file:function' of the innermost frame in gemmalens (else the innermost at all)."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    gl = [f for f in frames if "gemmalens" in f.filename]
    f = (gl or frames)[-1]
    return "%s:%s:%d" % (os.path.basename(f.filename), f.name, f.lineno)


def classify(e):
    """Exception -> (class, type name)."""
    name = type(e).__name__
    msg = str(e)
    if isinstance(e, Skip):
        return "expected", "Skip"
    if isinstance(e, MemoryError):
        return "alloc", name
    if isinstance(e, (RecursionError, UnicodeError)):
        return "bug", name
    if isinstance(e, ValueError):
        if _STD_MSG.search(msg):
            return "bug", name + "(std)"
        return "expected", name
    if isinstance(e, OSError):
        return "expected", name
    if isinstance(e, pickle.UnpicklingError):
        return "expected", name
    if isinstance(e, ImportError) and "pip install" in msg:
        return "expected", name
    return "bug", name


def normalise(msg, root):
    if root:
        msg = msg.replace(root, "<d>")
    msg = re.sub(r"/dev/shm/[^\s'\"]*", "<d>", msg)
    msg = re.sub(r"0x[0-9a-fA-F]+", "N", msg)
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", _bucket, msg)
    return msg[:100]


_EXTREMES = {2**31 - 1, -2**31, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -2**63, 2**63, 2**64 - 1, -1, 0}


def _bucket(m):
    """A number in a message -> its class (zero, small, negative, huge, an int limit): messages that differ
    only in such a class are new outcomes, others are not."""
    t = m.group(0)
    try:
        v = int(t)
    except ValueError:
        return "F"
    if v in _EXTREMES:
        return t
    if 0 < v < 1 << 16:
        return "N"
    if -(1 << 16) < v < 0:
        return "-N"
    return "BIG" if v > 0 else "-BIG"


def run_one(h, root, files):
    """Run the harness target on a materialised case: (class, type, message, frame)."""
    try:
        info = h.run(root, files)
        return "ok", "", str(info or "")[:200], ""
    except BaseException as e:  # everything the target raises is an outcome, including SystemExit
        if isinstance(e, KeyboardInterrupt):
            raise
        cls, typ = classify(e)
        try:
            msg = str(e)
        except Exception:
            msg = "<unprintable>"
        return cls, typ, msg[:400], _frame(e.__traceback__)


def signature(fmt, cls, typ, msg, frame, root=None):
    """A finding's identity: class, type and where (function, not line); expected outcomes by message shape."""
    if cls == "ok":  # what loaded (e.g. the config's shape): different valid inputs are new outcomes too
        return "ok|" + msg[:120]
    if cls == "expected":
        return "expected|%s|%s" % (typ, normalise(msg, root)[:80])
    where = re.sub(r":\d+$", "", frame or "?")
    return "%s|%s|%s|%s" % (cls, fmt, typ, where)


# ---------------------------------------------------------------- child side

def _send(fd, msg):
    p = pickle.dumps(msg, protocol=4)
    data = struct.pack("<I", len(p)) + p
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _vm(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_now():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak():
    """Reset this process's peak RSS (VmHWM) to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak():
    return _vm("VmHWM") or _maxrss()


class _RssWatch:
    """A thread that samples this process's RSS every few milliseconds during a case and, the first time it grows
    past the case's limit, records where the main thread is (the allocation site, for the finding's signature)."""

    def __init__(self):
        import threading

        self.main = threading.main_thread().ident
        self.base, self.limit, self.where, self.active = 0, 1 << 62, None, False
        self.lock = threading.Lock()
        t = threading.Thread(target=self._run, daemon=True)
        t.start()

    def arm(self, base, limit):
        with self.lock:
            self.base, self.limit, self.where, self.active = base, limit, None, True

    def disarm(self):
        with self.lock:
            self.active = False
            return self.where

    def _run(self):
        while True:
            time.sleep(0.003)
            if not self.active or self.where is not None:
                continue
            if _rss_now() - self.base > self.limit:
                f = sys._current_frames().get(self.main)
                where = first = None
                while f is not None:
                    here = "%s:%s:%d" % (os.path.basename(f.f_code.co_filename), f.f_code.co_name, f.f_lineno)
                    first = first or here
                    if "gemmalens" in f.f_code.co_filename:
                        where = here
                        break
                    f = f.f_back
                with self.lock:
                    if self.active and self.where is None:
                        self.where = where or first or "?"


def _child_setup(fault_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    warnings.simplefilter("ignore")
    fault = open(fault_path, "w")
    faulthandler.enable(file=fault, all_threads=True)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = _vm("VmData") + DATA_CAP
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    except (ValueError, OSError):
        pass
    return fault


def child_main(h, corpus, snap, keys, wfd, root, fault_path, rss_limit, timeout, explicit=None, case_cap=False):
    """Runs cases keys (generated) or explicit [(files)] and reports ('S', i) / ('D', i, ...) through wfd.

    case_cap: also cap the address space for data at the case's allowance (RLIMIT_DATA), so an allocation past it
    fails where it happens (a MemoryError with its traceback): used to locate an RSS finding's allocation site."""
    code = 0
    try:
        fault = _child_setup(fault_path)
        h.warm()
        cd = CaseDir(root)
        per_case_peak = _reset_peak()
        base_max = _peak()
        base_now = _rss_now()
        watch = _RssWatch()
        n = len(explicit) if explicit is not None else len(keys)
        for i in range(n):
            try:
                files = explicit[i] if explicit is not None else gen_case(h, corpus, snap, keys[i])[0]
                cd.write(files)
            except Exception as e:  # a bug in the fuzzer itself: reported, never counted as a finding
                _send(wfd, ("H", i, "%s: %s\n%s" % (type(e).__name__, e, traceback.format_exc()[-1500:])))
                continue
            # Allowance: twice the seed's tensor bytes + slack, and 10x the case's own bytes (parsing text costs
            # memory in proportion to its length; what must not happen is memory in proportion to a claimed size).
            limit = rss_limit + 10 * sum(len(d) for d in files.values())
            if per_case_peak:
                _reset_peak()
                base_max = _rss_now()
            _send(wfd, ("S", i))
            faulthandler.dump_traceback_later(max(1.0, timeout * 0.6), file=fault)
            watch.arm(base_max, limit)
            if case_cap:
                _, hard = resource.getrlimit(resource.RLIMIT_DATA)
                try:
                    resource.setrlimit(resource.RLIMIT_DATA, (_vm("VmData") + limit, hard))
                except (ValueError, OSError):
                    pass
            t0 = time.perf_counter()
            out = run_one(h, root, files)
            dt = time.perf_counter() - t0
            where = watch.disarm()
            faulthandler.cancel_dump_traceback_later()
            grown = _peak() - base_max
            if out[0] in ("ok", "expected", "bug") and grown > limit:
                out = ("alloc", "RSS", "peak RSS grew by %d MiB (limit %d MiB)" % (grown >> 20, limit >> 20),
                       where or "?")
            _send(wfd, ("D", i, out, dt, grown))
            if i == 0:
                base_now = _rss_now()  # after the first case: imports and one-time initialisation are done
            if out[0] == "alloc" or (not per_case_peak and _rss_now() - base_now > rss_limit // 2) \
                    or _rss_now() - base_now > 512 << 20:
                break  # start the rest of the batch in a fresh child (RSS back to the baseline)
    except BaseException:
        code = 3
    finally:
        os._exit(code)


# ---------------------------------------------------------------- parent side

class Worker:
    def __init__(self, pid, rfd, batch, keys, snap, fault_path, explicit=None):
        self.pid, self.rfd, self.batch, self.keys, self.snap = pid, rfd, batch, keys, snap
        self.fault_path, self.explicit = fault_path, explicit
        self.buf = b""
        self.current = None   # index of the case started and not finished
        self.t_case = 0.0
        self.t_start = time.monotonic()
        self.t_last = self.t_start
        self.done = 0
        self.status = None
        self.killed_for_timeout = False
        self.msgs = []

    def read(self):
        try:
            chunk = os.read(self.rfd, 1 << 16)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return True
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        while len(self.buf) >= 4:
            n = struct.unpack_from("<I", self.buf)[0]
            if len(self.buf) < 4 + n:
                break
            self.msgs.append(pickle.loads(self.buf[4:4 + n]))
            self.buf = self.buf[4 + n:]
        return True


class Runner:
    """Runs cases of one format in forked children."""

    def __init__(self, fmt, seeds, workdir, timeout=10.0, rss_limit=None):
        self.fmt = fmt
        self.h = HARNESSES[fmt]
        self.workdir = workdir
        self.timeout = timeout
        ids = [s for s in seeds if s.startswith(self.h.seed_prefix)]
        self.corpus = [(s, seeds[s][0], True) for s in ids]
        claimed = max([seeds[s][1] for s in ids] or [0])
        self.claimed = claimed
        self.rss_limit = rss_limit if rss_limit is not None else 2 * claimed + RSS_SLACK
        self.seq = 0
        self.h.prepare()

    def spawn(self, keys=None, snap=None, explicit=None, batch=None, case_cap=False):
        r, w = os.pipe()
        self.seq += 1
        root = os.path.join(self.workdir, "w%d" % self.seq)
        fault_path = os.path.join(self.workdir, "fault%d.txt" % self.seq)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            child_main(self.h, self.corpus, snap or len(self.corpus), keys or [], w, root, fault_path, self.rss_limit,
                       self.timeout, explicit, case_cap)
        os.close(w)
        os.set_blocking(r, False)
        wk = Worker(pid, r, batch, keys, snap, fault_path, explicit)
        wk.root = root
        wk.corpus = self.corpus
        return wk

    def finish(self, wk, kill=False):
        if kill:
            try:
                os.kill(wk.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status, _ = os.wait4(wk.pid, 0)
        while wk.read():
            pass
        os.close(wk.rfd)
        wk.status = status
        shutil.rmtree(wk.root, ignore_errors=True)

    def fault_text(self, wk):
        try:
            with open(wk.fault_path) as f:
                return f.read()
        except OSError:
            return ""
        finally:
            try:
                os.unlink(wk.fault_path)
            except OSError:
                pass

    def solo(self, files, timeout=None, case_cap=False):
        """One case in a fresh child: (class, type, message, frame, detail)."""
        timeout = timeout or self.timeout
        wk = self.spawn(explicit=[files], case_cap=case_cap)
        out = None
        deadline = time.monotonic() + timeout + 5
        started = None
        while True:
            r, _, _ = select.select([wk.rfd], [], [], 0.05)
            alive = wk.read() if r else True
            for m in wk.msgs:
                if m[0] == "S":
                    started = time.monotonic()
                elif m[0] == "D":
                    out = m[2]
                elif m[0] == "H":
                    out = ("harness", "error", m[2], "")
            wk.msgs = []
            if out is not None or not alive:
                break
            if started and time.monotonic() - started > timeout:
                self.finish(wk, kill=True)
                ft = self.fault_text(wk)
                return ("hang", "timeout", "no result after %.0f s" % timeout, _fault_frame(ft), ft)
            if time.monotonic() > deadline:
                self.finish(wk, kill=True)
                return ("hang", "timeout", "child did not start", "?", "")
        self.finish(wk)
        ft = self.fault_text(wk)
        if out is None:
            if os.WIFSIGNALED(wk.status):
                sig = signal.Signals(os.WTERMSIG(wk.status)).name
                return ("crash", sig, "killed by " + sig, _fault_frame(ft), ft)
            return ("crash", "exit%d" % os.waitstatus_to_exitcode(wk.status), "child exited without a result",
                    _fault_frame(ft), ft)
        return tuple(out) + ("",)


def _fault_frame(text):
    """Innermost Python frame of a faulthandler dump: 'file:function'."""
    # The main thread's stack (the one running the cases), not the watchdog threads'.
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", text or "")
    main = [b for b in blocks if "child_main" in b]
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', main[0] if main else (text or ""))
    if not frames:
        return "?"
    # faulthandler lists the most recent call first; prefer a gemmalens frame.
    gl = [f for f in frames if "gemmalens" in f[0]]
    f = (gl or frames)[0]
    return "%s:%s:%s" % (os.path.basename(f[0]), f[2], f[1])


# ---------------------------------------------------------------- findings: minimise, describe, save

def describe(base, files):
    """A short human description of how a case differs from its base seed."""
    parts = []
    for name in sorted(set(base) | set(files)):
        a, b = base.get(name), files.get(name)
        if a == b:
            continue
        if b is None:
            parts.append("%s deleted" % name)
            continue
        if a is None:
            parts.append("%s added (%d bytes)" % (name, len(b)))
            continue
        d = _describe_gguf(a, b) if name.endswith(".gguf") else None
        if d is None and (name.endswith(".json") or name == "_METADATA"):
            d = _describe_json(a, b)
        if d is None and name.endswith(".safetensors"):
            d = _describe_safetensors(a, b)
        if d is None:
            diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
            d = "%d -> %d bytes" % (len(a), len(b)) if len(a) != len(b) else ""
            if diff:
                d += "%s%d bytes differ, first at %d (%s -> %s)" % ("; " if d else "", len(diff), diff[0],
                                                                  a[diff[0]:diff[0] + 8].hex(), b[diff[0]:diff[0] + 8].hex())
        parts.append("%s: %s" % (name, d))
    return "; ".join(parts)[:1500] or "identical to the seed"


def _short(v):
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _describe_json(a, b):
    try:
        ja, jb = json.loads(a), json.loads(b)
    except (ValueError, RecursionError):
        return None
    out = []

    def walk(x, y, path):
        if len(out) > 8:
            return
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                if k not in y:
                    out.append("%s removed" % ".".join(path + [str(k)]))
                elif k not in x:
                    out.append("%s added = %s" % (".".join(path + [str(k)]), _short(y[k])))
                else:
                    walk(x[k], y[k], path + [str(k)])
        elif x != y and not (x != x and y != y):
            out.append("%s: %s -> %s" % (".".join(path) or "<root>", _short(x), _short(y)))

    try:
        walk(ja, jb, [])
    except RecursionError:
        return None
    return ", ".join(out) if out else "same JSON value (formatting differs)"


def _describe_gguf(a, b):
    from . import ggufio

    try:
        ga, gb = ggufio.parse(a), ggufio.parse(b)
    except Exception:
        return None
    out = []
    ka = {k: (t, v) for k, t, v in ga.kv}
    kb = {k: (t, v) for k, t, v in gb.kv}
    for k in ka:
        if k not in kb:
            out.append("kv %s removed" % k.decode("utf-8", "replace"))
        elif ka[k] != kb[k]:
            out.append("kv %s: %s -> %s" % (k.decode("utf-8", "replace"), _short(ka[k]), _short(kb[k])))
    for k in kb:
        if k not in ka:
            out.append("kv %s added = %s" % (k.decode("utf-8", "replace"), _short(kb[k])))
    if len(ga.kv) != len(gb.kv) and not out:
        out.append("kv count %d -> %d" % (len(ga.kv), len(gb.kv)))
    ta = {t[0]: t[1:] for t in ga.tensors}
    tb = {t[0]: t[1:] for t in gb.tensors}
    for k in ta:
        if k not in tb:
            out.append("tensor %s removed" % k.decode("utf-8", "replace"))
        elif ta[k] != tb[k]:
            out.append("tensor %s: dims/type/offset %s -> %s" % (k.decode("utf-8", "replace"), ta[k], tb[k]))
    for k in tb:
        if k not in ta:
            out.append("tensor %s added %s" % (k.decode("utf-8", "replace"), tb[k]))
    if ga.version != gb.version:
        out.append("version %d -> %d" % (ga.version, gb.version))
    if ga.data != gb.data:
        out.append("tensor data differs (%d -> %d bytes)" % (len(ga.data), len(gb.data)))
    return ", ".join(out[:10]) if out else None


def _describe_safetensors(a, b):
    try:
        ha = json.loads(a[8:8 + int.from_bytes(a[:8], "little")])
        hb = json.loads(b[8:8 + int.from_bytes(b[:8], "little")])
    except Exception:
        return None
    d = _describe_json(json.dumps(ha).encode(), json.dumps(hb).encode())
    if a[:8] != b[:8] and int.from_bytes(b[:8], "little") != len(json.dumps(hb)):
        d = "header length %d -> %d; %s" % (int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little"), d)
    return "header: " + d


def _same(out, want):
    """Does a re-run show the same finding? Same class and type (signal / exception type)."""
    return out[0] == want[0] and (out[1] == want[1] or want[0] in ("hang", "alloc"))


def minimise(runner, base, files, want, budget_s=20.0, max_runs=150):
    """Shrink the case towards its base seed while the finding stays: revert whole files, JSON members, GGUF
    metadata entries and tensor infos, and differing byte ranges to the base."""
    t_end = time.monotonic() + budget_s
    runs = [0]
    timeout = min(runner.timeout, 12.0)

    def still(cand):
        if runs[0] >= max_runs or time.monotonic() > t_end:
            return False
        runs[0] += 1
        return _same(runner.solo(cand, timeout), want)

    files = dict(files)
    for name in sorted(set(base) | set(files)):
        if base.get(name) == files.get(name):
            continue
        cand = dict(files)
        if name in base:
            cand[name] = base[name]
        else:
            cand.pop(name)
        if still(cand):
            files = cand
    for name in list(files):
        a, b = base.get(name), files[name]
        if a is None or a == b:
            continue
        if name.endswith(".gguf"):
            files[name] = _min_gguf(a, b, lambda x: still(dict(files, **{name: x})))
        elif name.endswith(".ckpt"):
            files[name] = _min_zip(a, b, lambda x: still(dict(files, **{name: x})))
        elif name.endswith(".json") or name == "_METADATA":
            files[name] = _min_nesting(files[name], lambda x: still(dict(files, **{name: x})))
            files[name] = _min_json(a, files[name], lambda x: still(dict(files, **{name: x})))
        b = files[name]
        if len(a) == len(b) and a != b:
            files[name] = _min_bytes(a, b, lambda x: still(dict(files, **{name: x})))
    return files


def _min_bytes(a, b, ok):
    """ddmin over the differing byte runs of two equal-length byte strings (reverting runs to a)."""
    runs = []
    i = 0
    while i < len(a):
        if a[i] != b[i]:
            j = i
            while j < len(a) and a[j] != b[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    if len(runs) > 200:
        return b
    n = 2
    cur = list(runs)
    while len(cur) >= 1:
        chunk = max(1, len(cur) // n)
        reduced = False
        for k in range(0, len(cur), chunk):
            keep = cur[:k] + cur[k + chunk:]
            cand = bytearray(a)
            for s, e in keep:
                cand[s:e] = b[s:e]
            if ok(bytes(cand)):
                cur = keep
                reduced = True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(cur), n * 2)
    out = bytearray(a)
    for s, e in cur:
        out[s:e] = b[s:e]
    return bytes(out)


def _min_zip(a, b, ok):
    """Revert zip entries to the base's, one at a time (only for zips the mutators wrote honestly)."""
    from . import ckptio

    ea, eb = ckptio.read_zip(a), ckptio.read_zip(b)
    if ea is None or eb is None or ckptio.write_zip(eb) != b:
        return b
    base = dict(ea)
    cur = list(eb)
    for i in range(len(cur) - 1, -1, -1):
        n, d = cur[i]
        if base.get(n) == d:
            continue
        cand = list(cur)
        if n in base:
            cand[i] = (n, base[n])
        else:
            del cand[i]
        if ok(ckptio.write_zip(cand)):
            cur = cand
    names = {n for n, _ in cur}
    for n, d in ea:
        if n not in names:
            cand = cur + [(n, d)]
            if ok(ckptio.write_zip(cand)):
                cur = cand
    return ckptio.write_zip(cur)


def _min_nesting(b, ok):
    """Halve runs of nested brackets ("[[[...]]]") while the finding stays."""
    for _ in range(24):
        m = None
        for m2 in re.finditer(rb"(\[{64,})(\]{64,})", b):
            if len(m2.group(1)) == len(m2.group(2)):
                m = m2
                break
        if m is None:
            return b
        n = len(m.group(1)) // 2
        cand = b[:m.start()] + b"[" * n + b"]" * n + b[m.end():]
        if not ok(cand):
            return b
        b = cand
    return b


def _min_json(a, b, ok):
    try:
        ja, jb = json.loads(a), json.loads(b)
    except (ValueError, RecursionError):
        return b
    if not (isinstance(ja, dict) and isinstance(jb, dict)):
        return b
    cur = dict(jb)
    for k in list(cur):
        if k in ja and ja[k] == cur[k]:
            continue
        cand = dict(cur)
        if k in ja:
            cand[k] = ja[k]
        else:
            del cand[k]
        try:
            text = json.dumps(cand).encode()
        except (ValueError, TypeError, RecursionError):
            continue
        if ok(text):
            cur = cand
    try:
        text = json.dumps(cur).encode()
    except (ValueError, TypeError, RecursionError):
        return b
    return text if json.loads(text) == json.loads(b) or ok(text) else b


def _min_gguf(a, b, ok):
    from . import ggufio

    try:
        ga, gb = ggufio.parse(a), ggufio.parse(b)
        if ggufio.serialize(gb)[0] != b:
            return b  # a raw lie in a field: structure-level reverts would lose it
    except Exception:
        return b
    base_kv = {k: (t, v) for k, t, v in ga.kv}
    cur = gb
    for idx in range(len(gb.kv) - 1, -1, -1):
        k, t, v = cur.kv[idx]
        cand = ggufio.GGUF()
        cand.__dict__.update(cur.__dict__)
        cand.kv = [list(e) for e in cur.kv]
        if k in base_kv and base_kv[k] == (t, v):
            continue
        if k in base_kv:
            cand.kv[idx] = [k, base_kv[k][0], base_kv[k][1]]
        else:
            del cand.kv[idx]
        if ok(ggufio.serialize(cand)[0]):
            cur = cand
    have = {e[0] for e in cur.kv}
    for k, t, v in ga.kv:
        if k not in have:
            cand = ggufio.GGUF()
            cand.__dict__.update(cur.__dict__)
            cand.kv = [list(e) for e in cur.kv] + [[k, t, v]]
            if ok(ggufio.serialize(cand)[0]):
                cur = cand
    base_t = {e[0]: e for e in ga.tensors}
    for idx in range(len(cur.tensors)):
        e = cur.tensors[idx]
        if e[0] in base_t and base_t[e[0]] != e:
            cand = ggufio.GGUF()
            cand.__dict__.update(cur.__dict__)
            cand.tensors = [list(x) for x in cur.tensors]
            cand.tensors[idx] = list(base_t[e[0]])
            if ok(ggufio.serialize(cand)[0]):
                cur = cand
    if cur.data != ga.data and len(cur.data) != len(ga.data):
        cand = ggufio.GGUF()
        cand.__dict__.update(cur.__dict__)
        cand.data = ga.data
        if ok(ggufio.serialize(cand)[0]):
            cur = cand
    return ggufio.serialize(cur)[0]


RAW_MAX = 64 << 10


def _runs(a, b):
    """[[offset, base64 bytes]] where equal-length a differs from b (runs merged across gaps under 16 bytes)."""
    import base64

    runs, i = [], 0
    while i < len(a):
        if a[i] != b[i]:
            j = i
            while j < len(a) and (a[j] != b[j] or a[j:j + 16] != b[j:j + 16]):
                j += 1
            runs.append([i, base64.b64encode(a[i:j]).decode()])
            i = j
        else:
            i += 1
    return runs


def _apply_runs(base, runs):
    import base64

    out = bytearray(base)
    for off, b64 in runs:
        chunk = base64.b64decode(b64)
        out[off:off + len(chunk)] = chunk
    return bytes(out)


def _text_rle(text):
    """Text with runs of one character (>= 256) written as [char, count]: nesting bombs stay small on disk."""
    parts = re.split(r"((.)\2{255,})", text, flags=re.S)
    out = []
    i = 0
    while i < len(parts):
        if i % 3 == 0:
            if parts[i]:
                out.append(parts[i])
            i += 1
        else:
            out.append([parts[i][0], len(parts[i])])
            i += 2
    return out


def _encode(data, base, name=""):
    """One file of a saved case: text as is (long runs of one character run-length coded); binary as the changes
    to its base file (differing runs, after one insertion or deletion) when that is smaller, else whole (base64)."""
    import base64

    if (len(data) < RAW_MAX or name.endswith(".json") or name == "_METADATA") and not data.startswith((b"GGUF", b"PK")):
        try:
            text = data.decode("utf-8")
            rle = _text_rle(text)
            return {"text": text} if len(rle) == 1 and isinstance(rle[0], str) or not rle else {"text_rle": rle}
        except UnicodeDecodeError:
            pass
    best = {"b64": base64.b64encode(data).decode()}
    if base is not None:
        n = min(len(base), len(data))
        pre = 0
        while pre < n and base[pre] == data[pre]:
            pre += 1
        k = len(data) - len(base)
        if k >= 0:
            cand = {"aligned": {"at": pre, "insert": base64.b64encode(data[pre:pre + k]).decode(), "delete": 0,
                                "runs": _runs(data[pre + k:], base[pre:])}}
        else:
            cand = {"aligned": {"at": pre, "insert": "", "delete": -k, "runs": _runs(data[pre:], base[pre - k:])}}
        if len(json.dumps(cand)) < len(json.dumps(best)):
            best = cand
    return best


def _decode(v, base):
    import base64

    if "text" in v:
        return v["text"].encode("utf-8", "surrogatepass")
    if "text_rle" in v:
        return "".join(x if isinstance(x, str) else x[0] * x[1] for x in v["text_rle"]).encode("utf-8", "surrogatepass")
    if "aligned" in v:
        if base is None:
            raise ValueError("a patch needs its base file")
        a = v["aligned"]
        at = a["at"]
        return base[:at] + base64.b64decode(a["insert"]) + _apply_runs(base[at + a["delete"]:], a["runs"])
    return base64.b64decode(v["b64"])


def _manifest(fmt, base_id, files, seeds):
    base = seeds[base_id][0] if base_id in seeds else {}
    m = {"format": fmt, "base": base_id, "files": {}, "deleted": sorted(n for n in base if n not in files)}
    for n, d in sorted(files.items()):
        if base.get(n) != d:
            m["files"][n] = _encode(d, base.get(n), n)
    return json.dumps(m, indent=1, sort_keys=True).encode()


def case_to_file(fmt, base_id, files, seeds):
    """(file name suffix, bytes) of the single file a saved case is kept in: the case's own file when it is a
    small single-file case (a config.json, a meta.json), else a .case manifest over the seed that makes it
    smallest."""
    h = HARNESSES[fmt]
    for ext, (bid, fname) in h.raw_ext.items():
        rb = seeds.get(bid, ({},))[0]
        if fname in files and len(files[fname]) <= RAW_MAX and \
                {k: v for k, v in files.items() if k != fname} == {k: v for k, v in rb.items() if k != fname}:
            return ext, files[fname]
    cands = [s for s in seeds if s.startswith(h.seed_prefix)] or [base_id]
    best = min((_manifest(fmt, s, files, seeds) for s in cands), key=len)
    return ".case", best


def file_to_case(path, seeds):
    """A saved case -> (format, base id, files)."""
    fmt = os.path.basename(os.path.dirname(os.path.abspath(path)))
    h = HARNESSES[fmt]
    data = open(path, "rb").read()
    if path.endswith(".case"):
        m = json.loads(data)
        base_id = m["base"]
        base = seeds[base_id][0] if base_id in seeds else {}
        files = dict(base)
        for n in m.get("deleted", []):
            files.pop(n, None)
        for n, v in m["files"].items():
            files[n] = _decode(v, base.get(n))
        return fmt, base_id, files
    ext = os.path.splitext(path)[1]
    base_id, fname = h.raw_ext[ext]
    files = dict(seeds.get(base_id, ({},))[0])
    files[fname] = data
    return fmt, base_id, files


def known_signatures(save_dir):
    sigs = set()
    for root, _, names in os.walk(save_dir):
        for n in names:
            if n.endswith(".txt"):
                try:
                    first = open(os.path.join(root, n), encoding="utf-8", errors="replace").readline()
                except OSError:
                    continue
                m = re.search(r"\[sig (.*)\]\s*$", first)
                if m:
                    sigs.add(m.group(1))
    return sigs


def save_finding(save_dir, fmt, base_id, files, seeds, out, sig):
    ext, data = case_to_file(fmt, base_id, files, seeds)
    name = hashlib.sha1(data).hexdigest()
    d = os.path.join(save_dir, fmt)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, name + ext)
    with open(path, "wb") as f:
        f.write(data)
    base = seeds.get(base_id, ({},))[0]
    line = "%s %s at %s: %s | base %s | %s [sig %s]" % (out[0], out[1], out[3] or "?", " ".join(str(out[2]).split())[:300],
                                                       base_id, describe(base, files), sig)
    with open(os.path.join(d, name + ".txt"), "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(line.replace("\n", " ") + "\n")
    return path


# ---------------------------------------------------------------- the fuzzing loop

class Stats:
    def __init__(self):
        self.execs = 0
        self.by_class = {c: 0 for c in CLASSES}
        self.flaky = 0
        self.harness_errors = 0
        self.unique = {}          # signature -> count (findings only)
        self.seconds = 0.0      # fuzzing time (confirming and minimising findings excluded)
        self.busy = 0.0         # time spent confirming, minimising and saving findings
        self.saved = []

    def as_dict(self):
        return {"execs": self.execs, "classes": dict(self.by_class), "flaky": self.flaky,
                "harness_errors": self.harness_errors, "unique_findings": dict(self.unique),
                "seconds": round(self.seconds, 1), "finding_seconds": round(self.busy, 1),
                "saved": list(self.saved)}


def _print(msg):
    print(str(msg).encode("utf-8", "backslashreplace").decode("utf-8"), flush=True)


def fuzz_format(fmt, seconds, seeds, run_seed=0, jobs=None, save_dir=None, timeout=10.0, log=_print, max_corpus=400,
                minimise_s=20.0):
    """Fuzz one format for `seconds`; returns Stats. Findings are confirmed in a fresh child, minimised and saved
    into save_dir/<fmt>/ (one per distinct signature) unless save_dir is None."""
    jobs = jobs or max(1, len(os.sched_getaffinity(0)))
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="gemmalens-fuzz-%s-" % fmt, dir=shm)
    runner = Runner(fmt, seeds, workdir, timeout)
    if not runner.corpus:
        log("%s: no seeds (skipped)" % fmt)
        shutil.rmtree(workdir, ignore_errors=True)
        return Stats()
    st = Stats()
    seen = set()
    confirmed = known_signatures(save_dir) if save_dir else set()
    confirmed_here = set()
    workers = []
    batch_no = 0
    batch_size = 16
    t0 = time.monotonic()
    deadline = t0 + seconds
    last_report = t0
    pending = []   # suspects: (files, base_id, out from batch, signature)

    def record(files, base_id, out, sig):
        st.unique[sig] = st.unique.get(sig, 0) + 1
        if sig in confirmed_here or sig in confirmed:
            return
        confirmed_here.add(sig)
        log("  [%s] NEW %s" % (fmt, sig))
        if save_dir:
            base = seeds[base_id][0]
            small = minimise(runner, base, files, out, budget_s=minimise_s) if minimise_s > 0 else files
            again = runner.solo(small)
            if not _same(again, out):
                small = files
                again = out
            path = save_finding(save_dir, fmt, base_id, small, seeds, again, sig)
            st.saved.append(path)
            log("  [%s]   saved %s" % (fmt, os.path.relpath(path)))

    def handle_suspect(files, base_id, out, earlier=()):
        """A finding seen in a batch: re-run alone in a fresh child to confirm (crashes: also the cases before it)."""
        sig = signature(fmt, out[0], out[1], out[2], out[3], runner.workdir)
        if sig in confirmed_here or sig in confirmed:
            st.by_class[out[0]] += 1
            st.unique[sig] = st.unique.get(sig, 0) + 1
            return
        again = runner.solo(files)
        if again[0] in FINDINGS:
            if again[0] in ("crash", "hang") or not _same(again, out):
                out = again
            if out[0] == "alloc" and out[1] == "RSS" and out[3] in ("", "?"):
                # Where was it allocated? Again with the data segment capped at the allowance: the allocation
                # then fails where it happens.
                capped = runner.solo(files, case_cap=True)
                if capped[0] != "ok" and capped[1] != "RSS" and capped[3]:
                    out = (out[0], out[1], "%s (capped at the allowance: %s %s)" % (out[2], capped[1], capped[2][:120]),
                           capped[3])
            sig = signature(fmt, out[0], out[1], out[2], out[3], runner.workdir)
            st.by_class[out[0]] += 1
            record(files, base_id, out, sig)
            return
        if out[0] == "crash" and earlier:
            # Heap damage done by an earlier case of the batch may surface later: try them one per child.
            corpus, snap, keys = earlier
            for key in keys[::-1]:
                f2, b2 = gen_case(runner.h, corpus, snap, key)
                o2 = runner.solo(f2)
                if o2[0] == "crash":
                    st.by_class["crash"] += 1
                    record(f2, b2, o2, signature(fmt, o2[0], o2[1], o2[2], o2[3]))
                    return
        st.flaky += 1
        st.by_class[again[0] if again[0] in CLASSES else "expected"] += 1
        log("  [%s] unconfirmed %s (alone: %s %s)" % (fmt, sig, again[0], again[1]))

    try:
        while True:
            now = time.monotonic()
            while len(workers) < jobs and now < deadline:
                batch_no += 1
                keys = ["%d:%s:%d:%d" % (run_seed, fmt, batch_no, i) for i in range(batch_size)]
                workers.append(runner.spawn(keys=keys, snap=len(runner.corpus), batch=batch_no))
            if not workers:
                break
            ready, _, _ = select.select([w.rfd for w in workers], [], [], 0.1)
            now = time.monotonic()
            for wk in list(workers):
                alive = True
                if wk.rfd in ready:
                    alive = wk.read()
                for m in wk.msgs:
                    if m[0] == "S":
                        wk.current, wk.t_case = m[1], time.monotonic()
                    elif m[0] == "H":
                        st.harness_errors += 1
                        if st.harness_errors <= 5:
                            log("  [%s] harness error: %s" % (fmt, m[2]))
                    elif m[0] == "D":
                        i, out = m[1], m[2]
                        wk.current = None
                        wk.done += 1
                        st.execs += 1
                        cls = out[0]
                        if cls in FINDINGS:
                            files, base_id = gen_case(runner.h, wk.corpus, wk.snap, wk.keys[i])
                            pending.append((files, base_id, out, ()))
                        else:
                            st.by_class[cls] += 1
                            sig = signature(fmt, *out[:4], root=wk.root)
                            if sig not in seen:
                                # A new outcome (a new error message shape): keep the case as a corpus entry.
                                seen.add(sig)
                                files, base_id = gen_case(runner.h, wk.corpus, wk.snap, wk.keys[i])
                                entry = ("%s+%s" % (base_id, sig[:40]), files, False)
                                if len(runner.corpus) < max_corpus:
                                    runner.corpus.append(entry)
                                else:  # replace one derived entry, in a new list: running children keep theirs
                                    n_seeds = sum(1 for c in runner.corpus if c[2])
                                    runner.corpus = list(runner.corpus)
                                    slot = zlib.crc32(sig.encode("utf-8", "surrogatepass")) % (len(runner.corpus) - n_seeds)
                                    runner.corpus[n_seeds + slot] = entry
                if wk.msgs:
                    wk.t_last = now
                wk.msgs = []
                timed_out = wk.current is not None and now - wk.t_case > runner.timeout
                if wk.current is None and now - wk.t_last > 3 * runner.timeout + 10:
                    # Silent outside a case: the fuzzer's own case generation is stuck. Not a finding.
                    st.harness_errors += 1
                    log("  [%s] harness error: a child generated no case for %.0f s" % (fmt, now - wk.t_last))
                    runner.finish(wk, kill=True)
                    workers.remove(wk)
                    runner.fault_text(wk)
                    continue
                if not alive or timed_out:
                    runner.finish(wk, kill=timed_out)
                    workers.remove(wk)
                    ft = runner.fault_text(wk)
                    if wk.current is not None:
                        i = wk.current
                        st.execs += 1
                        files, base_id = gen_case(runner.h, wk.corpus, wk.snap, wk.keys[i])
                        earlier = () if timed_out else (wk.corpus, wk.snap, wk.keys[max(0, i - 64):i])
                        if timed_out:
                            out = ("hang", "timeout", "no result after %.0f s" % runner.timeout, _fault_frame(ft))
                        elif os.WIFSIGNALED(wk.status):
                            sig_name = signal.Signals(os.WTERMSIG(wk.status)).name
                            out = ("crash", sig_name, "killed by " + sig_name, _fault_frame(ft))
                        else:
                            out = ("crash", "exit%d" % os.waitstatus_to_exitcode(wk.status), "child exited", _fault_frame(ft))
                        pending.append((files, base_id, out, earlier))
                    # Batch size: aim at ~1 s per child.
                    el = time.monotonic() - wk.t_start
                    if wk.done == len(wk.keys) and el > 0:
                        batch_size = int(min(2000, max(4, batch_size * min(2.0, max(0.5, 1.0 / el)))))
            if pending:
                # Time spent on findings does not count against the fuzzing budget (up to the budget again).
                tb = time.monotonic()
                while pending:
                    files, base_id, out, earlier = pending.pop(0)
                    handle_suspect(files, base_id, out, earlier)
                spent = time.monotonic() - tb
                st.busy += spent
                extend = min(spent, seconds - (deadline - t0 - seconds))
                if extend > 0:
                    deadline += extend
            if now - last_report > 30:
                last_report = now
                log("  [%s] %.0f s: %d execs (%.0f/s), %s" % (fmt, now - t0, st.execs, st.execs / max(1e-9, now - t0),
                                                             _summary(st)))
    finally:
        for wk in workers:
            runner.finish(wk, kill=True)
        shutil.rmtree(workdir, ignore_errors=True)
    st.seconds = max(1e-9, time.monotonic() - t0 - st.busy)
    return st


def _summary(st):
    return ", ".join("%s %d" % (c, st.by_class[c]) for c in CLASSES if st.by_class[c]) + (
        ", unconfirmed %d" % st.flaky if st.flaky else "")


def table(results):
    """Per-format table of a run."""
    cols = ["format", "execs", "execs/s", "ok", "expected", "bug", "crash", "hang", "alloc", "unique", "unconfirmed"]
    rows = []
    for fmt, st in results.items():
        rows.append([fmt, st.execs, "%.0f" % (st.execs / st.seconds if st.seconds else 0)] +
                    [st.by_class[c] for c in CLASSES] + [len(st.unique), st.flaky])
    w = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    lines = ["  ".join(str(c).rjust(w[i]) for i, c in enumerate(cols))]
    lines += ["  ".join(str(c).rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- regression corpus

def corpus_files(crasher_dir=CRASHERS):
    out = []
    for fmt in FORMATS:
        d = os.path.join(crasher_dir, fmt)
        if os.path.isdir(d):
            out += [os.path.join(d, n) for n in sorted(os.listdir(d)) if not n.endswith(".txt")]
    return out


def replay(paths=None, seeds=None, timeout=10.0, log=_print, include_seeds=True):
    """Run every seed and every saved case alone in a fresh child: {case id: outcome dict}."""
    seeds = seeds if seeds is not None else load_seeds()
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="gemmalens-replay-", dir=shm)
    results = {}
    runners = {}
    try:
        items = []
        if include_seeds:
            items += [("seed:" + sid, sid.split("/")[0], files) for sid, (files, _) in seeds.items()]
        for p in (paths if paths is not None else corpus_files()):
            try:
                fmt, base_id, files = file_to_case(p, seeds)
            except Exception as e:
                results[os.path.relpath(p)] = {"class": "harness", "type": type(e).__name__, "message": str(e), "where": ""}
                continue
            if base_id not in seeds:  # e.g. orbax/real where orbax-checkpoint is not installed
                results[os.path.relpath(p)] = {"class": "skip", "type": "", "where": "",
                                               "message": "its base seed %s was not generated here" % base_id}
                continue
            items.append((os.path.relpath(p), fmt, files))
        for cid, fmt, files in items:
            if fmt not in runners:
                runners[fmt] = Runner(fmt, seeds, workdir, timeout)
            out = runners[fmt].solo(files)
            results[cid] = {"class": out[0], "type": out[1], "message": str(out[2])[:500], "where": out[3]}
            log("%-9s %-70s %s %s %s" % (out[0], cid, out[1], out[3], " ".join(str(out[2]).split())[:120]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results
