"""MaxText Gemma 3 checkpoints: written by orbax-checkpoint itself, as MaxText's checkpoint manager does, from a random
HF model through MaxText's own HF -> MaxText mapping (tests/layouts.py), in every layer layout and storage, and loaded
by gl.load (tensorstore, no JAX) to HF's logits."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemmalens as gl
import layouts
from conftest import build_hf, hf_logits, rel_err

ocp = pytest.importorskip("orbax.checkpoint")  # in the test extra (brings JAX); gemmalens itself needs tensorstore only

IDS = np.arange(4, 30)
# hidden 48: sqrt(48) = 6.93 is not a bfloat16 (6.9375 is), so the embedding's bf16-rounded normalizer is tested;
# 14 layers: two scanned blocks (the stacking order over blocks) and 2 leftover layers in layers_remainder.
DIMS = dict(hidden_size=48, num_hidden_layers=14, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=64, sliding_window=5)
# fp32 end to end: the conversion's w + 1 - 1 and x * n / n round-trips cost an ulp or two (measured ~1e-6)
TOL = 1e-5


@pytest.fixture(scope="module")
def hf14(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf14"))
    hf = build_hf(d, seed=31, **DIMS)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return hf, d, sd, hf_logits(hf, IDS)


def write(tmp_path, sd, hf_dir, layout="scanned", config_at="base", step=7, **kw):
    """A MaxText checkpoint directory (<base>/<step>/items) with config.json at `config_at` ('base', 'step', 'items',
    None); returns (base, items)."""
    base = str(tmp_path / "checkpoints")
    params = layouts.maxtext_params(sd, layout, vocab_size=kw.pop("vocab_size", None), fused_mlp=kw.pop("fused_mlp", False))
    items = layouts.save_maxtext(base, params, step=step, **kw)
    where = {"base": base, "step": os.path.dirname(items), "items": items}.get(config_at)
    if where:
        shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(where, "config.json"))
    return base, items


@pytest.mark.parametrize("layout,ocdbt,zarr3", [
    ("scanned", True, True),     # MaxText's defaults: scan_layers, OCDBT, zarr3
    ("scanned", True, False),
    ("scanned", False, True),    # the plain layout: one directory per array
    ("scanned", False, False),
    ("unscanned", True, True),
    ("unscanned", False, False),
    ("stacked", True, True),     # the older convert_gemma3_chkpt.py
    ("stacked", False, True),
])
def test_layouts_match_hf(hf14, tmp_path, layout, ocdbt, zarr3):
    hf, d, sd, ref = hf14
    base, items = write(tmp_path, sd, d, layout, ocdbt=ocdbt, zarr3=zarr3)
    assert os.path.isfile(os.path.join(items, "manifest.ocdbt")) == ocdbt
    model = gl.load(base)
    assert model.config.num_hidden_layers == 14
    assert rel_err(model.forward(IDS), ref) <= TOL
    # the same weights as HF's own files, to float32 rounding
    ours = model._core.export_tensors()
    direct = gl.load(d)._core.export_tensors()
    assert set(ours) == set(direct)
    for k in ours:
        np.testing.assert_allclose(ours[k], direct[k], rtol=0, atol=2e-6, err_msg=k)


def test_scanned_layers_go_where_maxtext_runs_them(hf14):
    """Block b, position j of the scan is layer 6 b + j; layers_remainder/layers_r is layer 6 (N // 6) + r."""
    _, _, sd, _ = hf14
    p = layouts.maxtext_params(sd, "scanned")["decoder"]
    assert sorted(p["layers"]) == [f"layers_{j}" for j in range(6)]
    assert sorted(p["layers_remainder"]) == ["layers_0", "layers_1"]
    assert p["layers"]["layers_0"]["self_attention"]["query"]["kernel"].shape == (48, 2, 4, 16)  # [E, N//6, H, Hd]
    assert p["layers"]["layers_0"]["pre_ffw_norm"]["scale"].shape == (48, 2)
    from types import SimpleNamespace

    from gemmalens.maxtext import _layers

    groups = {"scanned": [(j, "w", f"s{j}") for j in range(6)], "remainder": [(r, "w", f"r{r}") for r in range(2)]}
    srcs = {f"s{j}": SimpleNamespace(shape=(48, 2), ndim=2) for j in range(6)}
    srcs.update({f"r{r}": SimpleNamespace(shape=(48,), ndim=1) for r in range(2)})
    layers, n, layout = _layers(srcs, groups, "x")
    assert (n, layout) == (14, "scanned")
    for b in range(2):
        for j in range(6):
            assert layers[6 * b + j]["w"] == (srcs[f"s{j}"], b)
    assert [layers[12 + r]["w"] for r in range(2)] == [(srcs["r0"], None), (srcs["r1"], None)]


def test_checkpoint_step_and_items_dirs(hf14, tmp_path):
    """The checkpoints/ directory (its latest step), a step directory, its items/ and a run directory all load; the
    optimizer state is never read (here it is damaged)."""
    hf, d, sd, ref = hf14
    base = str(tmp_path / "run" / "checkpoints")
    other = {k: v * 0.5 for k, v in sd.items()}
    layouts.save_maxtext(base, layouts.maxtext_params(other, "scanned"), step=3, ocdbt=False, zarr3=False)
    items = layouts.save_maxtext(base, layouts.maxtext_params(sd, "scanned"), step=12, ocdbt=False, zarr3=False)
    shutil.copy(os.path.join(d, "config.json"), os.path.join(base, "config.json"))
    n_damaged = 0
    for name in os.listdir(items):
        if name.startswith("opt_state."):
            for root, _, files in os.walk(os.path.join(items, name)):
                for f in files:
                    if f != ".zarray":
                        open(os.path.join(root, f), "wb").close()
                        n_damaged += 1
    assert n_damaged >= 13
    for path in (base, os.path.dirname(base), os.path.dirname(items), items):
        assert rel_err(gl.load(path).forward(IDS), ref) <= TOL, path
    old = gl.load(os.path.join(base, "3"))
    assert rel_err(old.forward(IDS), ref) > 0.01  # step 3 holds other weights: the latest step was the one chosen


@pytest.mark.parametrize("layout,most", [("unscanned", 1), ("scanned", 13 * 6), ("stacked", 13)])
def test_arrays_read_once_and_dropped(hf14, tmp_path, monkeypatch, layout, most):
    """Each stored array is read once, in its stored dtype, when the model first takes a weight from it, and dropped
    after its last: an unscanned checkpoint is held one array at a time, a scanned one's stacked arrays until the
    last block."""
    from gemmalens import maxtext

    _, d, sd, ref = hf14
    base, items = write(tmp_path, sd, d, layout, ocdbt=True, zarr3=True)
    reads, live, peak = [], set(), [0]
    get, release = maxtext._Stored.get, maxtext._Stored.release

    def counted_get(self):
        if self._data is None:
            reads.append(self.name)
        live.add(self.name)
        peak[0] = max(peak[0], len(live))
        return get(self)

    def counted_release(self):
        release(self)
        if self._data is None:
            live.discard(self.name)

    monkeypatch.setattr(maxtext._Stored, "get", counted_get)
    monkeypatch.setattr(maxtext._Stored, "release", counted_release)
    model = gl.load(base)
    assert rel_err(model.forward(IDS), ref) <= TOL
    assert len(reads) == len(set(reads)) and not live
    assert len(reads) == {"unscanned": 2 + 14 * 13, "scanned": 2 + 8 * 13, "stacked": 2 + 13}[layout]
    assert peak[0] <= most


def test_loads_without_jax(hf14, tmp_path):
    _, d, sd, ref = hf14
    base, _ = write(tmp_path, sd, d)
    np.save(str(tmp_path / "ref.npy"), ref)
    code = ("import sys, numpy as np, gemmalens as gl\n"
            f"m = gl.load({base!r})\n"
            f"ref = np.load({str(tmp_path / 'ref.npy')!r})\n"
            f"err = float(np.abs(m.forward(np.arange(4, 30)) - ref).max() / np.abs(ref).max())\n"
            "assert 'jax' not in sys.modules and 'orbax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
            "print(err)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split()[-1]) <= TOL


def test_config_json_beside_any_level_or_passed(hf14, tmp_path):
    hf, d, sd, ref = hf14
    base, items = write(tmp_path, sd, d, config_at=None, ocdbt=False, zarr3=True)
    with pytest.raises(gl.CheckpointError) as e:
        gl.load(base)
    msg = str(e.value)
    # what is required, and how to give it
    for s in ("config.json", "config=", "gemma3-4b", "sliding_window", "rope_theta", "query_pre_attn_scalar",
              "layers=14, hidden=48, heads=4/2, head_dim=16, ffn=64"):
        assert s in msg, (s, msg)
    for cfg in (os.path.join(d, "config.json"), d, gl.Gemma3Config.from_pretrained(d)):
        assert rel_err(gl.load(items, config=cfg).forward(IDS), ref) <= TOL
    for level in (items, os.path.dirname(items)):
        shutil.copy(os.path.join(d, "config.json"), os.path.join(level, "config.json"))
        assert rel_err(gl.load(base).forward(IDS), ref) <= TOL
        os.remove(os.path.join(level, "config.json"))


def test_maxtext_model_names():
    """MaxText's configs/models/gemma3-*.yml facts are the published HF sizes, with MaxText's vocabulary (262144)."""
    from gemmalens.maxtext import MODEL_CONFIGS, model_config

    assert sorted(MODEL_CONFIGS) == ["gemma3-12b", "gemma3-27b", "gemma3-4b"]
    for name in MODEL_CONFIGS:
        c = model_config(name)
        p = gl.Gemma3Config.preset(name.split("-")[1])
        p.vocab_size = 262144
        assert c == p, (name, c, p)
    with pytest.raises(ValueError, match="gemma3-4b"):
        model_config("gemma3-1b")


def test_config_name_that_does_not_match(hf14, tmp_path):
    _, d, sd, _ = hf14
    base, _ = write(tmp_path, sd, d, config_at=None, ocdbt=False, zarr3=True)
    with pytest.raises(gl.CheckpointError, match=r"MaxText model 'gemma3-4b' \(layers=34, hidden=2560.*does not match.*"
                                                 r"layers=14, hidden=48"):
        gl.load(base, config="gemma3-4b")
    with pytest.raises(ValueError, match="config must be"):
        gl.load(base, config="gemma3-5b")
    with pytest.raises(ValueError, match="config= is for checkpoints that carry none"):
        gl.load(d, config="gemma3-4b")


def test_vocab_padded_as_maxtext_to_hf_pads(hf14, tmp_path):
    """MaxText's vocabulary may be smaller than HF's (262144 vs 262208): with an HF config the missing rows are zeros,
    as MaxText's MaxText -> HF conversion pads them; without one the vocabulary is the checkpoint's."""
    hf, d, sd, ref = hf14
    base, items = write(tmp_path, sd, d, "unscanned", vocab_size=256, ocdbt=False, zarr3=True)
    ids = IDS[IDS < 256]
    logits = gl.load(base).forward(ids)
    assert logits.shape[-1] == 320
    assert rel_err(logits[..., :256], ref[..., :256]) <= TOL
    assert np.all(logits[..., 256:] == 0)
    os.remove(os.path.join(base, "config.json"))
    cfg = gl.Gemma3Config.from_pretrained(d)
    cfg.vocab_size = 200
    with pytest.warns(UserWarning, match="256 embedding rows, its config 200"):
        small = gl.load(base, config=cfg)
    assert small.forward(ids[ids < 200]).shape[-1] == 200


def test_fused_mlp_and_a_vision_tower(hf14, tmp_path):
    """fused_mlp's one wi kernel [E, 2, F]; a multimodal checkpoint's vision_encoder is left unread (here damaged)."""
    hf, d, sd, ref = hf14
    params = layouts.maxtext_params(sd, "scanned", fused_mlp=True)
    params["vision_encoder"] = {"VisionEmbedder_0": {"mm_input_projection": {"w": np.ones((8, 48), np.float32)}}}
    items = layouts.save_maxtext(str(tmp_path / "ck"), params, step=2, ocdbt=False, zarr3=True)
    assert "mlp" in params["decoder"]["layers"]["layers_0"] and "wi" in params["decoder"]["layers"]["layers_0"]["mlp"]
    vision = os.path.join(items, "params.params.vision_encoder.VisionEmbedder_0.mm_input_projection.w")
    shutil.rmtree(os.path.join(vision, "c"))
    assert rel_err(gl.load(items, config=d).forward(IDS), ref) <= TOL


def test_bfloat16_nnx_decode_checkpoint(tmp_path):
    """The NNX decode checkpoint (generate_param_only_checkpoint.py: bfloat16, no params/params wrapper, leaves wrapped
    as {'value': x}). The HF weights are rounded first so that MaxText's values are exact bfloat16s (E = 64: sqrt(E) = 8
    is exact), which makes the comparison exact up to float32 arithmetic."""
    import ml_dtypes

    hf = build_hf(str(tmp_path / "hf"), seed=5, num_hidden_layers=7, num_key_value_heads=2)
    bf = lambda a: np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    with torch.no_grad():
        for name, p in hf.named_parameters():
            a = p.detach().numpy()
            a[...] = bf(1.0 + a) - 1.0 if "norm" in name else bf(a)
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    params = layouts.maxtext_params(sd, "unscanned")

    def to_bf16(t):
        if isinstance(t, dict):
            return {k: to_bf16(v) for k, v in t.items()}
        assert np.array_equal(bf(t), t)  # exact
        return t.astype(ml_dtypes.bfloat16)
    items = layouts.save_maxtext(str(tmp_path / "ck"), to_bf16(params), step=0, nnx_decode=True)
    meta = json.load(open(os.path.join(items, "_METADATA")))["tree_metadata"]
    assert "('decoder', 'layers_0', 'mlp', 'wo', 'kernel', 'value')" in meta
    model = gl.load(items, config=str(tmp_path / "hf" / "config.json"))
    assert rel_err(model.forward(IDS), hf_logits(hf, IDS)) <= TOL


def test_normalizer_is_bfloat16_rounding():
    import ml_dtypes

    from gemmalens.maxtext import embedding_normalizer

    for e in list(range(1, 9000)) + [2560, 3840, 5376, 640, 1152]:
        assert embedding_normalizer(e) == float(ml_dtypes.bfloat16(e ** 0.5)), e
    assert (embedding_normalizer(2560), embedding_normalizer(3840), embedding_normalizer(5376)) == (50.5, 62.0, 73.5)


# ---------------------------------------------------------------- what is refused


def llama_params(D=48, F=64, H=4, Hd=12, V=320, L=3, seed=0):
    """A MaxText llama2 tree (models/llama2.py: pre/post_self_attention_layer_norm, untied decoder/logits_dense),
    scanned as decoder/layers/<param> on axis 1."""
    r = np.random.default_rng(seed)
    n = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    return {"token_embedder": {"embedding": n(V, D)},
            "decoder": {"decoder_norm": {"scale": n(D)}, "logits_dense": {"kernel": n(D, V)},
                        "layers": {"self_attention": {"query": {"kernel": n(D, L, H, Hd)}, "key": {"kernel": n(D, L, H, Hd)},
                                                      "value": {"kernel": n(D, L, H, Hd)}, "out": {"kernel": n(H, L, Hd, D)}},
                                   "mlp": {"wi_0": {"kernel": n(D, L, F)}, "wi_1": {"kernel": n(D, L, F)},
                                           "wo": {"kernel": n(F, L, D)}},
                                   "pre_self_attention_layer_norm": {"scale": n(D, L)},
                                   "post_self_attention_layer_norm": {"scale": n(D, L)}}}}


def test_other_architecture_is_refused(tmp_path):
    items = layouts.save_maxtext(str(tmp_path / "llama"), llama_params(), step=100)
    with pytest.raises(gl.CheckpointError, match=r"not a MaxText Gemma 3 text model.*decoder/logits_dense/kernel.*"
                                                 r"pre_self_attention_layer_norm/scale.*lacks 'post_ffw_norm/scale'"):
        gl.load(os.path.dirname(os.path.dirname(items)))


def test_missing_layer_array(hf14, tmp_path):
    _, d, sd, _ = hf14
    params = layouts.maxtext_params(sd, "unscanned")
    del params["decoder"]["layers_3"]["mlp"]["wo"]
    items = layouts.save_maxtext(str(tmp_path / "ck"), params, step=1, ocdbt=False, zarr3=True)
    with pytest.raises(gl.CheckpointError, match=r"layer 3 is missing array 'mlp/wo/kernel'"):
        gl.load(items, config=d)
    params = layouts.maxtext_params(sd, "scanned")
    del params["decoder"]["layers"]["layers_4"]
    items = layouts.save_maxtext(str(tmp_path / "ck2"), params, step=1, ocdbt=False, zarr3=True)
    with pytest.raises(gl.CheckpointError, match=r"positions \[0, 1, 2, 3, 5\] of the 6-layer Gemma 3 pattern"):
        gl.load(items, config=d)


@pytest.mark.parametrize("ocdbt,zarr3", [(False, True), (False, False), (True, True)])
def test_truncated_array_file(hf14, tmp_path, ocdbt, zarr3):
    _, d, sd, _ = hf14
    base, items = write(tmp_path, sd, d, "scanned", ocdbt=ocdbt, zarr3=zarr3, opt_state=False)
    if ocdbt:  # the data files of the OCDBT store: cut the largest (it holds array chunks)
        files = [os.path.join(r, f) for r, _, fs in os.walk(items) for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
    else:
        arr = os.path.join(items, "params.params.decoder.layers.layers_2.mlp.wo.kernel")
        files = [os.path.join(r, f) for r, _, fs in os.walk(arr) for f in fs if f not in (".zarray", "zarr.json")]
    victim = max(files, key=os.path.getsize)
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(gl.CheckpointError, match=r"MaxText checkpoint .*: cannot (open|read) array 'params\.params\."):
        gl.load(base)


def test_missing_chunk_is_an_error_not_zeros(hf14, tmp_path):
    """Orbax writes every chunk (store_array_data_equal_to_fill_value): a chunk file gone is damage, never read as 0."""
    _, d, sd, _ = hf14
    base, items = write(tmp_path, sd, d, "unscanned", ocdbt=False, zarr3=True, opt_state=False)
    arr = os.path.join(items, "params.params.decoder.layers_5.self_attention.query.kernel")
    chunks = [os.path.join(r, f) for r, _, fs in os.walk(arr) for f in fs if f != "zarr.json"]
    assert chunks
    os.remove(chunks[0])
    with pytest.raises(gl.CheckpointError, match=r"cannot read array 'params\.params\.decoder\.layers_5\.self_attention"):
        gl.load(base)
