"""A small GGUF (v2/v3) reader and writer of its own, for structure-aware mutation: the file as a list of
metadata (key, type, value) and tensor infos, written back with a map of where every numeric field went (so a
mutator can lie about one length, count, dimension, type or offset and leave the rest consistent)."""
import struct

from .mutators import INTERESTING_FLOATS, interesting_int, pack_int

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B", U64: "<Q", I64: "<q",
           F64: "<d"}
INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)


class GGUF:
    def __init__(self):
        self.version = 3
        self.kv = []        # [key(bytes), type, value]; ARRAY value = (elem_type, [values])
        self.tensors = []   # [name(bytes), dims [int], type, offset]
        self.data = b""     # the tensor data section (after alignment padding)
        self.alignment = 32


class ParseError(Exception):
    pass


def _read_value(b, pos, t, depth=0):
    if t in _SCALAR:
        fmt = _SCALAR[t]
        n = struct.calcsize(fmt)
        if pos + n > len(b):
            raise ParseError("eof")
        return struct.unpack_from(fmt, b, pos)[0], pos + n
    if t == STRING:
        if pos + 8 > len(b):
            raise ParseError("eof")
        n = struct.unpack_from("<Q", b, pos)[0]
        if pos + 8 + n > len(b):
            raise ParseError("eof")
        return b[pos + 8:pos + 8 + n], pos + 8 + n
    if t == ARRAY:
        if depth > 4 or pos + 12 > len(b):
            raise ParseError("array")
        et, count = struct.unpack_from("<IQ", b, pos)
        pos += 12
        if count > len(b) - pos:
            raise ParseError("count")
        vals = []
        for _ in range(count):
            v, pos = _read_value(b, pos, et, depth + 1)
            vals.append(v)
        return (et, vals), pos
    raise ParseError("type %d" % t)


def parse(b):
    """bytes -> GGUF (ParseError if it is not a well-formed GGUF)."""
    if len(b) < 24 or b[:4] != b"GGUF":
        raise ParseError("magic")
    g = GGUF()
    g.version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)
    if n_t > len(b) or n_kv > len(b):
        raise ParseError("counts")
    pos = 24
    for _ in range(n_kv):
        key, pos = _read_value(b, pos, STRING)
        if pos + 4 > len(b):
            raise ParseError("eof")
        t = struct.unpack_from("<I", b, pos)[0]
        v, pos = _read_value(b, pos + 4, t)
        g.kv.append([key, t, v])
        if key == b"general.alignment" and t in INT_TYPES and v > 0:
            g.alignment = v
    for _ in range(n_t):
        name, pos = _read_value(b, pos, STRING)
        if pos + 4 > len(b):
            raise ParseError("eof")
        nd = struct.unpack_from("<I", b, pos)[0]
        pos += 4
        if nd > 8 or pos + 8 * nd + 12 > len(b):
            raise ParseError("dims")
        dims = list(struct.unpack_from("<%dQ" % nd, b, pos))
        pos += 8 * nd
        t, off = struct.unpack_from("<IQ", b, pos)
        pos += 12
        g.tensors.append([name, dims, t, off])
    align = g.alignment if 0 < g.alignment < 1 << 20 else 32
    start = (pos + align - 1) // align * align
    g.data = b[start:]
    return g


def _write_value(out, fields, t, v, where):
    if t in _SCALAR:
        fields.append((len(out), struct.calcsize(_SCALAR[t]), where, t))
        try:
            out += struct.pack(_SCALAR[t], v)
        except OverflowError:  # a double too large for f32: its infinity
            out += struct.pack(_SCALAR[t], float("inf") if v > 0 else float("-inf"))
    elif t == STRING:
        fields.append((len(out), 8, where + ":strlen", U64))
        out += struct.pack("<Q", len(v)) + v
    elif t == ARRAY:
        et, vals = v
        fields.append((len(out), 4, where + ":elemtype", U32))
        fields.append((len(out) + 4, 8, where + ":count", U64))
        out += struct.pack("<IQ", et, len(vals))
        for i, x in enumerate(vals):
            _write_value(out, fields, et, x, where + "[%d]" % min(i, 3) if i < 4 else where + "[*]")
    else:
        raise ParseError("type %d" % t)


