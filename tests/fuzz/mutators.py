"""Format-agnostic mutators: bytes (flips, interesting integers, chunks, truncation, splicing) and JSON
(structure-aware: extreme values, wrong types, deep nesting, raw tokens Python's json cannot write, invalid UTF-8).

Every mutator takes a ``random.Random`` and is deterministic given its state, so a case can be regenerated
from (corpus snapshot, case seed) alone."""
import json
import math
import struct

# ---------------------------------------------------------------- interesting values

INTERESTING_INTS = [
    0, 1, -1, 2, 3, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096, 65535, 65536,
    2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32 - 1, 2**32, 2**32 + 1, 2**40, 2**40 + 1, 2**53, 2**62, 2**63 - 1, 2**63,
    -2**63, 2**64 - 1, -2, -3, -16, -64, -256, -65536, 10**9, 10**12, 10**18,
]
INTERESTING_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e308, -1e308, 3.4028235e38, 1e39, -1e39, 1e-45,
                      float("nan"), float("inf"), float("-inf"), 2.0**31, 2.0**63, 2.0**64]

_WIDTHS = {1: "B", 2: "H", 4: "I", 8: "Q"}


def pack_int(value, width):
    """Little-endian two's-complement encoding of value truncated to width bytes."""
    return struct.pack("<" + _WIDTHS[width], value & ((1 << (8 * width)) - 1))


def interesting_int(rng, width=8):
    """An interesting value, or a small random perturbation of one, for a field of width bytes."""
    v = rng.choice(INTERESTING_INTS)
    r = rng.random()
    if r < 0.15:
        v += rng.randint(-4, 4)
    elif r < 0.25:
        v = rng.getrandbits(8 * width)
    elif r < 0.3:
        v = 1 << rng.randrange(8 * width)
    return v


# ---------------------------------------------------------------- byte mutators


def _pos(rng, n, hot):
    """An offset in [0, n): mostly inside the hot range [hot[0], hot[1]) (headers), sometimes anywhere."""
    if n <= 0:
        return 0
    if hot and hot[1] > hot[0] and rng.random() < 0.85:
        lo, hi = max(0, hot[0]), min(n, hot[1])
        if hi > lo:
            return rng.randrange(lo, hi)
    return rng.randrange(n)


def flip_bits(b, rng, hot=None):
    b = bytearray(b)
    for _ in range(rng.choice((1, 1, 1, 2, 4, 8))):
        if b:
            p = _pos(rng, len(b), hot)
            b[p] ^= 1 << rng.randrange(8)
    return bytes(b)


def set_bytes(b, rng, hot=None):
    b = bytearray(b)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        if b:
            b[_pos(rng, len(b), hot)] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
    return bytes(b)


def write_int(b, rng, hot=None):
    """An interesting integer (1/2/4/8 bytes, usually aligned to its width) written over the bytes."""
    if not b:
        return b
    width = rng.choice((1, 2, 4, 4, 8, 8, 8))
    p = _pos(rng, len(b), hot)
    if rng.random() < 0.75:
        p -= p % width
    v = pack_int(interesting_int(rng, width), width)
    out = bytearray(b)
    out[p:p + width] = v
    return bytes(out[: max(len(b), p + width)])


def arith(b, rng, hot=None):
    """Add a small delta to a little-endian integer at some offset."""
    if len(b) < 8:
        return flip_bits(b, rng, hot)
    width = rng.choice((1, 2, 4, 8))
    p = _pos(rng, len(b) - width, hot)
    v = int.from_bytes(b[p:p + width], "little") + rng.choice((-1, 1)) * rng.randint(1, 35)
    return b[:p] + pack_int(v, width) + b[p + width:]


def truncate(b, rng, hot=None):
    if not b:
        return b
    r = rng.random()
    if r < 0.3:
        return b[: rng.randrange(len(b))]
    if r < 0.5:
        return b[: max(0, len(b) - rng.randint(1, 64))]
    return b[: _pos(rng, len(b), hot)]


