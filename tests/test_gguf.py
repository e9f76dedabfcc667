"""GGUF: native reader against the `gguf` package (metadata, dequantisation), tiny gemma3 GGUFs against HF,
and bad files."""
import os

import numpy as np
import pytest
import torch

import gemmalens as gl
from conftest import build_hf, hf_logits, rel_err
from gemmalens import _core
from gguf_util import write_gemma3_gguf

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = {Q.Q4_K: (144, [(0, 2), (2, 2)]), Q.Q5_K: (176, [(0, 2), (2, 2)]), Q.Q6_K: (210, [(208, 2)])}


def _random_k_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks with finite, moderate f16 scales (the gguf package cannot quantise these)."""
    size, scale_fields = K_QUANTS[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off, _ in scale_fields:
        raw[:, off:off + 2] = rng.uniform(0.001, 0.05, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("gguf") / "quants.gguf")
    w = gguf.GGUFWriter(path, "test")
    x = rng.standard_normal((6, 512)).astype(np.float32)
    for t in QUANTIZABLE:
        q = gguf.quants.quantize(x, t)
        w.add_tensor(f"t.{t.name}", q, raw_dtype=None if t in (Q.F32, Q.F16) else t)
    for t in K_QUANTS:
        w.add_tensor(f"t.{t.name}", _random_k_blocks(rng, t, 6 * 2).reshape(6, -1), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", QUANTIZABLE + list(K_QUANTS))
def test_dequantize_matches_gguf_package(quant_file, qtype):
    ours = _core.GGUFFile(quant_file).dequantize(f"t.{qtype.name}")
    reader = gguf.GGUFReader(quant_file)
    t = next(t for t in reader.tensors if t.name == f"t.{qtype.name}")
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
    assert ours.shape == (6, 512)
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_real_file_tensors_of_every_type(real_gguf_path):
    reader = gguf.GGUFReader(real_gguf_path)
    f = _core.GGUFFile(real_gguf_path)
    seen = {}
    for t in sorted(reader.tensors, key=lambda t: int(t.n_elements)):  # the smallest tensor of each type
        seen.setdefault(t.tensor_type.name, t)
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"} <= set(seen)
    for name, t in seen.items():
        ours = f.dequantize(t.name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        np.testing.assert_array_equal(ours, ref.astype(np.float32), err_msg=name)


def test_metadata_every_value_type(tmp_path):
    path = str(tmp_path / "meta.gguf")
    w = gguf.GGUFWriter(path, "test")
    w.add_uint8("k.u8", 200)
    w.add_int8("k.i8", -100)
    w.add_uint16("k.u16", 60000)
    w.add_int16("k.i16", -30000)
    w.add_uint32("k.u32", 4_000_000_000)
    w.add_int32("k.i32", -2_000_000_000)
    w.add_float32("k.f32", 1.5)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "héllo ▁ wörld")
    w.add_uint64("k.u64", 2**63 + 5)
    w.add_int64("k.i64", -(2**62))
    w.add_float64("k.f64", 3.141592653589793)
    w.add_array("k.arr_i", [1, 2, 3])
    w.add_array("k.arr_s", ["a", "bb", ""])
    w.add_array("k.arr_f", [0.5, -1.25])
    w.add_array("k.arr_nested", [[1, 2], [3]])
    w.add_tensor("x", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _core.GGUFFile(path)
    m = f.metadata
    assert f.version == 3 and m["general.architecture"] == "test"
    expected = {"k.u8": 200, "k.i8": -100, "k.u16": 60000, "k.i16": -30000, "k.u32": 4_000_000_000,
                "k.i32": -2_000_000_000, "k.f32": 1.5, "k.bool": True, "k.str": "héllo ▁ wörld", "k.u64": 2**63 + 5,
                "k.i64": -(2**62), "k.f64": 3.141592653589793, "k.arr_i": [1, 2, 3], "k.arr_s": ["a", "bb", ""],
                "k.arr_f": [0.5, -1.25], "k.arr_nested": [[1, 2], [3]]}
    for k, v in expected.items():
        assert m[k] == v, k
    reader = gguf.GGUFReader(path)
    for k in expected:
        if k != "k.arr_nested":
            assert m[k] == reader.fields[k].contents(), k
    np.testing.assert_array_equal(f.dequantize("x"), np.arange(8, dtype=np.float32))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_gguf_src"))
    # Metadata away from gemmalens's defaults (a GGUF key that is dropped or misread shows): a 7-token window over
    # 39-token inputs, eps 1e-2, a global RoPE base of 5e4 (GGUF carries no local base: llama.cpp fixes it at 1e4).
    return build_hf(d, seed=11, vocab_size=320, hidden_size=64, head_dim=32, num_key_value_heads=1,
                    sliding_window=7, max_position_embeddings=512, rms_norm_eps=1e-2, rope_theta=5e4)


def test_tiny_gemma3_gguf_f32_equals_hf(tiny_hf, tmp_path):
    path = write_gemma3_gguf(str(tmp_path / "tiny.gguf"), tiny_hf)
    model = gl.load(path)
    cfg = model.config
    assert cfg.layer_types[5] == "full_attention" and cfg.rope_local_base_freq == 10000.0
    assert cfg.query_pre_attn_scalar == cfg.head_dim and cfg.vocab_size == 320
    ids = np.arange(1, 40)
    assert rel_err(model.forward(ids), hf_logits(tiny_hf, ids)) <= 1e-4


def test_tiny_gemma3_gguf_q8_0_equals_dequantized_hf(tiny_hf, tmp_path):
    """Quantised weights: gemmalens on the GGUF equals HF running the gguf package's dequantised weights."""
    path = write_gemma3_gguf(str(tmp_path / "q8.gguf"), tiny_hf, quant=Q.Q8_0)
    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    from gguf_util import gguf_name

    ref = type(tiny_hf)(tiny_hf.config).eval()
    sd = {}
    for name, t in tiny_hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        g = by_name[gguf_name(name)]
        a = gguf.quants.dequantize(g.data, g.tensor_type).reshape(t.shape)
        sd[name] = torch.as_tensor(a - 1.0 if "norm" in name else a)
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()
    ids = np.arange(2, 30)
    assert rel_err(gl.load(path).forward(ids), hf_logits(ref, ids)) <= 1e-4