def serialize(g):
    """GGUF -> (bytes, fields): fields = [(offset, width, description, value type)] of every numeric field."""
    out = bytearray(b"GGUF")
    fields = [(4, 4, "version", U32), (8, 8, "n_tensors", U64), (16, 8, "n_kv", U64)]
    out += struct.pack("<IQQ", g.version, len(g.tensors), len(g.kv))
    for key, t, v in g.kv:
        k = key.decode("utf-8", "replace")
        fields.append((len(out), 8, "kv:" + k + ":keylen", U64))
        out += struct.pack("<Q", len(key)) + key
        fields.append((len(out), 4, "kv:" + k + ":type", U32))
        out += struct.pack("<I", t)
        _write_value(out, fields, t, v, "kv:" + k)
    for name, dims, t, off in g.tensors:
        n = name.decode("utf-8", "replace")
        fields.append((len(out), 8, "t:" + n + ":namelen", U64))
        out += struct.pack("<Q", len(name)) + name
        fields.append((len(out), 4, "t:" + n + ":ndims", U32))
        out += struct.pack("<I", len(dims))
        for i, d in enumerate(dims):
            fields.append((len(out), 8, "t:%s:dim%d" % (n, i), U64))
            out += pack_int(d, 8)
        fields.append((len(out), 4, "t:" + n + ":type", U32))
        fields.append((len(out) + 4, 8, "t:" + n + ":offset", U64))
        out += pack_int(t, 4) + pack_int(off, 8)
    align = g.alignment if 0 < g.alignment < 1 << 20 else 32
    out += b"\0" * ((-len(out)) % align)
    header_end = len(out)
    out += g.data
    return bytes(out), fields, header_end


# ---------------------------------------------------------------- structure-aware mutation

GGML_TYPES = list(range(0, 42)) + [0x7FFFFFFF, 0xFFFFFFFF, 1000]
GEMMA3_KEYS = [
    "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count", "gemma3.feed_forward_length",
    "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
    "gemma3.attention.value_length", "gemma3.attention.layer_norm_rms_epsilon", "gemma3.attention.sliding_window",
    "gemma3.rope.freq_base", "gemma3.rope.scaling.type", "gemma3.rope.scaling.factor", "general.alignment",
    "general.architecture", "gemma3.final_logit_softcapping", "gemma3.attn_logit_softcapping",
    "gemma3.attention.sliding_window_pattern",
]
TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token",
]


