"""Hostile input: every case here crashed, hung, overran memory or raised the wrong exception before the hardening
change. Cases that used to kill the process run in a fresh interpreter, so a regression fails the test instead of
taking pytest down."""
import collections
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import gemmalens as gl
from gemmalens import _core, formats

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from gguf_util import write_gemma3_gguf  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _child(code, timeout=120, mem_gb=None):
    """Run `code` in a fresh interpreter; returns (stdout, the child's peak RSS in MiB, VmHWM: ru_maxrss would carry
    pytest's own RSS over the fork). A signal (SIGFPE, SIGSEGV), a time-out or a non-zero exit fails the test."""
    def limit():
        if mem_gb:
            resource.setrlimit(resource.RLIMIT_AS, (mem_gb << 30, mem_gb << 30))

    code = textwrap.dedent(code) + "\nfrom test_hardening_util import vm_hwm_kib\nprint('__PEAK__', vm_hwm_kib())\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=limit, cwd=TESTS_DIR, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"child ended with {r.returncode} (negative: killed by that signal):\n{r.stderr[-3000:]}"
    out, peak = r.stdout.rsplit("__PEAK__", 1)
    return out, int(peak) / 1024


EXPECT = """
import gemmalens as gl, json, sys
from gemmalens import _core
def expect(fn, exc=ValueError):
    try:
        fn()
    except exc as e:
        print(type(e).__name__ + ": " + str(e))
        return
    raise SystemExit("no exception")
"""


# ---------------------------------------------------------------- 1. config.json: INT_MIN / -1


def test_config_int_min_over_minus_one_heads_is_a_value_error():
    out, _ = _child(EXPECT + """
expect(lambda: _core.Gemma3Config.from_json(json.dumps({"hidden_size": -2147483648, "num_attention_heads": -1})))
""")
    assert "ValueError" in out and "Gemma3Config" in out


# ---------------------------------------------------------------- 2. GGUF: head_count = 0, no key_length


def _gguf_meta(path, **over):
    """A gemma3 GGUF with only the config metadata and a tiny embedding (the config fails before the weights)."""
    w = gguf.GGUFWriter(path, "gemma3")
    vals = dict(embedding_length=64, block_count=2, feed_forward_length=96, head_count=4, head_count_kv=1,
                layer_norm_rms_eps=1e-6)
    vals.update(over)
    w.add_embedding_length(vals["embedding_length"])
    w.add_block_count(vals["block_count"])
    w.add_feed_forward_length(vals["feed_forward_length"])
    w.add_head_count(vals["head_count"])
    w.add_head_count_kv(vals["head_count_kv"])
    w.add_layer_norm_rms_eps(vals["layer_norm_rms_eps"])
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_zero_heads_without_key_length(tmp_path):
    path = _gguf_meta(str(tmp_path / "h0.gguf"), head_count=0)
    out, _ = _child(EXPECT + f"expect(lambda: gl.load({path!r}), gl.CheckpointError)")
    assert "attention.head_count" in out and "out of range" in out


# ---------------------------------------------------------------- 3. huge layer counts


def test_gguf_huge_block_count_fails_fast_without_memory(tmp_path):
    path = _gguf_meta(str(tmp_path / "big.gguf"), block_count=2**32 - 1)
    # Before: one string per layer was built before validation (a 110 KB file ran 79 s to 9.9 GB).
    out, peak = _child(EXPECT + f"expect(lambda: gl.load({path!r}), gl.CheckpointError)", timeout=60, mem_gb=6)
    assert "block_count" in out
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"


@pytest.mark.parametrize("layers", [2**40 + 2, 10**9, -3])
def test_config_layer_count_out_of_range(layers):
    d = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=layers, vocab_size=300)
    with pytest.raises(ValueError, match="num_hidden_layers"):  # 2**40 + 2 used to load as 2 layers
        _core.Gemma3Config.from_json(json.dumps(d))


@pytest.mark.parametrize("field,value", [("hidden_size", 10**6), ("vocab_size", 2**30), ("head_dim", 1 << 20),
                                         ("num_attention_heads", 5000), ("max_position_embeddings", 2**31 - 1),
                                         ("intermediate_size", 5.5), ("rope_theta", -5.0)])
def test_config_bounds_name_the_field(field, value):
    d = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, vocab_size=300)
    d[field] = value
    with pytest.raises(ValueError, match=field.split("_")[0]):
        _core.Gemma3Config.from_json(json.dumps(d))


def test_published_sizes_pass_the_bounds():
    for size in ("270m", "1b", "4b", "12b", "27b"):
        _core.Gemma3Config.preset(size).validate()