def delete_chunk(b, rng, hot=None):
    if len(b) < 2:
        return b
    p = _pos(rng, len(b), hot)
    n = rng.choice((1, 2, 4, 8, 16, rng.randint(1, 256)))
    return b[:p] + b[p + n:]


def insert_chunk(b, rng, hot=None):
    p = _pos(rng, len(b) + 1, hot)
    r = rng.random()
    if r < 0.4 and b:
        q = rng.randrange(len(b))
        chunk = b[q:q + rng.randint(1, 64)]
    elif r < 0.7:
        chunk = bytes([rng.choice((0, 0xFF, 0x41))]) * rng.choice((1, 4, 8, 64, 1024, 65536))
    else:
        chunk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return b[:p] + chunk + b[p:]


def duplicate_chunk(b, rng, hot=None):
    if not b:
        return b
    p = _pos(rng, len(b), hot)
    chunk = b[p:p + rng.randint(1, 128)]
    return b[:p] + chunk * rng.randint(2, 8) + b[p:]


def bad_utf8(b, rng, hot=None):
    """Invalid UTF-8 (lone continuation bytes, overlongs, surrogates) written into the bytes."""
    seq = rng.choice((b"\xff", b"\xfe\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"))
    p = _pos(rng, len(b) + 1, hot)
    if rng.random() < 0.5:
        return b[:p] + seq + b[p + len(seq):]
    return b[:p] + seq + b[p:]


def splice(a, b, rng):
    """Prefix of a + suffix of b."""
    if not a or not b:
        return a or b
    return a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b)):]


BYTE_MUTATORS = [(flip_bits, 4), (set_bytes, 3), (write_int, 6), (arith, 2), (truncate, 2), (delete_chunk, 2),
                 (insert_chunk, 2), (duplicate_chunk, 1), (bad_utf8, 1)]


def weighted(rng, table):
    total = sum(w for _, w in table)
    x = rng.random() * total
    for item, w in table:
        x -= w
        if x < 0:
            return item
    return table[-1][0]


def mutate_bytes(b, rng, hot=None, n=None):
    """One to a few stacked byte mutations."""
    for _ in range(n or rng.choice((1, 1, 1, 2, 2, 3, 5))):
        b = weighted(rng, BYTE_MUTATORS)(b, rng, hot)
    return b


# ---------------------------------------------------------------- JSON mutators

# Raw JSON text that Python's json module cannot produce (or that only some parsers accept): written in place of
# a sentinel string after serialisation.
RAW_TOKENS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "18446744073709551616", "18446744073709551615",
    "-9223372036854775809", "9223372036854775808", "4294967296", "2147483648", "-2147483649", "1.5e9", "1E2", "-0",
    "0.0", "1.0", "2.5", "01", "+1", "0x10", ".5", "1.", "tru", "nul", "\"\\ud800\"", "\"\\u0000\"", "\"\\uDFFF\\uD800\"",
    "[" * 3000 + "]" * 3000, "{\"a\":" * 2000 + "1" + "}" * 2000, "[" * 100000 + "]" * 100000, "",
]
_SENTINEL = "\u0001raw{}\u0001"
_BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80\x80"]


def _paths(obj, path=(), out=None, depth=0):
    """Every (path, value) in a JSON tree (bounded)."""
    if out is None:
        out = []
    out.append((path, obj))
    if depth > 12 or len(out) > 4000:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _paths(v, path + (k,), out, depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:64]):
            _paths(v, path + (i,), out, depth + 1)
    return out


def _set(obj, path, value):
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return obj


def _delete(obj, path):
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]
    return obj