def _random_scalar(rng, t):
    if t in (F32, F64):
        return rng.choice(INTERESTING_FLOATS)
    if t == BOOL:
        return rng.choice((0, 1, 2, 255))
    if t == STRING:
        return rng.choice((b"", b"gemma3", b"llama", b"linear", b"yarn", b"none", b"\xff\xfe", b"\xc0\x80abc", b"a" * 300,
                           b"<bos>", b"\xe2\x96\x81", b"<0x41>", b"\x00"))
    bits = {U8: 8, I8: 8, U16: 16, I16: 16, U32: 32, I32: 32, U64: 64, I64: 64}[t]
    v = interesting_int(rng, bits // 8)
    signed = t in (I8, I16, I32, I64)
    v &= (1 << bits) - 1
    if signed and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


def _coerce(t, v):
    """A value that serialises as type t (ints wrap; others replaced)."""
    if t in INT_TYPES:
        bits = {U8: 8, I8: 8, U16: 16, I16: 16, U32: 32, I32: 32, U64: 64, I64: 64}[t]
        try:
            v = int(v) & ((1 << bits) - 1)
        except (TypeError, ValueError, OverflowError):
            v = 0
        if t in (I8, I16, I32, I64) and v >= 1 << (bits - 1):
            v -= 1 << bits
        return v
    if t == BOOL:
        return 1 if v else 0
    if t in (F32, F64):
        try:
            return float(v)
        except (TypeError, ValueError, OverflowError):
            return 0.0
    if t == STRING:
        return v if isinstance(v, bytes) else str(v).encode()
    return v


def mutate_gguf_model(g, rng, key_focus=None):
    """One structural mutation of a parsed GGUF, in place. key_focus: prefer keys starting with it."""
    from .mutators import hazard_pair

    r = rng.random()
    kv = g.kv
    ints = [e for e in kv if e[1] in INT_TYPES]
    if len(ints) >= 2 and rng.random() < 0.12:
        # Two integer entries at once (a hazard pair: x / 0, INT_MIN / -1, products past 32 bits), and sometimes
        # one more entry gone (then defaults computed from the others come into play).
        e1, e2 = rng.sample(ints, 2)
        a, b = hazard_pair(rng)
        for e, v in ((e1, a), (e2, b)):
            if v < 0 and e[1] in (U8, U16, U32, U64):
                e[1] = {U8: I8, U16: I16, U32: I32, U64: I64}[e[1]]
            e[2] = _coerce(e[1], v)
        if rng.random() < 0.5:
            others = [e for e in kv if e is not e1 and e is not e2 and e[0].startswith((b"gemma3.", b"tokenizer."))]
            if others:
                kv.remove(rng.choice(others))
        return
    if kv and r < 0.45:
        cands = [e for e in kv if key_focus and e[0].startswith(key_focus)] or kv
        if key_focus is None:
            gem = [e for e in kv if e[0].startswith((b"gemma3.", b"general."))]
            if gem and rng.random() < 0.6:
                cands = gem
        e = rng.choice(cands)
        key, t, v = e
        s = rng.random()
        if t == ARRAY:
            et, vals = v
            if s < 0.3 and vals:  # change elements
                for _ in range(rng.choice((1, 1, 3, 10))):
                    i = rng.randrange(len(vals))
                    if et == STRING:
                        if not isinstance(vals[i], bytes):
                            vals[i] = _coerce(STRING, vals[i])
                        vals[i] = rng.choice((b"", vals[i] + b"\xff", vals[(i + 1) % len(vals)], b"<unk>", b"\xe2\x96",
                                              b"a" * 5000, _random_scalar(rng, STRING)))
                    elif et in _SCALAR:
                        vals[i] = _random_scalar(rng, et)
            elif s < 0.45:  # length changes
                e[2] = (et, vals[: rng.randrange(len(vals) + 1)] if vals and rng.random() < 0.6 else vals + vals[: rng.randint(1, 8)])
            elif s < 0.6:  # element type changes (values converted)
                nt = rng.choice((U8, I8, U32, I32, U64, I64, F32, F64, BOOL, STRING))
                e[2] = (nt, [_coerce(nt, x) for x in vals])
            elif s < 0.7:  # nested arrays
                e[2] = (ARRAY, [(et, vals[:3])] * rng.choice((1, 2, 5)))
            else:  # array -> scalar
                nt = rng.choice((U32, I32, STRING, F32))
                e[1], e[2] = nt, _random_scalar(rng, nt)
        elif s < 0.55:
            e[2] = _random_scalar(rng, t) if t != STRING else _random_scalar(rng, STRING)
        elif s < 0.75:
            nt = rng.choice((U8, I8, U16, I16, U32, I32, U64, I64, F32, F64, BOOL, STRING))
            e[1], e[2] = nt, (_random_scalar(rng, nt) if rng.random() < 0.5 else _coerce(nt, v))
        elif s < 0.85:
            nt = rng.choice((U32, I32, STRING))
            e[1], e[2] = ARRAY, (nt, [_coerce(nt, v)] * rng.choice((0, 1, 3)))
        else:
            kv.remove(e)
        return
    if r < 0.6:
        # Add (or duplicate) a key.
        s = rng.random()
        if s < 0.2 and kv:
            kv.insert(rng.randrange(len(kv) + 1), list(rng.choice(kv)))
            return
        pool = GEMMA3_KEYS + (TOKENIZER_KEYS if key_focus != b"gemma3." else [])
        if key_focus == b"tokenizer.":
            pool = TOKENIZER_KEYS
        key = rng.choice(pool).encode()
        t = rng.choice((U32, I32, U64, F32, STRING, BOOL, I64))
        kv.append([key, t, _random_scalar(rng, t)])
        return
    if g.tensors and r < 0.9:
        e = rng.choice(g.tensors)
        s = rng.random()
        if s < 0.3:
            dims = e[1]
            if dims:
                i = rng.randrange(len(dims))
                dims[i] = rng.choice((0, 1, 2, dims[i] * 2, dims[i] + 1, dims[i] - 1, 2**32 + dims[i], 2**40,
                                      2**40 + 1, 2**63, 2**64 - 1, interesting_int(rng) & (2**64 - 1)))
        elif s < 0.4:
            # An element count that overflows 64 bits and wraps to something small.
            d0 = e[1][0] if e[1] else 1
            e[1] = rng.choice(([2**32, 2**32, 1], [2**40, 2**40, 2**40, 2**40], [2**21, 2**43],
                               [d0, 2**64 // max(1, d0) + 1], [2**63 + 1, 2], e[1] + [2**62]))
        elif s < 0.5:
            e[1] = e[1][::-1] if rng.random() < 0.5 else rng.choice(([], [1] * 5, e[1] + [1], e[1][:1]))
        elif s < 0.7:
            e[2] = rng.choice(GGML_TYPES)
        elif s < 0.85:
            e[3] = rng.choice((0, 1, 31, 32, e[3] + 32, e[3] - 32, e[3] + 1, len(g.data), len(g.data) - 32, 2**63,
                               2**64 - 32, interesting_int(rng) & (2**64 - 1)))
        elif s < 0.92:
            e[0] = rng.choice((b"output.weight", b"token_embd.weight", b"blk.9.attn_q.weight", b"", e[0] + b"\xff",
                               b"blk.-1.attn_q.weight", b"blk.99999999999.attn_norm.weight"))
        else:
            g.tensors.remove(e)
        return
    if r < 0.95:
        g.version = rng.choice((1, 2, 3, 4, 0xFFFFFFFF))
        return
    g.data = g.data[: rng.randrange(len(g.data) + 1)]


def mutate_gguf(data, rng, key_focus=None):
    """bytes -> bytes: structural mutations, or a lie in one numeric header field, or raw byte mutations of the
    header region."""
    from .mutators import mutate_bytes

    try:
        g = parse(data)
    except (ParseError, struct.error, OverflowError, MemoryError):
        return mutate_bytes(data, rng, hot=(0, min(len(data), 16384)))
    r = rng.random()
    if r < 0.55:
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            mutate_gguf_model(g, rng, key_focus)
        try:
            out, _, _ = serialize(g)
        except (struct.error, ParseError, OverflowError, TypeError):
            return mutate_bytes(data, rng, hot=(0, 16384))
        return out
    out, fields, header_end = serialize(g)
    if r < 0.85 and fields:
        # A lie in one field: a length, count, dimension, type or offset.
        if key_focus:
            focused = [f for f in fields if key_focus.decode() in f[2]]
            fields = focused or fields
        for _ in range(rng.choice((1, 1, 2))):
            off, width, _desc, t = rng.choice(fields)
            if t in (F32, F64) and rng.random() < 0.7:
                x = rng.choice(INTERESTING_FLOATS)
                try:
                    v = struct.pack("<f" if width == 4 else "<d", x)
                except OverflowError:
                    v = struct.pack("<f", float("inf") if x > 0 else float("-inf"))
            else:
                v = pack_int(interesting_int(rng, width), width)
            out = out[:off] + v + out[off + width:]
        return out
    return mutate_bytes(out, rng, hot=(0, header_end))
