"""Bad input raises a clear Python exception, never crashes, and the model keeps working."""
import json
import os
import shutil

import numpy as np
import pytest

import gemmalens as gl


@pytest.fixture()
def ckpt(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    return d


def _header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return n, json.loads(f.read(n))


def _write(path, header, data):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)


def test_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        gl.load(str(tmp_path / "nope"))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(gl.CheckpointError, match="holds no weights"):
        gl.load(str(tmp_path))


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(gl.CheckpointError, match="config.json"):
        gl.load(str(ckpt))


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(gl.CheckpointError, match="not valid JSON"):
        gl.load(str(ckpt))


@pytest.mark.parametrize("cut", [0, 4, 8, 20, 200, -1000, -1])
def test_truncated_safetensors(ckpt, cut):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(gl.CheckpointError, match="truncated|corrupt|header"):
        gl.load(str(ckpt))


def test_header_length_past_end(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(gl.CheckpointError, match="runs past the end"):
        gl.load(str(ckpt))


def test_offsets_out_of_range(ckpt):
    f = ckpt / "model.safetensors"
    n, header = _header(f)
    data = f.read_bytes()[8 + n:]
    name = "model.norm.weight"
    header[name]["data_offsets"] = [len(data) - 4, len(data) + 252]
    _write(f, header, data)
    with pytest.raises(gl.CheckpointError, match="outside the data section"):
        gl.load(str(ckpt))


def test_bad_header_json(ckpt):
    f = ckpt / "model.safetensors"
    n, _ = _header(f)
    data = bytearray(f.read_bytes())
    data[8:18] = b"}}}}}}}}}}"
    f.write_bytes(bytes(data))
    with pytest.raises(gl.CheckpointError, match="bad JSON"):
        gl.load(str(ckpt))


def test_size_disagrees_with_shape(ckpt):
    f = ckpt / "model.safetensors"
    n, header = _header(f)
    data = f.read_bytes()[8 + n:]
    header["model.norm.weight"]["shape"] = [65]
    _write(f, header, data)
    with pytest.raises(gl.CheckpointError, match="model.norm.weight"):
        gl.load(str(ckpt))


def _rewrite(ckpt, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(ckpt / "model.safetensors"))
    fn(t)
    save_file(t, str(ckpt / "model.safetensors"))


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(gl.CheckpointError, match=r"missing tensor 'model.layers.3.mlp.up_proj.weight'"):
        gl.load(str(ckpt))


def test_misshaped_tensor(ckpt):
    def f(t):
        t["model.layers.2.self_attn.o_proj.weight"] = np.zeros((64, 100), np.float32)

    _rewrite(ckpt, f)
    with pytest.raises(gl.CheckpointError, match=r"o_proj.weight' has shape \[64, 100\] but the config expects \[64, 128\]"):
        gl.load(str(ckpt))


def test_unexpected_tensor(ckpt):
    def f(t):
        t["model.layers.2.self_attn.q_proj.bias"] = np.zeros(128, np.float32)

    _rewrite(ckpt, f)
    with pytest.raises(gl.CheckpointError, match="unexpected tensor 'model.layers.2.self_attn.q_proj.bias'"):
        gl.load(str(ckpt))


def test_untied_lm_head_refused(ckpt):
    def f(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1

    _rewrite(ckpt, f)
    with pytest.raises(gl.CheckpointError, match="ties them"):
        gl.load(str(ckpt))


def test_bad_arguments_to_load(tiny_dir):
    with pytest.raises(ValueError, match="dtype"):
        gl.load(tiny_dir, dtype="float16")
    with pytest.raises(ValueError, match="threads"):
        gl.load(tiny_dir, threads=0)


def test_bad_tokens_then_model_still_works(tiny_dir):
    model = gl.load(tiny_dir)
    good = model.forward([1, 2, 3])
    V = model.config.vocab_size
    cases = [
        ([-1, 2], ValueError, "out of range"),
        ([1, V], ValueError, "out of range"),
        ([], ValueError, "empty"),
        (np.zeros((2, 0), np.int64), ValueError, "empty"),
        ([[1, 2], [3]], ValueError, "same length"),
        (np.zeros((1, 2, 3), np.int64), ValueError, "1-D"),
        (np.array([1.0, 2.0]), TypeError, "integer"),
        (np.array([True, False]), TypeError, "integer"),
        ("hello", ValueError, "no tokenizer"),  # text is tokenized (as TransformerLens's model(text)), given one
    ]
    for toks, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            model.forward(toks)
    np.testing.assert_array_equal(model.forward([1, 2, 3]), good)


def test_bad_attention_masks(tiny_dir):
    model = gl.load(tiny_dir)
    toks = np.ones((2, 4), np.int64)
    for mask, msg in [
        (np.ones((2, 3)), "shape"),
        (np.array([[1, 1, 0, 1], [1, 1, 1, 1]]), "left padding"),
        (np.array([[0, 0, 0, 0], [1, 1, 1, 1]]), "no real token"),
        (np.array([[2, 1, 1, 1], [1, 1, 1, 1]]), "only 0"),
        (np.array([[0.5, 1, 1, 1], [1, 1, 1, 1]]), "only 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            model.forward(toks, attention_mask=mask)
    with pytest.raises(ValueError, match="return_type"):
        model.forward(toks, return_type="probs")
    with pytest.raises(ValueError, match="at least 2"):
        model.forward([5], return_type="loss")
    assert model.forward(toks).shape == (2, 4, model.config.vocab_size)