class JsonMutation:
    """Accumulates raw-token / bad-UTF-8 substitutions to apply after serialisation."""

    def __init__(self):
        self.raw, self.bad = [], []

    def raw_value(self, token):
        self.raw.append(token)
        return _SENTINEL.format(len(self.raw) - 1)

    def bad_string(self, rng, base="x"):
        self.bad.append(rng.choice(_BAD_UTF8))
        return base + _SENTINEL.format("b%d" % (len(self.bad) - 1))

    def dumps(self, obj, rng):
        try:
            text = json.dumps(obj, indent=rng.choice((None, 2)), allow_nan=True, ensure_ascii=rng.random() < 0.5)
        except (ValueError, TypeError, RecursionError):
            text = "{}"
        data = text.encode("utf-8", "surrogatepass")
        for i, tok in enumerate(self.raw):
            data = data.replace(json.dumps(_SENTINEL.format(i), ensure_ascii=False).encode(), tok.encode())
            data = data.replace(json.dumps(_SENTINEL.format(i)).encode(), tok.encode())
        for i, seq in enumerate(self.bad):
            s = _SENTINEL.format("b%d" % i)
            data = data.replace(json.dumps(s, ensure_ascii=False)[1:-1].encode(), seq)
            data = data.replace(json.dumps(s)[1:-1].encode(), seq)
        return data


def random_json_value(rng, jm, depth=0):
    r = rng.random()
    if r < 0.3:
        return interesting_int(rng)
    if r < 0.4:
        return rng.choice(INTERESTING_FLOATS)
    if r < 0.55:
        return jm.raw_value(rng.choice(RAW_TOKENS))
    if r < 0.65:
        return rng.choice(["", "a", "linear", "default", "none", "yarn", "jumprelu", "topk", "float32", "F32", "BF16",
                           "\u2581", "x" * rng.choice((1, 100, 100000)), "model.layers.0.output", "blocks.0.hook_resid_post",
                           "../../etc/passwd", "/", "\x00"])
    if r < 0.7:
        return jm.bad_string(rng)
    if r < 0.75:
        return rng.choice((None, True, False))
    if r < 0.85 and depth < 3:
        return [random_json_value(rng, jm, depth + 1) for _ in range(rng.choice((0, 1, 2, 5)))]
    if r < 0.9:
        return [rng.choice((0, 1, -1, 2**31))] * rng.choice((100, 1000, 20000))
    if depth < 3:
        return {rng.choice(("a", "factor", "rope_type", "key", "")): random_json_value(rng, jm, depth + 1)
                for _ in range(rng.choice((0, 1, 2)))}
    return {}


HAZARD_PAIRS = [(-2**31, -1), (-2**63, -1), (0, 0), (1, 0), (64, 0), (-1, -1), (2**31 - 1, 2), (2**31 - 1, 2**31 - 1),
                (-2**31, 2**31 - 1), (7, 3), (2**16, 2**16), (1, -2**31)]


def hazard_pair(rng):
    """Two integers that break arithmetic done on a pair of fields: a / b with b = 0 or (INT_MIN, -1), a * b past
    32 or 64 bits, a % b with non-divisors."""
    a, b = rng.choice(HAZARD_PAIRS)
    return (a, b) if rng.random() < 0.7 else (b, a)