# ---------------------------------------------------------------- 4. crafted gemma_pytorch checkpoints


class _StoragePlaceholder:
    pass


class _View:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), the way torch.save writes a
    tensor, but with any offset/size/stride (and optionally a forged storage argument)."""

    def __init__(self, offset, size, stride, storage=None):
        self.args = (storage if storage is not None else _StoragePlaceholder(), offset, size, stride)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args + (False, collections.OrderedDict()))


def _write_ckpt(path, obj, storage_bytes, numel, compress=False):
    import io

    class P(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _StoragePlaceholder):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", storage_bytes, compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return path


STORAGE = np.arange(64, dtype=np.float32).tobytes()


def test_ckpt_valid_view_still_reads(tmp_path):
    path = _write_ckpt(str(tmp_path / "ok.ckpt"), {"w": _View(4, (3, 5), (5, 1)), "t": _View(0, (4, 2), (1, 4))}, STORAGE, 64)
    d = formats.read_torch_zip(path)
    full = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(d["w"], full[4:19].reshape(3, 5))
    np.testing.assert_array_equal(d["t"], full[:8].reshape(2, 4).T)


@pytest.mark.parametrize("offset,size,stride,what", [
    (63, (8,), (-1,), "negative"),            # read before the buffer
    (0, (4,), (-1000000,), "negative"),       # SIGSEGV inside numpy before
    (0, (750_000_000,), (0,), "repeats"),     # 3 GB out of a 300-byte pickle before
    (0, (8, 8), (1000, 1), "runs past"),
    (-1, (2,), (1,), "negative"),
    (0, (2,), (1.5,), "malformed"),
])
def test_ckpt_bad_views_are_refused(tmp_path, offset, size, stride, what):
    path = _write_ckpt(str(tmp_path / "bad.ckpt"), {"w": _View(offset, size, stride)}, STORAGE, 64)
    out, peak = _child(EXPECT + f"""
from gemmalens import formats
expect(lambda: formats.read_torch_zip({path!r}), gl.CheckpointError)
""", mem_gb=6)
    assert what in out
    assert peak < 1024


def test_ckpt_forged_storage_is_refused(tmp_path):
    # A tuple in place of the storage (the old code trusted any (array, itemsize) pair).
    path = _write_ckpt(str(tmp_path / "forged.ckpt"), {"w": _View(0, (8,), (1,), storage=([0.0] * 8, 100000))}, STORAGE, 64)
    with pytest.raises(gl.CheckpointError, match="not backed by a storage"):
        formats.read_torch_zip(path)


def test_ckpt_decompression_bomb_is_refused(tmp_path):
    n = 16 << 20  # 64 MiB of zeros deflates to ~64 KiB
    path = _write_ckpt(str(tmp_path / "bomb.ckpt"), {"w": _View(0, (n,), (1,))}, bytes(4 * n), n, compress=True)
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(gl.CheckpointError, match="decompression bomb"):
        formats.read_torch_zip(path)


def test_ckpt_refused_global_is_a_checkpoint_error_and_unpickling_error(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    path = _write_ckpt(str(tmp_path / "evil.ckpt"), {"w": Evil()}, STORAGE, 64)
    with pytest.raises(gl.CheckpointError, match="refused") as e:
        formats.read_torch_zip(path)
    assert isinstance(e.value, pickle.UnpicklingError)


# ---------------------------------------------------------------- 5. a KV cache from another model


def test_cache_from_another_model_is_refused(hf_models):
    a = gl.load(hf_models["mqa_scaled_softcap"][1])  # 7 layers, KV 1, head_dim 32, window 6
    b = gl.load(hf_models["gqa4_hd24"][1])           # 8 layers, KV 2, head_dim 24, window 7
    c = gl.load(hf_models["gqa2"][1])                # 7 layers, KV 2, head_dim 16, window 5
    ids = np.arange(1, 9)
    for model, other in ((a, b), (b, a), (a, c), (c, a)):
        cache = other.new_cache(batch=1, max_seq_len=64)
        with pytest.raises(ValueError, match="another model"):
            model.forward(ids, cache=cache)
        assert cache.seq_len == 0
    # The refused models still work and agree with a cache of their own.
    cache = a.new_cache(batch=1, max_seq_len=64)
    np.testing.assert_allclose(a.forward(ids, cache=cache), a.forward(ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 6. element counts that overflow


def test_safetensors_element_count_overflow(tmp_path):
    # [2**60 + 1, 16] U8: 2**64 + 16 elements wrap to 16 bytes; the old check passed with 16 bytes of data.
    header = json.dumps({"x": {"dtype": "U8", "shape": [2**60 + 1, 16], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    out, peak = _child(EXPECT + f"expect(lambda: _core.read_safetensors({str(path)!r}), gl.CheckpointError)", mem_gb=6)
    assert "overflow" in out and peak < 1024


def _raw_gguf(path, tensors, kv=()):
    """A GGUF v3 written byte by byte (the gguf package refuses impossible shapes): tensors = [(name, dims, type)]."""
    def s(x):
        b = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(b)) + b

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, typ, payload in kv:
        out += s(key) + struct.pack("<I", typ) + payload
    for name, dims, typ in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", typ, 0)
    out += bytes((-len(out)) % 32) + bytes(4096)
    with open(path, "wb") as f:
        f.write(out)
    return path


def test_gguf_element_count_overflow(tmp_path):
    path = _raw_gguf(str(tmp_path / "ovf.gguf"), [("x", [32, 2**40, 2**40], 0)])  # 2**85 elements wrap to 0 bytes
    out, _ = _child(EXPECT + f"expect(lambda: _core.GGUFFile({path!r}), gl.CheckpointError)")
    assert "more elements" in out or "runs past" in out


# ---------------------------------------------------------------- 7. allocation before validation


def test_config_larger_than_the_weights_fails_before_allocating(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=65536, vocab_size=1 << 20, head_dim=64)  # a 256 GiB embedding, in bounds
    (d / "config.json").write_text(json.dumps(cfg))
    out, peak = _child(EXPECT + f"expect(lambda: gl.load({str(d)!r}), gl.CheckpointError)", mem_gb=8)
    assert "shape" in out and peak < 1024


def test_gguf_large_metadata_array_costs_its_size_not_100x(tmp_path):
    n = 8 << 20
    kv = [("general.architecture", 8, struct.pack("<Q", 6) + b"gemma3"),
          ("big.array", 9, struct.pack("<IQ", 0, n) + bytes(n))]  # 8 MiB of u8
    path = _raw_gguf(str(tmp_path / "meta.gguf"), [], kv)
    out, peak = _child("""
