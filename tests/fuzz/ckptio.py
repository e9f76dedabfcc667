"""Structure-aware mutation of torch.save zip checkpoints: the pickle (integers such as storage offsets, sizes,
strides and storage element counts; strings such as storage keys and class names; opcodes) and the zip container
(entries, compression methods, header fields, a decompression bomb)."""
import bz2
import io
import pickletools
import struct
import zipfile
import zlib

from .mutators import interesting_int, mutate_bytes, pack_int

_INT_OPS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"}
_STR_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "UNICODE"}
_STORAGES = ["FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage", "IntStorage",
             "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage", "ComplexFloatStorage"]


def encode_int(v):
    """The shortest pickle protocol-2 opcode pushing int v."""
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def encode_str(s):
    if isinstance(s, str):
        s = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(s)) + s


def ops(pkl):
    """[(name, arg, start, end)] of a pickle; None if it does not disassemble."""
    try:
        out = []
        prev = None
        for op, arg, pos in pickletools.genops(pkl):
            if prev is not None:
                out.append((prev[0], prev[1], prev[2], pos))
            prev = (op.name, arg, pos)
        if prev is not None:
            out.append((prev[0], prev[1], prev[2], prev[2] + 1))
        return out
    except Exception:  # genops raises ValueError and others on malformed input
        return None


def mutate_pickle(pkl, rng):
    o = ops(pkl)
    if not o:
        return mutate_bytes(pkl, rng)
    ints = [x for x in o if x[0] in _INT_OPS]
    strs = [x for x in o if x[0] in _STR_OPS]
    globs = [x for x in o if x[0] == "GLOBAL"]
    r = rng.random()
    if ints and r < 0.5:
        # Integers: offsets, sizes, strides, numel (and dict/list contents of anything else).
        out = pkl
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            o2 = ops(out) or o
            cand = [x for x in o2 if x[0] in _INT_OPS] or ints
            name, arg, a, b = rng.choice(cand)
            old = arg if isinstance(arg, int) else 0
            v = rng.choice((interesting_int(rng), -1, -old, 0, old + 1, old - 1, old * 2, old * 2**32, -2**62, 2**62,
                            old + 2**64, old + 2**63))
            out = out[:a] + encode_int(v) + out[b:]
        return out
    if strs and r < 0.65:
        name, arg, a, b = rng.choice(strs)
        s = arg if isinstance(arg, str) else ""
        v = rng.choice((s + "x", s[:-1], "", "99", "-1", "../data.pkl", "0", "1", s + "\udcff", s * 100,
                        "model.layers.0.self_attn.o_proj.weight", "embedder.weight", "model_state_dict", "storage",
                        "cuda:0", "model.layers.7.mlp.up_proj.weight"))
        return pkl[:a] + encode_str(v) + pkl[b:]
    if globs and r < 0.75:
        name, arg, a, b = rng.choice(globs)
        mod, _, cls = (arg or " ").partition(" ")
        v = rng.choice([("torch", s) for s in _STORAGES] + [
            ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
            ("collections", "OrderedDict"), ("builtins", "dict"), ("torch", "Size"), ("os", "system"), (mod, cls + "x")])
        return pkl[:a] + b"c" + v[0].encode() + b"\n" + v[1].encode() + b"\n" + pkl[b:]
    # Opcode surgery: delete, duplicate or swap one opcode (protocol 2 has no frames: nothing else to fix up).
    name, arg, a, b = rng.choice(o[:-1] or o)
    s = rng.random()
    if s < 0.4:
        return pkl[:a] + pkl[b:]
    if s < 0.7:
        return pkl[:b] + pkl[a:b] + pkl[b:]
    repl = rng.choice((b"\x85", b"\x86", b"\x87", b"}", b"]", b")", b"N", b"(", b"0", b"t", b"s", b"u", b"R", b"Q",
                       b"\x88", b"\x89", b"K\x00", b"J\xff\xff\xff\xff"))
    return pkl[:a] + repl + pkl[b:]


# ---------------------------------------------------------------- zip container


_ZIP_CACHE = {}


def read_zip(data):
    """[(name, bytes)] of a zip, or None. Cached by content: corpus entries are mutated many times over."""
    hit = _ZIP_CACHE.get(data)
    if hit is not None:
        return list(hit) if hit != () else None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            if sum(i.file_size for i in infos) > 4 * len(data) + (1 << 20):
                raise ValueError("a decompression bomb: mutate its bytes instead")
            entries = [(i.filename, z.read(i)) for i in infos]
    except Exception:  # any malformed archive: BadZipFile, EOFError, zlib.error, NotImplementedError, ...
        entries = None
    if len(_ZIP_CACHE) > 32:
        _ZIP_CACHE.clear()
    _ZIP_CACHE[data] = tuple(entries) if entries is not None else ()
    return entries


def write_zip(entries, compress=None):
    """[(name, bytes[, method])] -> zip bytes (deterministic timestamps). The pickle goes last, as in the seeds
    (seedgen.repack): a mutated pickle then changes only the end of the file, so saved cases stay small."""
    entries = [e for e in entries if not e[0].endswith("data.pkl")] + [e for e in entries if e[0].endswith("data.pkl")]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for e in entries:
            name, data = e[0], e[1]
            method = e[2] if len(e) > 2 else (compress if compress is not None else zipfile.ZIP_STORED)
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = method
            z.writestr(zi, data)
    return buf.getvalue()


_BOMB = {}


