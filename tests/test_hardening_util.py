"""Helpers for child processes of test_hardening.py (importable without pytest)."""


def vm_hwm_kib():
    """Peak resident memory of this process image (VmHWM, reset by exec, unlike ru_maxrss), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")
