"""OpenMP's waiting policy, chosen before libgomp starts (it reads its environment once, when it is loaded).

libgomp's default: a worker that waits (at a barrier, or for the next parallel region) spins about 300000 times,
milliseconds, before it sleeps. On a machine whose cores are busy with other processes, the spinning worker holds a
core that the worker it waits for needs: a bf16 decode with all cores measured 4-40x slower than with one thread
(README, "Threads"). A spin of SPINCOUNT iterations (tens of microseconds) keeps nearly all of the speed of an idle
machine and sleeps soon enough on a busy one. The user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT always wins.
"""
import os
import warnings

# libgomp's spin iterations before a waiting thread sleeps (its default is 300000; OMP_WAIT_POLICY=passive is 0).
# 3000: on an Intel Xeon VM (2026-11-27) 300 let the workers of a decode step fall asleep between parallel regions,
# and waking them cost a third of int8 decode (48 -> 62-68 tok/s at 3000; the CLI 43 -> 64-70); busy-loop
# competitors did not make it lose to one thread (README, "Threads").
SPINCOUNT = "3000"

# What configure() found: "set" (gemmalens set GOMP_SPINCOUNT), "user" (the environment already chose a policy),
# "late" (a libgomp was loaded before gemmalens, by torch or another library: its policy is already fixed).
state = None


def _libgomp_loaded():
    """Whether a libgomp that oneDNN would bind to (soname libgomp.so.1) is already mapped into this process.
    Bundled copies under a private name (sentencepiece.libs/libgomp-<hash>.so) are separate runtimes and do not count."""
    try:
        with open("/proc/self/maps") as f:
            return any(os.path.basename(line.split()[-1]).startswith("libgomp.so.1") for line in f if "libgomp" in line)
    except OSError:  # not Linux: no /proc
        return False


def configure():
    global state
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        state = "user"
    elif _libgomp_loaded():
        state = "late"
        if (os.cpu_count() or 1) > 1:
            warnings.warn(
                "gemmalens: OpenMP (libgomp) was started before gemmalens, by torch or another library, with its "
                "default spin-waiting: on a machine whose cores are busy with other processes, running on all cores "
                "can be several times slower than threads=1. Import gemmalens before torch, or set GOMP_SPINCOUNT="
                f"{SPINCOUNT} in the environment before torch is imported (README, 'Threads').", RuntimeWarning,
                stacklevel=3)
    else:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        state = "set"
    return state