def bomb(nbytes=128 << 20):
    """A bzip2 stream of nbytes zeros and its CRC-32 (cached; built in the parent before forking): ~100 bytes that
    decompress to 128 MiB."""
    if nbytes not in _BOMB:
        c = bz2.BZ2Compressor(9)
        chunk = b"\0" * (1 << 20)
        parts, crc = [], 0
        for _ in range(nbytes >> 20):
            parts.append(c.compress(chunk))
            crc = zlib.crc32(chunk, crc)
        parts.append(c.flush())
        _BOMB[nbytes] = (b"".join(parts), crc)
    return _BOMB[nbytes]


def zip_with_bomb(entries, victim, nbytes=128 << 20):
    """entries as a zip whose entry `victim` is a decompression bomb (zipfile cannot write one: built by hand)."""
    out = bytearray()
    central = bytearray()
    for name, data in entries:
        nm = name.encode()
        off = len(out)
        if name == victim:
            comp, crc = bomb(nbytes)
            csize, usize, method, ver = len(comp), nbytes, 12, 46
            payload = comp
        else:
            crc = zlib.crc32(data)
            csize = usize = len(data)
            method, ver, payload = 0, 20, data
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, ver, 0, method, 0, 0x21, crc, csize, usize, len(nm), 0) + nm + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, ver, ver, 0, method, 0, 0x21, crc, csize, usize, len(nm), 0, 0,
                               0, 0, 0, off) + nm
    cd_off = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), cd_off, 0)
    return bytes(out)


def zip_fields(data):
    """[(offset, width)] of the numeric fields of local headers, central directory entries and the end record."""
    f = []
    i = data.find(b"PK\x03\x04")
    while i >= 0:
        f += [(i + 4, 2), (i + 6, 2), (i + 8, 2), (i + 14, 4), (i + 18, 4), (i + 22, 4), (i + 26, 2), (i + 28, 2)]
        i = data.find(b"PK\x03\x04", i + 4)
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        f += [(i + 10, 2), (i + 16, 4), (i + 20, 4), (i + 24, 4), (i + 28, 2), (i + 30, 2), (i + 32, 2), (i + 42, 4)]
        i = data.find(b"PK\x01\x02", i + 4)
    i = data.rfind(b"PK\x05\x06")
    if i >= 0:
        f += [(i + 4, 2), (i + 6, 2), (i + 8, 2), (i + 10, 2), (i + 12, 4), (i + 16, 4), (i + 20, 2)]
    return [x for x in f if x[0] + x[1] <= len(data)]


def mutate_ckpt(data, rng):
    entries = read_zip(data)
    if entries is None:
        return mutate_bytes(data, rng)
    pkl_idx = [i for i, (n, _) in enumerate(entries) if n.endswith("data.pkl")]
    r = rng.random()
    if pkl_idx and r < 0.55:
        i = pkl_idx[0]
        name, pkl = entries[i]
        if rng.random() < 0.85:
            for _ in range(rng.choice((1, 1, 2))):
                pkl = mutate_pickle(pkl, rng)
        else:
            pkl = mutate_bytes(pkl, rng)
        entries[i] = (name, pkl)
        return write_zip(entries)
    if r < 0.75:
        s = rng.random()
        data_entries = [i for i, (n, _) in enumerate(entries) if "/data/" in n]
        if s < 0.2 and entries:
            del entries[rng.randrange(len(entries))]
        elif s < 0.4 and data_entries:
            i = rng.choice(data_entries)
            n, d = entries[i]
            entries[i] = (n, rng.choice((d[: rng.randrange(len(d) + 1)], d[:-1], d + d[:7], b"", d[: len(d) // 2])))
        elif s < 0.5:
            bo = [i for i, (n, _) in enumerate(entries) if n.endswith("byteorder")]
            if bo:
                entries[bo[0]] = (entries[bo[0]][0], rng.choice((b"big", b"", b"little\n", b"\xff", b"middle")))
        elif s < 0.6 and pkl_idx:
            n, d = entries[pkl_idx[0]]
            entries.append((rng.choice(("other/data.pkl", n, "data.pkl")), d))
        elif s < 0.75:
            # Compress a few entries (the pickle, a storage) with a method the reader must decompress.
            method = rng.choice((zipfile.ZIP_DEFLATED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA))
            pick = set(rng.sample(range(len(entries)), min(len(entries), rng.choice((1, 2))))) | set(pkl_idx[:1])
            return write_zip([(n, d, method) if i in pick else (n, d) for i, (n, d) in enumerate(entries)])
        elif s < 0.8 and data_entries:
            return zip_with_bomb(entries, entries[rng.choice(data_entries)][0])
        else:
            n = [i for i, (nm, _) in enumerate(entries)]
            if n:
                i = rng.choice(n)
                nm, d = entries[i]
                entries[i] = (rng.choice((nm + "x", nm.replace("data/", "data/9"), nm.upper(), "../" + nm, nm + "\\")), d)
        return write_zip(entries)
    out = write_zip(entries)
    fields = zip_fields(out)
    if fields and r < 0.92:
        for _ in range(rng.choice((1, 1, 2))):
            off, width = rng.choice(fields)
            if width == 2 and rng.random() < 0.3:  # a compression method gemmalens' reader may not know
                v = struct.pack("<H", rng.choice((0, 1, 8, 9, 12, 14, 93, 95, 98, 99, 0xFFFF)))
            else:
                v = pack_int(interesting_int(rng, width), width)
            out = out[:off] + v + out[off + width:]
        return out
    return mutate_bytes(out, rng, hot=(0, len(out)))
