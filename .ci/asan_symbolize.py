#!/usr/bin/env python3
""".ci/sanitize.sh helper: symbolize a sanitizer report written with ASAN_OPTIONS=symbolize=0.

Frames "#N 0xPC  (MODULE+0xOFF)" get "in FUNC FILE:LINE" from addr2line (inlined callers on lines of their own);
runs of one repeated frame (a stack overflow) are folded. Frames addr2line cannot name are left as they are."""
import collections
import re
import shutil
import subprocess
import sys

FRAME = re.compile(r"^(\s*)#(\d+) (0x[0-9a-f]+)\s+\((.+)\+(0x[0-9a-f]+)\)\s*$")


def addr2line(module, offsets):
    """offset -> [(func, file:line), ...] innermost first."""
    exe = shutil.which("addr2line")
    if not exe or not offsets:
        return {}
    try:
        out = subprocess.run([exe, "-f", "-C", "-i", "-p", "-e", module, *offsets], capture_output=True, text=True,
                             timeout=120).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    res, i = {}, -1
    for line in out:
        inlined = line.startswith(" (inlined by) ")
        if not inlined:
            i += 1
            if i >= len(offsets):
                break
            res[offsets[i]] = []
        text = line[len(" (inlined by) "):] if inlined else line
        func, _, loc = text.partition(" at ")
        res[offsets[i]].append((func.strip(), loc.strip()))
    return res


def main(path):
    lines = open(path, errors="replace").read().splitlines()
    wanted = collections.defaultdict(list)
    for line in lines:
        m = FRAME.match(line)
        if m and m.group(5) not in wanted[m.group(4)]:
            wanted[m.group(4)].append(m.group(5))
    syms = {mod: addr2line(mod, offs) for mod, offs in wanted.items()}
    out, prev, repeat = [], None, 0
    for line in lines:
        m = FRAME.match(line)
        if not m:
            if repeat:
                out.append("    ... the frame above repeated %d more times" % repeat)
            prev, repeat = None, 0
            out.append(line)
            continue
        key = (m.group(4), m.group(5))
        if key == prev:
            repeat += 1
            continue
        if repeat:
            out.append("    ... the frame above repeated %d more times" % repeat)
        prev, repeat = key, 0
        indent, n, pc, mod, off = m.groups()
        chain = [(f, loc) for f, loc in syms.get(mod, {}).get(off, []) if f != "??"]
        if not chain:
            out.append(line)
            continue
        for k, (func, loc) in enumerate(chain):
            where = "" if loc.startswith("??") else " " + loc
            tag = "#%s %s in" % (n, pc) if k == 0 else "#%s %s (inlined into)" % (n, " " * len(pc))
            out.append("%s%s %s%s (%s+%s)" % (indent, tag, func, where, mod, off) if k == 0 else
                       "%s%s %s%s" % (indent, tag, func, where))
    if repeat:
        out.append("    ... the frame above repeated %d more times" % repeat)
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