def mutate_json_obj(obj, rng, jm, keys=(), values=None):
    """One structural mutation of a parsed JSON tree; returns the new tree.

    keys: field names the target reads (added or replaced); values: {key: [plausible values]} near-misses."""
    paths = _paths(obj)
    path, val = rng.choice(paths)
    r = rng.random()
    ints = [p for p, v in paths if p and isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) >= 2 and rng.random() < 0.12:
        # Two integer fields at once (a hazard pair), and sometimes one more field gone (defaults computed from
        # the others then come into play).
        p1, p2 = rng.sample(ints, 2)
        a, b = hazard_pair(rng)
        _set(obj, p1, a)
        _set(obj, p2, b)
        if rng.random() < 0.5:
            others = [p for p, v in paths if p and p not in (p1, p2) and p1[: len(p)] != p and p2[: len(p)] != p]
            if others:
                try:
                    _delete(obj, rng.choice(others))
                except (KeyError, IndexError, TypeError):
                    pass
        return obj
    if r < 0.35 or not path:
        # Replace a value: near the original's type most of the time (keeps the rest of the file valid).
        if isinstance(val, bool) or val is None:
            new = random_json_value(rng, jm)
        elif isinstance(val, int):
            new = rng.choice((interesting_int(rng), -val, val * rng.choice((2, 16, 2**16, 2**31)), val + rng.randint(-3, 3),
                              float(val), str(val), jm.raw_value(rng.choice(RAW_TOKENS)), random_json_value(rng, jm)))
        elif isinstance(val, float):
            new = rng.choice((rng.choice(INTERESTING_FLOATS), -val, int(val) if math.isfinite(val) else 0, str(val),
                              jm.raw_value(rng.choice(RAW_TOKENS)), random_json_value(rng, jm)))
        elif isinstance(val, str):
            k = path[-1] if path else None
            cands = list((values or {}).get(k, ())) if isinstance(k, str) else []
            new = rng.choice(cands + [val + "x", val[: len(val) // 2], val.upper(), jm.bad_string(rng, val[:5]), "",
                                      random_json_value(rng, jm), val * 50])
        elif isinstance(val, list):
            new = rng.choice((val[::-1], val[:-1], val + val[-1:], [], val * rng.choice((2, 100)),
                              [interesting_int(rng)] * len(val), random_json_value(rng, jm)))
        else:
            new = random_json_value(rng, jm)
        if not path:
            return new if rng.random() < 0.3 else obj
        return _set(obj, path, new)
    if r < 0.5 and path:
        return _delete(obj, path)
    if r < 0.7:
        # Add or overwrite a known key somewhere that is a dict.
        dicts = [p for p, v in paths if isinstance(v, dict)]
        if dicts and keys:
            p = rng.choice(dicts)
            k = rng.choice(list(keys))
            cands = list((values or {}).get(k, ()))
            v = rng.choice(cands) if cands and rng.random() < 0.5 else random_json_value(rng, jm)
            target = obj
            for x in p:
                target = target[x]
            target[k] = v
        return obj
    if r < 0.8:
        # Wrap a value in lists / dicts (wrong type with the right content), or nest deeply.
        depth = rng.choice((1, 1, 2, 3, 40))
        new = val
        for _ in range(depth):
            new = [new] if rng.random() < 0.7 else {"value": new}
        try:
            return _set(obj, path, new) if path else new
        except RecursionError:
            return obj
    if r < 0.9 and path and isinstance(path[-1], str):
        # Rename a key: near-miss spelling, invalid UTF-8, empty.
        parent = obj
        for x in path[:-1]:
            parent = parent[x]
        v = parent.pop(path[-1])
        k = path[-1]
        newk = rng.choice((k.upper(), k + " ", "", k[:-1], jm.bad_string(rng, k[:3]), "__metadata__", k + "\u2581"))
        parent[newk] = v
        return obj
    # Swap two values.
    (p1, v1), (p2, v2) = rng.choice(paths), rng.choice(paths)
    if p1 and p2 and not (p1[: len(p2)] == p2 or p2[: len(p1)] == p1):
        _set(obj, p1, v2)
        _set(obj, p2, v1)
    return obj


def mutate_json_bytes(data, rng, keys=(), values=None, n=None):
    """Structure-aware JSON mutation with a byte-level fallback for unparseable input."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return mutate_bytes(data, rng)
    jm = JsonMutation()
    for _ in range(n or rng.choice((1, 1, 1, 2, 3))):
        try:
            obj = mutate_json_obj(obj, rng, jm, keys, values)
        except (KeyError, IndexError, TypeError, RecursionError):
            pass
    out = jm.dumps(obj, rng)
    if rng.random() < 0.05:  # duplicate keys (last one wins in Python, first or error elsewhere)
        i = out.find(b"{")
        if i >= 0:
            j = out.find(b",", i)
            if j > i:
                out = out[: i + 1] + out[i + 1:j] + b"," + out[i + 1:]
    return out