import gemmalens
from gemmalens import _core
from test_hardening_util import vm_hwm_kib
base = vm_hwm_kib()
f = _core.GGUFFile(%r)
print("parsed", (vm_hwm_kib() - base) // 1024)
""" % path)
    assert out.split()[0] == "parsed"
    assert int(out.split()[1]) < 64, out  # MiB over the interpreter's baseline (was ~830 MiB)


def test_gguf_tokenizer_arrays_longer_than_the_vocab_are_not_converted(tmp_path):
    path = _raw_gguf(str(tmp_path / "t.gguf"), [], [("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 100) + bytes(400))])
    f = _core.GGUFFile(path)
    with pytest.raises(gl.CheckpointError, match="more than the 10"):
        f.get("tokenizer.ggml.scores", None, 10)
    assert len(f.get("tokenizer.ggml.scores")) == 100


def test_new_cache_larger_than_memory_is_refused(tiny_dir):
    model = gl.load(tiny_dir)
    with pytest.raises(ValueError, match="more than this machine's"):
        model.new_cache(batch=10**6, max_seq_len=512)
    cache = model.new_cache(batch=2, max_seq_len=16)
    assert cache.seq_len == 0


# ---------------------------------------------------------------- 8. exception types


def test_invalid_utf8_in_a_message_is_still_a_checkpoint_error(tmp_path):
    kv = [("general.architecture", 8, struct.pack("<Q", 4) + b"\xff\xfeab")]
    path = _raw_gguf(str(tmp_path / "arch.gguf"), [("token_embd.weight", [64, 8], 0)], kv)
    with pytest.raises(gl.CheckpointError, match=r"architecture '\\xff\\xfeab'"):
        _core.load_gguf(path)


def test_config_wrong_json_type_is_a_value_error():
    with pytest.raises(ValueError, match="wrong type"):  # was RuntimeError (nlohmann type_error)
        _core.Gemma3Config.from_json('{"model_type": 5}')
    with pytest.raises(ValueError, match="eos_token_id"):
        _core.Gemma3Config.from_json('{"hidden_size": 64, "eos_token_id": [1, "x"]}')


def test_config_not_utf8_is_a_checkpoint_error(tiny_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "config.json").write_bytes(b'{"hidden_size": 64, "name": "\xff\xfe"}')
    with pytest.raises(gl.CheckpointError, match="not UTF-8"):
        gl.load(str(d))


def test_gguf_tokenizer_special_id_out_of_range_loads_without_tokenizer(tmp_path, hf_models):
    hf = hf_models["mqa_scaled_softcap"][0]
    V = hf.config.vocab_size
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"t{i}" for i in range(V - len(pieces))]
    toks = (pieces, [0.0] * V, [3, 3, 3, 2] + [6] * 256 + [1] * (V - 260))
    path = str(tmp_path / "tok.gguf")
    write_gemma3_gguf(path, hf, tokenizer_tokens=toks)
    # add tokenizer.ggml.unknown_token_id = 10**6 by rewriting with the gguf package
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "tok2.gguf"), "gemma3")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        v = field.contents()
        vt = field.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_array(field.name, v)
        else:
            w.add_key_value(field.name, v, vt)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 10**6)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="unknown_token_id"):
        model = gl.load(str(tmp_path / "tok2.gguf"))  # was IndexError for the whole load
    assert model.tokenizer is None
    good = gl.load(path)
    assert good.tokenizer is not None and good.tokenizer.vocab_size == V
    np.testing.assert_allclose(model.forward([1, 2, 3]), good.forward([1, 2, 3]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 9. runtime: position limit, Ctrl-C


def test_positions_past_max_position_embeddings(hf_models):
    model = gl.load(hf_models["gqa2"][1])  # max_position_embeddings = 512
    V = model.config.vocab_size
    ids = np.arange(600) % V
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward(ids)
    with pytest.raises(ValueError, match="allow_longer"):
        model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    with pytest.raises(TypeError, match="allow_longer must be True or False"):
        model.forward(ids[:10], allow_longer="yes")
    logits = model.forward(ids, allow_longer=True)
    assert logits.shape == (1, 600, V) and np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, :100], model.forward(ids[:100]), rtol=1e-5, atol=1e-5)


def test_ctrl_c_interrupts_generate_and_the_model_still_works(real_gguf_path, tmp_path):
    """SIGINT in the middle of a long prefill and of a long decode: KeyboardInterrupt within 0.5 s, then correct
    output from the same model in the same process."""
    script = tmp_path / "gen.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import numpy as np
        import gemmalens as gl
        model = gl.load({real_gguf_path!r}, max_seq_len=8192)
        ref = model.generate("The capital of France is", max_new_tokens=12)
        rng = np.random.default_rng(0)
        for what, prompt, n in (("prefill", list(rng.integers(1000, 5000, 6000)), 4), ("decode", [2, 818, 5279], 4000)):
            print("START", what, flush=True)
            try:
                model.generate(prompt, max_new_tokens=n)
                print("FINISHED", what, flush=True)
            except KeyboardInterrupt:
                print("INTERRUPTED", what, time.monotonic(), flush=True)
        print("SAME", model.generate("The capital of France is", max_new_tokens=12) == ref, flush=True)
        print("REF", repr(ref), flush=True)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    lines, delays = [], []
    try:
        for what, wait in (("prefill", 1.5), ("decode", 2.0)):
            line = p.stdout.readline()
            lines.append(line)
            assert line.split()[:2] == ["START", what], lines
            time.sleep(wait)
            sent = time.monotonic()
            p.send_signal(signal.SIGINT)
            line = p.stdout.readline()
            lines.append(line)
            assert line.split()[:2] == ["INTERRUPTED", what], lines
            delays.append(float(line.split()[2]) - sent)
        rest = p.stdout.read()
        assert p.wait(timeout=120) == 0
    finally:
        p.kill()
    assert "SAME True" in rest, rest  # the same greedy text as before any interrupt
    print("interrupt delays (s):", delays)
    assert max(delays) < 0.5, delays


def test_load_arrays_checks_names_and_shapes_before_loading(tiny_dir):
    """The array loader (Orbax, gemma_pytorch) refuses missing, mis-shaped and unexpected tensors up front."""
    model = gl.load(tiny_dir)
    arrays = model._core.export_tensors()
    cfg = model.config
    ok = _core.load_arrays(dict(arrays), cfg)
    np.testing.assert_array_equal(ok.forward(np.array([[1, 2, 3]], np.int32)), model._core.forward(np.array([[1, 2, 3]], np.int32)))
    extra = dict(arrays, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(4, np.float32)})
    with pytest.raises(gl.CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        _core.load_arrays(extra, cfg)
    missing = {k: v for k, v in arrays.items() if k != "model.norm.weight"}
    with pytest.raises(gl.CheckpointError, match="missing tensor 'model.norm.weight'"):
        _core.load_arrays(missing, cfg)
    bad = dict(arrays, **{"model.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(gl.CheckpointError, match=r"has shape \[3\] but the config expects"):
        _core.load_arrays(bad, cfg)