def _valid_tiny(tiny_hf, tmp_path, **kw):
    return write_gemma3_gguf(str(tmp_path / "v.gguf"), tiny_hf, **kw)


def test_truncated_at_many_points(tiny_hf, tmp_path):
    path = _valid_tiny(tiny_hf, tmp_path)
    data = open(path, "rb").read()
    cut_path = str(tmp_path / "cut.gguf")
    cuts = sorted(set([0, 3, 4, 7, 8, 12, 16, 20, 24, 30, 50, 100, 300, 1000, 5000] +
                      list(np.linspace(0, len(data) - 40, 40).astype(int))))
    for cut in cuts:
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises((gl.CheckpointError, ValueError)):
            gl.load(cut_path)
    assert gl.load(path).forward([1, 2]).shape == (1, 2, 320)


def test_wrong_magic_and_version(tiny_hf, tmp_path):
    path = _valid_tiny(tiny_hf, tmp_path)
    data = bytearray(open(path, "rb").read())
    bad = str(tmp_path / "bad.gguf")
    open(bad, "wb").write(b"GGML" + data[4:])
    with pytest.raises(gl.CheckpointError, match="bad magic"):
        _core.GGUFFile(bad)
    for v in (1, 4, 0x03000000):
        open(bad, "wb").write(data[:4] + v.to_bytes(4, "little") + data[8:])
        with pytest.raises(gl.CheckpointError, match="unsupported GGUF version"):
            gl.load(bad)


def test_unsupported_quant_type_named(tiny_hf, tmp_path):
    path = str(tmp_path / "q2k.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_tensor("t", np.zeros((1, 84), np.uint8), raw_dtype=Q.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gl.CheckpointError, match="Q2_K"):
        _core.GGUFFile(path).dequantize("t")


def test_tensor_data_past_end(tiny_hf, tmp_path):
    path = _valid_tiny(tiny_hf, tmp_path)
    data = open(path, "rb").read()
    # Keep the header intact but drop most of the data section.
    reader = gguf.GGUFReader(path)
    start = min(int(t.data_offset) for t in reader.tensors)
    short = str(tmp_path / "short.gguf")
    open(short, "wb").write(data[: start + 100])
    with pytest.raises(gl.CheckpointError, match="runs past the end"):
        gl.load(short)


def test_missing_and_misshaped_tensors(tiny_hf, tmp_path):
    p1 = write_gemma3_gguf(str(tmp_path / "missing.gguf"), tiny_hf, skip=("model.layers.4.mlp.up_proj.weight",))
    with pytest.raises(gl.CheckpointError, match="missing tensor 'blk.4.ffn_up.weight'"):
        gl.load(p1)
    p2 = write_gemma3_gguf(str(tmp_path / "shape.gguf"), tiny_hf,
                           reshape={"model.layers.1.self_attn.o_proj.weight": (64, 96)})
    with pytest.raises(gl.CheckpointError, match="blk.1.attn_output.weight' has shape"):
        gl.load(p2)


def test_not_gemma3(tmp_path):
    path = str(tmp_path / "llama.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gl.CheckpointError, match="not 'gemma3'"):
        gl.load(path)
