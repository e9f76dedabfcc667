"""Transcoder sets and cross-layer transcoders (CLTs) in circuit-tracer's and Gemma Scope 2's files.

The files are written here in each project's layout (facts in gemmalens/transcoders.py). References: numpy
re-implementations of circuit-tracer's formulas (transcoder/single_layer_transcoder.py, cross_layer_transcoder.py),
circuit-tracer 0.5 itself run in a second interpreter (GEMMALENS_CT_PYTHON, tests/circuit_tracer_reference.py: it cannot
share the test extra's venv), and, for splicing, HF transformers' fp32 model with torch hooks that replace every MLP
output (also the autograd reference for gradients through a spliced CLT)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gemmalens as gl
from conftest import rel_err

CT_PYTHON = os.environ.get("GEMMALENS_CT_PYTHON")
HERE = os.path.dirname(os.path.abspath(__file__))


def close(a, b, tol=1e-5):
    """|a - b| <= tol * max|b| everywhere: float32 sums of a few hundred products differ in their last bits only."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    assert err <= tol, f"relative error {err:.3g} > {tol}"


# ---------------------------------------------------------------------------------------------- fixtures and formulas


def random_clt(rng, N, d, dt, skip=False, negative_thresholds=False):
    """A CLT's parameters in gemmalens's orientation: W_enc [N, d, dt] (x @ W_enc), W_dec[i] [dt, N - i, d]."""
    thr = np.abs(rng.standard_normal((N, dt))) * 0.3
    if negative_thresholds:  # circuit-tracer's JumpReLU, x * (x > t), then lets negative values through
        thr[:, : dt // 4] = -np.abs(thr[:, : dt // 4])
    return dict(W_enc=(rng.standard_normal((N, d, dt)) * 0.3).astype(np.float32),
                b_enc=(rng.standard_normal((N, dt)) * 0.1).astype(np.float32),
                threshold=thr.astype(np.float32),
                W_dec=[(rng.standard_normal((dt, N - i, d)) * 0.15).astype(np.float32) for i in range(N)],
                b_dec=(rng.standard_normal((N, d)) * 0.1).astype(np.float32),
                W_skip=(rng.standard_normal((N, d, d)) * 0.1).astype(np.float32) if skip else None)


def np_encode(pre_x, W_enc, b_enc, threshold, arch):
    pre = pre_x.astype(np.float64) @ W_enc + b_enc
    if arch == "jumprelu_signed":  # circuit-tracer: x * (x > threshold)
        return pre * (pre > threshold)
    if arch == "jumprelu":  # Gemma Scope 2: relu(x) * (x > threshold)
        return np.where((pre > threshold) & (pre > 0), pre, 0.0)
    return np.maximum(pre, 0.0)


def np_clt_encode(p, x, arch):
    """x [N, ..., d] -> [N, ..., dt]: layer i's encoder on layer i's input."""
    thr = p["threshold"] if p["threshold"] is not None else [None] * len(x)
    return np.stack([np_encode(x[i], p["W_enc"][i], p["b_enc"][i], thr[i], arch) for i in range(len(x))])


def np_clt_decode(p, acts, x=None):
    """circuit-tracer's CrossLayerTranscoder.decode: out[j] = sum_{i <= j} acts[i] @ W_dec[i][:, j - i] + b_dec[j]
    (+ x[j] @ W_skip[j])."""
    N = len(acts)
    out = np.zeros(acts.shape[:-1] + (p["b_dec"].shape[1],))
    for j in range(N):
        for i in range(j + 1):
            out[j] += acts[i].astype(np.float64) @ p["W_dec"][i][:, j - i]
        out[j] += p["b_dec"][j]
        if p["W_skip"] is not None:
            out[j] += x[j].astype(np.float64) @ p["W_skip"][j]
    return out


def save(path, tensors):
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, path)


def write_yaml(path, cfg):
    import yaml

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


def write_ct_clt(folder, p, hook_in="hook_resid_mid", config=True):
    """circuit-tracer's CLT layout (CrossLayerTranscoder.to_safetensors): W_enc_{i}: W_enc_i [dt, d], b_enc_i,
    b_dec_i, threshold_i; W_dec_{i}: W_dec_i [dt, N - i, d]."""
    N = len(p["b_dec"])
    for i in range(N):
        t = {f"W_enc_{i}": p["W_enc"][i].T, f"b_enc_{i}": p["b_enc"][i], f"b_dec_{i}": p["b_dec"][i]}
        if p["threshold"] is not None:
            t[f"threshold_{i}"] = p["threshold"][i]
        save(os.path.join(folder, f"W_enc_{i}.safetensors"), t)
        save(os.path.join(folder, f"W_dec_{i}.safetensors"), {f"W_dec_{i}": p["W_dec"][i]})
    if config:
        write_yaml(os.path.join(folder, "config.yaml"), {"model_kind": "cross_layer_transcoder", "feature_input_hook":
                                                         hook_in, "feature_output_hook": "hook_mlp_out"})
    return folder


def write_gs2_clt(folder, p, rng):
    """Gemma Scope 2's CLT layout: params_layer_{i}.safetensors with w_enc [d, dt], w_dec [dt, N, d] whose rows < i are
    unused (filled with noise here: a loader that read them would be caught), b_enc, b_dec, threshold and
    affine_skip_connection (x @ it)."""
    N, d = p["b_dec"].shape
    files = []
    for i in range(N):
        w_dec = (rng.standard_normal((p["W_dec"][0].shape[0], N, d)) * 5).astype(np.float32)
        w_dec[:, i:] = p["W_dec"][i]
        t = {"w_enc": p["W_enc"][i], "w_dec": w_dec, "b_enc": p["b_enc"][i], "b_dec": p["b_dec"][i],
             "threshold": p["threshold"][i]}
        if p["W_skip"] is not None:
            t["affine_skip_connection"] = p["W_skip"][i]
        files.append(os.path.join(folder, f"params_layer_{i}.safetensors"))
        save(files[-1], t)
    return files


def write_ct_layer(path, q):
    """circuit-tracer's SingleLayerTranscoder.to_safetensors: W_enc [dt, d], W_dec [dt, d], b_enc, b_dec,
    activation_function.threshold (JumpReLU), W_skip [d, d] (added as x @ W_skip.T)."""
    t = {"W_enc": q["W_enc"].T, "W_dec": q["W_dec"], "b_enc": q["b_enc"], "b_dec": q["b_dec"]}
    if q.get("threshold") is not None:
        t["activation_function.threshold"] = q["threshold"]
    if q.get("W_skip") is not None:
        t["W_skip"] = q["W_skip"].T
    save(path, t)


def write_gs2_transcoder(folder, q, layer):
    t = {"w_enc": q["W_enc"], "w_dec": q["W_dec"], "b_enc": q["b_enc"], "b_dec": q["b_dec"], "threshold": q["threshold"]}
    if q.get("W_skip") is not None:
        t["affine_skip_connection"] = q["W_skip"]
    save(os.path.join(folder, "params.safetensors"), t)
    json.dump({"architecture": "jump_relu", "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
               "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "width": q["W_enc"].shape[1],
               "l0": 10, "model_name": "gemma-v3-270m-pt", "affine_connection": q.get("W_skip") is not None},
              open(os.path.join(folder, "config.json"), "w"))
    return folder


def random_layer(rng, d, dt, skip=False, jumprelu=True, negative_thresholds=False):
    thr = np.abs(rng.standard_normal(dt)) * 0.3
    if negative_thresholds:
        thr[: dt // 4] *= -1
    return dict(W_enc=(rng.standard_normal((d, dt)) * 0.3).astype(np.float32),
                b_enc=(rng.standard_normal(dt) * 0.1).astype(np.float32),
                threshold=thr.astype(np.float32) if jumprelu else None,
                W_dec=(rng.standard_normal((dt, d)) * 0.15).astype(np.float32),
                b_dec=(rng.standard_normal(d) * 0.1).astype(np.float32),
                W_skip=(rng.standard_normal((d, d)) * 0.1).astype(np.float32) if skip else None)


def np_layer(q, x, arch):
    acts = np_encode(x, q["W_enc"], q["b_enc"], q["threshold"], arch)
    out = acts @ q["W_dec"] + q["b_dec"]
    if q.get("W_skip") is not None:
        out = out + x.astype(np.float64) @ q["W_skip"]
    return acts, out


# ------------------------------------------------------------------------------------------ loading, encode, decode


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_clt_circuit_tracer_folder_encode_decode(tmp_path, dtype):
    rng = np.random.default_rng(0)
    N, d, dt = 5, 24, 40
    p = random_clt(rng, N, d, dt, negative_thresholds=True)
    clt = gl.CLT.load(write_ct_clt(str(tmp_path / "clt"), p), dtype=dtype)
    assert (clt.n_layers, clt.d_model, clt.d_transcoder) == (N, d, dt)
    assert (clt.hook_in, clt.hook_out, clt.architecture) == ("hook_resid_mid", "hook_mlp_out", "jumprelu_signed")
    x = rng.standard_normal((N, 3, 7, d)).astype(np.float32)
    ref_acts = np_clt_encode(p, x, "jumprelu_signed")
    assert (ref_acts < 0).sum() > 20 and (ref_acts > 0).sum() > 100 and (ref_acts == 0).sum() > 100
    acts = clt.encode(x)
    assert acts.shape == (N, 3, 7, dt)
    if dtype == "float32":
        np.testing.assert_array_equal(acts != 0, ref_acts != 0)
        close(acts, ref_acts)
        close(clt.decode(ref_acts), np_clt_decode(p, ref_acts))
        close(clt(x), np_clt_decode(p, ref_acts))
        close(clt.encode_layer(x[3], 3), ref_acts[3])
    else:  # bf16 weights: values to bf16 precision (a feature near its threshold may flip)
        assert rel_err(acts, ref_acts) < 0.05
        assert rel_err(clt.decode(ref_acts), np_clt_decode(p, ref_acts)) < 0.02
    # the folder without config.yaml: the hooks are arguments (circuit-tracer's to_safetensors writes no config)
    os.remove(tmp_path / "clt" / "config.yaml")
    with pytest.raises(ValueError, match="feature_input_hook"):
        gl.CLT.load(str(tmp_path / "clt"))
    again = gl.CLT.load(str(tmp_path / "clt"), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out")
    assert again.hook_in == "ln2.hook_out"  # circuit-tracer's mlp.hook_in: pre_feedforward_layernorm's output
    assert isinstance(gl.load_transcoders(str(tmp_path / "clt"), feature_input_hook="hook_resid_mid",
                                          feature_output_hook="hook_mlp_out"), gl.CLT)


def test_clt_relu_circuit_tracer_folder(tmp_path):
    rng = np.random.default_rng(1)
    p = random_clt(rng, 3, 16, 20)
    p["threshold"] = None
    clt = gl.load_transcoders(write_ct_clt(str(tmp_path / "c"), p, hook_in="mlp.hook_in"))
    assert isinstance(clt, gl.CLT) and clt.architecture == "relu" and clt.hook_in == "ln2.hook_out"
    x = rng.standard_normal((3, 11, 16)).astype(np.float32)
    ref = np_clt_encode(p, x, "relu")
    close(clt.encode(x), ref)
    close(clt.decode(ref), np_clt_decode(p, ref))


def test_clt_gemma_scope_2_folder_and_config(tmp_path):
    rng = np.random.default_rng(2)
    N, d, dt = 4, 16, 24
    p = random_clt(rng, N, d, dt, skip=True)
    folder = str(tmp_path / "gemma-scope-2-270m-pt" / "clt" / "width_96_l0_medium_affine")
    files = write_gs2_clt(folder, p, rng)
    clt = gl.CLT.load(folder)
    assert (clt.hook_in, clt.hook_out, clt.architecture) == ("ln2.hook_out", "hook_mlp_out", "jumprelu")
    assert clt.W_skip is not None
    x = rng.standard_normal((N, 2, 5, d)).astype(np.float32)
    ref_acts = np_clt_encode(p, x, "jumprelu")
    close(clt.encode(x), ref_acts)
    ref = np_clt_decode(p, ref_acts, x)  # only rows i.. of each w_dec (the noise in rows < i would show)
    close(clt.decode(ref_acts, x), ref)
    close(clt(x), ref)
    with pytest.raises(ValueError, match="skip connections and needs the inputs"):
        clt.decode(ref_acts)
    # circuit-tracer's config for Gemma Scope 2 CLTs: model_kind cross_layer_transcoder with a transcoders list
    cfg = str(tmp_path / "ct_config.yaml")
    write_yaml(cfg, {"model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
                     "feature_output_hook": "hook_mlp_out", "model_name": "google/gemma-3-270m", "transcoders": files})
    via = gl.load_transcoders(cfg)
    assert isinstance(via, gl.CLT) and via.hook_in == "ln2.hook_out" and via.model_name == "google/gemma-3-270m"
    close(via(x), ref)


def test_transcoder_sets(tmp_path):
    """circuit-tracer's per-layer files (JumpReLU without ReLU, W_skip as x @ W_skip.T; ReLU without a threshold),
    by config.yaml beside layer_{i}.safetensors and by a transcoders list; Gemma Scope 2 transcoder folders, as a list
    of folders and through a circuit-tracer config listing their params.safetensors."""
    rng = np.random.default_rng(3)
    d, dt, N = 16, 30, 4
    qs = [random_layer(rng, d, dt, skip=True, negative_thresholds=True) for _ in range(N)]
    qs[2] = random_layer(rng, d, dt, jumprelu=False)
    folder = str(tmp_path / "ct")
    for i, q in enumerate(qs):
        write_ct_layer(os.path.join(folder, f"layer_{i}.safetensors"), q)
    write_yaml(os.path.join(folder, "config.yaml"), {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                     "feature_output_hook": "hook_mlp_out"})
    x = rng.standard_normal((N, 9, d)).astype(np.float32)
    ref = [np_layer(q, x[i], "relu" if q["threshold"] is None else "jumprelu_signed") for i, q in enumerate(qs)]
    assert (ref[0][0] < 0).any()  # negative thresholds let negative features through
    for tset in (gl.TranscoderSet.load(folder), gl.load_transcoders(os.path.join(folder, "config.yaml"))):
        assert isinstance(tset, gl.TranscoderSet) and tset.layers == list(range(N)) and tset.d_transcoder == dt
        assert tset[1].hook_name == "blocks.1.ln2.hook_out" and tset[1].hook_name_out == "blocks.1.hook_mlp_out"
        assert [s.architecture for s in tset] == ["jumprelu_signed", "jumprelu_signed", "relu", "jumprelu_signed"]
        with pytest.raises(ValueError, match="jumprelu_signed"):  # the native ablation knows Gemma Scope's JumpReLU only
            gl.interventions.ablate_features(tset[0], [1])
        acts = tset.encode(x)
        close(acts, np.stack([r[0] for r in ref]))
        close(tset.decode(acts, x), np.stack([r[1] for r in ref]))
        close(tset(x), np.stack([r[1] for r in ref]))
    # Gemma Scope 2 folders (relu(x) * mask; x @ affine_skip_connection)
    gq = [random_layer(rng, d, dt, skip=i % 2 == 0) for i in range(N)]
    dirs = [write_gs2_transcoder(str(tmp_path / "gs2" / f"layer_{i}_width_30_l0_small"), q, i) for i, q in enumerate(gq)]
    gref = [np_layer(q, x[i], "jumprelu") for i, q in enumerate(gq)]
    cfg = str(tmp_path / "gs2_config.yaml")
    write_yaml(cfg, {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook":
                     "hook_mlp_out", "transcoders": [os.path.join(p, "params.safetensors") for p in dirs]})
    for tset in (gl.TranscoderSet.load(dirs), gl.TranscoderSet.load(cfg)):
        assert tset.layers == list(range(N)) and tset[3].hook_name == "blocks.3.ln2.hook_out"
        close(tset.encode(x), np.stack([r[0] for r in gref]))
        close(tset(x), np.stack([r[1] for r in gref]))


def test_bad_files_are_clear_errors(tmp_path, small):
    rng = np.random.default_rng(4)
    p = random_clt(rng, 3, 16, 8)
    good = write_ct_clt(str(tmp_path / "good"), p)
    with pytest.raises(ValueError, match="spans 3 layers but the model has 7"):
        small.run_with_saes([1, 2, 3], saes=[gl.CLT.load(good)])
    # a missing decoder file, a gap in the numbering, a decoder of the wrong shape, a tensor the layout lacks
    bad = write_ct_clt(str(tmp_path / "b1"), p)
    os.remove(os.path.join(bad, "W_dec_1.safetensors"))
    with pytest.raises(FileNotFoundError, match="W_dec_1.safetensors"):
        gl.CLT.load(bad)
    bad = write_ct_clt(str(tmp_path / "b2"), p)
    os.rename(os.path.join(bad, "W_enc_1.safetensors"), os.path.join(bad, "W_enc_7.safetensors"))
    with pytest.raises(gl.CheckpointError, match=r"numbered \[0, 2, 7\]"):
        gl.CLT.load(bad)
    bad = write_ct_clt(str(tmp_path / "b3"), p)
    save(os.path.join(bad, "W_dec_1.safetensors"), {"W_dec_1": p["W_dec"][0]})
    with pytest.raises(gl.CheckpointError, match=r"W_dec_1' has shape \(8, 3, 16\), expected \(8, 2, 16\)"):
        gl.CLT.load(bad)
    bad = write_ct_clt(str(tmp_path / "b4"), p)
    save(os.path.join(bad, "W_enc_0.safetensors"), {"W_enc_0": p["W_enc"][0].T, "b_enc_0": p["b_enc"][0],
                                                    "b_dec_0": p["b_dec"][0], "threshold_0": p["threshold"][0],
                                                    "W_skip_0": np.eye(16)})
    with pytest.raises(gl.CheckpointError, match="W_skip_0"):
        gl.CLT.load(bad)
    # config problems
    write_yaml(os.path.join(good, "config.yaml"), {"model_kind": "cross_layer_transcoder", "feature_input_hook":
                                                   "blocks.0.hook_resid_pre", "feature_output_hook": "hook_mlp_out"})
    with pytest.raises(ValueError, match="feature_input_hook 'blocks.0.hook_resid_pre' is not supported"):
        gl.CLT.load(good)
    write_yaml(os.path.join(good, "config.yaml"), {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                                   "feature_output_hook": "hook_mlp_out"})
    with pytest.raises(ValueError, match="gl.TranscoderSet.load"):
        gl.CLT.load(good)
    with open(os.path.join(good, "config.yaml"), "w") as f:
        f.write("model_kind: [unclosed\n")
    with pytest.raises(gl.CheckpointError, match="YAML"):
        gl.CLT.load(good)
    # Gemma Scope 2: a file count that disagrees with w_dec's layers; a CLT layer given as a per-layer transcoder
    files = write_gs2_clt(str(tmp_path / "gs2"), random_clt(rng, 3, 16, 8), rng)
    os.remove(files[-1])
    with pytest.raises(gl.CheckpointError, match="decodes to 3 layers but there are 2 layer files"):
        gl.CLT.load(str(tmp_path / "gs2"))
    write_yaml(str(tmp_path / "set.yaml"), {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
                                            "feature_output_hook": "hook_mlp_out", "transcoders": files[:2]})
    with pytest.raises(ValueError, match="gl.CLT.load"):
        gl.TranscoderSet.load(str(tmp_path / "set.yaml"))
    with pytest.raises(FileNotFoundError):
        gl.CLT.load(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither"):
        gl.load_transcoders(str(tmp_path / "empty"))
    assert small.forward([1, 2, 3]).shape == (1, 3, 320)


# ------------------------------------------------------------------------------------------ circuit-tracer itself


def test_against_circuit_tracer_itself(tmp_path):
    """circuit-tracer 0.5's own loaders and encode / decode on the same files give the same features and
    reconstructions (1e-5). Its Gemma Scope 2 CLT loader reads one layer file too few (range(max(paths))): on N files
    it fails, which the reference records; given one more key it reads them all and agrees with gemmalens."""
    if not CT_PYTHON:
        pytest.skip("GEMMALENS_CT_PYTHON is not set: point it at a Python with circuit-tracer==0.5.0 and torch==2.13.0 "
                    "(.ci/run creates one)")
    rng = np.random.default_rng(5)
    root = tmp_path / "fixtures"
    N, d, dt, P = 4, 24, 48, 10
    ours = {}
    # ct_set: circuit-tracer layer files, JumpReLU (some thresholds negative) with W_skip, and a ReLU layer
    qs = [random_layer(rng, d, dt, skip=True, negative_thresholds=True) for _ in range(N)]
    qs[1] = random_layer(rng, d, dt, skip=True, jumprelu=False)
    for i, q in enumerate(qs):
        write_ct_layer(str(root / "ct_set" / f"layer_{i}.safetensors"), q)
    write_yaml(str(root / "ct_set" / "config.yaml"), {
        "model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
        "transcoders": [str(root / "ct_set" / f"layer_{i}.safetensors") for i in range(N)]})
    ours["ct_set"] = gl.TranscoderSet.load(str(root / "ct_set"))
    # gs2_set: Gemma Scope 2 params.safetensors listed in a circuit-tracer config
    gq = [random_layer(rng, d, dt, skip=i != 2) for i in range(N)]
    dirs = [write_gs2_transcoder(str(root / "gs2" / f"layer_{i}"), q, i) for i, q in enumerate(gq)]
    write_yaml(str(root / "gs2_set" / "config.yaml"), {
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": [os.path.join(p, "params.safetensors") for p in dirs]})
    ours["gs2_set"] = gl.TranscoderSet.load(str(root / "gs2_set"))
    # ct_clt: circuit-tracer's CLT folder (JumpReLU, some thresholds negative); gs2_clt: Gemma Scope 2 CLT files
    ours["ct_clt"] = gl.CLT.load(write_ct_clt(str(root / "ct_clt"), random_clt(rng, N, d, dt, negative_thresholds=True)))
    files = write_gs2_clt(str(root / "gs2_clt_files"), random_clt(rng, N, d, dt, skip=True), rng)
    write_yaml(str(root / "gs2_clt" / "config.yaml"), {
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out", "transcoders": files})
    ours["gs2_clt"] = gl.CLT.load(str(root / "gs2_clt"))
    for name in ours:
        x = rng.standard_normal((N, P, d)).astype(np.float32)
        x[:, -1] *= 3  # every position (the last too) has active features: circuit-tracer's CLT decode sizes its
        np.save(root / name / "x.npy", x)  # output by the last position with one
    out = tmp_path / "ct.npz"
    run = subprocess.run([CT_PYTHON, os.path.join(HERE, "circuit_tracer_reference.py"), str(root), str(out)],
                         capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, f"circuit-tracer reference failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    ref = dict(np.load(out))
    assert str(ref["version"]) == "0.5.0"
    for name, tc in ours.items():
        x = np.load(root / name / "x.npy")
        acts = tc.encode(x)
        assert (acts != 0).sum() > 100 and (acts == 0).sum() > 100, name
        np.testing.assert_array_equal(acts != 0, ref[f"{name}/acts"] != 0, err_msg=name)
        close(acts, ref[f"{name}/acts"])
        close(tc.decode(acts, x), ref[f"{name}/recon"])
    assert (ref["ct_set/acts"] < 0).any() and (ref["ct_clt/acts"] < 0).any()  # circuit-tracer's JumpReLU, matched
    # the defect: on the N files of its own Gemma Scope 2 CLT config, circuit-tracer reads N - 1 and fails
    assert "size mismatch for W_dec.0" in str(ref["gs2_clt/error"])


# ------------------------------------------------------------------------------------------ splicing


@pytest.fixture(scope="module")
def small(hf_models):
    return gl.load(hf_models["mqa_scaled_softcap"][1])


@pytest.fixture(scope="module")
def hf_small(hf_models):
    return hf_models["mqa_scaled_softcap"][0]


def hf_clt_forward(hf, ids, p, arch, hook_in, error_term, edit=None, grad_metric=False, patch=None):
    """Reference: HF's fp32 model with torch hooks that run the CLT: at layer i's input (pre_feedforward_layernorm's
    output for ln2.hook_out, its input for hook_resid_mid, the input's x / rms(x) for ln2.hook_normalized) the
    features (edited by edit(i, acts)), decoded into every later layer's share; at layer j's output
    (post_feedforward_layernorm) the sum, + b_dec[j] (+ x_j @ W_skip[j]), plus, with the error term, the MLP's own
    output minus the reconstruction from the unedited features, a constant (SAELens's convention). patch: {j: array}
    replaces layer j's reconstruction. -> (logits, feature tensors per layer, embedding output) in torch."""
    import torch

    N = len(p["b_dec"])
    t = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else
             None if v is None else [torch.from_numpy(a) for a in v]) for k, v in p.items()}
    recon = [0.0] * N
    clean = [0.0] * N
    feats, skip = {}, {}
    handles = []

    def enc(i, x):
        pre = x @ t["W_enc"][i] + t["b_enc"][i]
        if arch == "relu":
            return torch.relu(pre)
        mask = (pre > t["threshold"][i]) if arch == "jumprelu_signed" else (pre > t["threshold"][i]) & (pre > 0)
        return pre * mask.to(pre.dtype)  # the mask is a constant: the gradient passes where a feature is on

    def read(i):
        def hook(mod, inp, out):
            x = {"ln2.hook_out": out, "hook_resid_mid": inp[0],
                 "ln2.hook_normalized": inp[0] * torch.rsqrt(inp[0].pow(2).mean(-1, keepdim=True) + mod.eps)}[hook_in]
            a = enc(i, x)
            a_used = edit(i, a) if edit is not None else a
            feats[i] = a_used
            for j in range(i, N):
                recon[j] = recon[j] + a_used @ t["W_dec"][i][:, j - i]
                clean[j] = clean[j] + (a @ t["W_dec"][i][:, j - i]).detach()
            if t["W_skip"] is not None:
                skip[i] = x @ t["W_skip"][i]
        return hook

    def write(j):
        def hook(mod, inp, out):
            r = recon[j] + t["b_dec"][j] + (skip[j] if t["W_skip"] is not None else 0.0)
            if patch is not None and j in patch:
                r = torch.from_numpy(patch[j])
            if not error_term:
                return r
            c = clean[j] + t["b_dec"][j] + (skip[j].detach() if t["W_skip"] is not None else 0.0)
            return r + (out - c).detach()
        return hook

    emb = {}

    def keep_embed(mod, inp, out):
        emb["x"] = out

    layers = hf.model.layers
    handles.append(hf.model.embed_tokens.register_forward_hook(keep_embed))
    for i in range(N):
        handles.append(layers[i].pre_feedforward_layernorm.register_forward_hook(read(i)))
        handles.append(layers[i].post_feedforward_layernorm.register_forward_hook(write(i)))
    try:
        with torch.set_grad_enabled(grad_metric):
            logits = hf(torch.as_tensor(ids, dtype=torch.long)).logits
    finally:
        for h in handles:
            h.remove()
    return logits, feats, emb["x"]


@pytest.mark.parametrize("kind,hook_in", [("ct", "hook_resid_mid"), ("ct", "ln2.hook_normalized"),
                                          ("gs2", "ln2.hook_out")])
def test_clt_splice_against_hf_with_every_mlp_replaced(small, hf_small, tmp_path, kind, hook_in):
    """Without the error term the logits equal HF's model with every MLP output replaced by the CLT's
    reconstruction; with it, the plain model's; captured features equal the CLT's encoding of the captured inputs."""
    rng = np.random.default_rng(6)
    N, d, dt = 7, 64, 48
    ids = rng.integers(0, 320, (2, 9))
    if kind == "ct":
        p = random_clt(rng, N, d, dt, negative_thresholds=True)
        clt = gl.CLT.load(write_ct_clt(str(tmp_path / "c"), p, hook_in=hook_in))  # circuit-tracer's name, the same
        arch = "jumprelu_signed"
    else:
        p = random_clt(rng, N, d, dt, skip=True)
        write_gs2_clt(str(tmp_path / "g"), p, rng)
        clt = gl.CLT.load(str(tmp_path / "g"))
        arch = "jumprelu"
    assert clt.hook_in == hook_in
    ref, _, _ = hf_clt_forward(hf_small, ids, p, arch, hook_in, error_term=False)
    spliced = small.run_with_saes(ids, saes=[clt])
    plain = small.forward(ids)
    assert rel_err(spliced, ref.numpy()) <= 1e-4
    assert rel_err(spliced, plain) > 0.05  # the replacement changes the output: the comparison means something
    with small.saes([clt], use_error_term=True):
        logits, cache = small.run_with_cache(ids, names_filter=lambda n: "clt" in n or n.endswith(hook_in))
    assert rel_err(logits, plain) <= 1e-5
    names = list(cache.keys())
    assert names.index("blocks.2.hook_clt_acts_post") == names.index(f"blocks.2.{hook_in}") + 1
    for i in range(N):
        x = cache[f"blocks.{i}.{hook_in}"]
        acts = cache[f"blocks.{i}.hook_clt_acts_post"]
        assert acts.shape == (2, 9, dt)
        close(acts, np_encode(x, p["W_enc"][i], p["b_enc"][i], p["threshold"][i], arch), 1e-5)
    # recon and error add up to the model's own MLP output
    _, c2 = small.run_with_cache(ids, names_filter="blocks.4.hook_mlp_out")
    close(cache["blocks.4.hook_clt_recon"] + cache["blocks.4.hook_clt_error"], c2["blocks.4.hook_mlp_out"], 1e-5)


def test_clt_feature_patching_and_generation(small, hf_small, tmp_path):
    """Editing layer 2's features (hooks on blocks.2.hook_clt_acts_post) changes every later MLP output by the edited
    features' decoder contributions; with the error term the rest of the model is its own. Generation with a CLT
    spliced (the KV cache path) picks the tokens of the full forward with the CLT."""
    rng = np.random.default_rng(7)
    N, d, dt = 7, 64, 48
    p = random_clt(rng, N, d, dt, skip=True)
    write_gs2_clt(str(tmp_path / "g"), p, rng)
    clt = gl.CLT.load(str(tmp_path / "g"))
    ids = rng.integers(0, 320, (1, 10))
    with small.saes([clt], use_error_term=True):
        _, cache = small.run_with_cache(ids, names_filter="blocks.2.hook_clt_acts_post")
    a2 = cache["blocks.2.hook_clt_acts_post"]
    feats = [int(f) for f in np.argsort(-(a2 != 0).sum((0, 1)))[:4]]
    assert (a2[..., feats] != 0).any()

    def zero(a, hook):
        a[..., feats] = 0

    def zero_t(i, a):
        if i != 2:
            return a
        a = a.clone()
        a[..., feats] = 0
        return a

    for error_term in (True, False):
        ours = small.run_with_saes(ids, saes=[clt], use_error_term=error_term,
                                   fwd_hooks=[("blocks.2.hook_clt_acts_post", zero)])
        ref, _, _ = hf_clt_forward(hf_small, ids, p, "jumprelu", "ln2.hook_out", error_term, edit=zero_t)
        assert rel_err(ours, ref.numpy()) <= 1e-4
        assert rel_err(ours, small.run_with_saes(ids, saes=[clt], use_error_term=error_term)) > 1e-3
    # a patch of the reconstruction itself: blocks.5.hook_clt_recon replaced
    patch = rng.standard_normal((1, 10, d)).astype(np.float32)
    ours = small.run_with_saes(ids, saes=[clt], fwd_hooks=[("blocks.5.hook_clt_recon", lambda a, h: patch)])
    ref, _, _ = hf_clt_forward(hf_small, ids, p, "jumprelu", "ln2.hook_out", False, patch={5: patch})
    assert rel_err(ours, ref.numpy()) <= 1e-4
    # generation: the KV-cache steps with the CLT spliced give the full forward's greedy tokens
    with small.saes([clt]):
        gen = small.generate(list(ids[0]), max_new_tokens=4, ignore_eos=True)
    seq = list(ids[0])
    for _ in range(4):
        seq.append(int(small.run_with_saes([seq], saes=[clt])[0, -1].argmax()))
    assert list(gen) == seq[10:]


@pytest.mark.parametrize("error_term", [True, False])
def test_clt_gradients_against_torch_autograd(small, hf_small, tmp_path, error_term):
    """A gradient run through a spliced CLT: the loss's gradient at every layer's features and at the embedding equals
    torch autograd over the HF reference forward (the error term a constant; a feature passes its gradient where it
    is on), with a hook editing layer 1's features in the forward taking part."""
    import torch

    rng = np.random.default_rng(8)
    N, d, dt = 7, 64, 32
    p = random_clt(rng, N, d, dt, skip=True)
    write_gs2_clt(str(tmp_path / "g"), p, rng)
    clt = gl.CLT.load(str(tmp_path / "g"))
    ids = rng.integers(0, 320, (1, 8))

    def scale(a, hook):
        return a * 1.5

    with small.saes([clt], use_error_term=error_term):
        _, cache = small.run_with_cache(ids, incl_bwd=True, metric="loss",
                                        names_filter=lambda n: n.endswith("hook_clt_acts_post") or n == "hook_embed",
                                        fwd_hooks=[("blocks.1.hook_clt_acts_post", scale)])
    logits, feats, emb = hf_clt_forward(hf_small, ids, p, "jumprelu", "ln2.hook_out", error_term,
                                        edit=lambda i, a: a * 1.5 if i == 1 else a, grad_metric=True)
    tl = torch.as_tensor(ids, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], tl[0, 1:])
    *g_feats, g_emb = torch.autograd.grad(loss, [feats[i] for i in range(N)] + [emb])  # (no parameter .grad)
    assert abs(cache.metric_value - loss.item()) <= 1e-5 * abs(loss.item())
    for i in range(N):
        g = cache[f"blocks.{i}.hook_clt_acts_post_grad"]
        assert np.abs(g).max() > 0
        close(g, g_feats[i].numpy(), 2e-4)
    close(cache["hook_embed_grad"], g_emb.numpy(), 2e-4)


def test_transcoder_set_splice(small, hf_small, tmp_path):
    """A circuit-tracer transcoder set splices each layer's transcoder (features at
    blocks.L.<input hook>.hook_sae_acts_post): the logits equal HF's model with each MLP output replaced."""
    import torch

    rng = np.random.default_rng(9)
    N, d, dt = 7, 64, 40
    qs = [random_layer(rng, d, dt, skip=True, negative_thresholds=True) for _ in range(N)]
    folder = str(tmp_path / "ct")
    for i, q in enumerate(qs):
        write_ct_layer(os.path.join(folder, f"layer_{i}.safetensors"), q)
    write_yaml(os.path.join(folder, "config.yaml"), {"model_kind": "transcoder_set", "feature_input_hook":
                                                     "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
                                                     "model_name": "google/gemma-3-270m"})
    tset = gl.TranscoderSet.load(folder)
    ids = rng.integers(0, 320, (1, 9))

    def read(i, store):
        def hook(mod, inp, out):
            store[i] = inp[0]
        return hook

    def write(i, store):
        q = {k: None if v is None else torch.from_numpy(v) for k, v in qs[i].items()}

        def hook(mod, inp, out):
            x = store[i]
            pre = x @ q["W_enc"] + q["b_enc"]
            return (pre * (pre > q["threshold"])) @ q["W_dec"] + q["b_dec"] + x @ q["W_skip"]
        return hook

    store, handles = {}, []
    for i, layer in enumerate(hf_small.model.layers):
        handles.append(layer.pre_feedforward_layernorm.register_forward_hook(read(i, store)))
        handles.append(layer.post_feedforward_layernorm.register_forward_hook(write(i, store)))
    try:
        with torch.no_grad():
            ref = hf_small(torch.as_tensor(ids)).logits.numpy()
    finally:
        for h in handles:
            h.remove()
    assert rel_err(small.run_with_saes(ids, saes=[tset]), ref) <= 1e-4
    with small.saes([tset], use_error_term=True):
        logits, cache = small.run_with_cache(ids, names_filter="blocks.3.hook_resid_mid.hook_sae_acts_post")
    assert rel_err(logits, small.forward(ids)) <= 1e-5
    assert cache["blocks.3.hook_resid_mid.hook_sae_acts_post"].shape == (1, 9, dt)


def test_hub_ids_and_hf_uris_from_the_hf_cache_offline(tmp_path):
    """config.yaml's transcoders may be hf://owner/repo/path URIs (circuit-tracer's Gemma Scope 2 configs), and the
    loaders take hub repository ids with the folder inside (circuit-tracer's own references, e.g.
    mwhanna/gemma-scope-2-270m-pt/clt/...): fetched through huggingface_hub, here from an HF cache in HF's layout built
    by the test, with HF_HUB_OFFLINE=1."""
    rng = np.random.default_rng(10)
    p = random_clt(rng, 3, 16, 8, skip=True)
    commit = "0123456789abcdef0123456789abcdef01234567"

    def repo(name):
        r = tmp_path / "hub" / f"models--{name.replace('/', '--')}"
        (r / "refs").mkdir(parents=True)
        (r / "refs" / "main").write_text(commit)
        return r / "snapshots" / commit

    write_gs2_clt(str(repo("google/gemma-scope-2-test") / "clt" / "w"), p, rng)
    cfg = {"model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
           "feature_output_hook": "hook_mlp_out",
           "transcoders": [f"hf://google/gemma-scope-2-test/clt/w/params_layer_{i}.safetensors" for i in range(3)]}
    write_yaml(str(tmp_path / "config.yaml"), cfg)
    write_yaml(str(repo("gemmalens-test/ct-configs") / "clt" / "w" / "config.yaml"), cfg)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf_home"))
    child = ("import sys, numpy as np, gemmalens as gl\n"
             "x = np.load(sys.argv[2])\n"
             "ys = [gl.load_transcoders(sys.argv[1])(x), gl.load_transcoders('gemmalens-test/ct-configs/clt/w')(x),\n"
             "      gl.CLT.load('google/gemma-scope-2-test', 'clt/w')(x)]\n"
             "np.save(sys.argv[3], np.stack(ys))\n"
             "try:\n"
             "    gl.CLT.load('gemmalens-test/not-cached', 'clt/w')\n"
             "except FileNotFoundError as e:\n"
             "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", child, str(tmp_path / "config.yaml"), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = np_clt_decode(p, np_clt_encode(p, x, "jumprelu"), x)
    for y in np.load(tmp_path / "y.npy"):
        close(y, ref)
    assert "CLT.load: 'clt/w' of the hub repository 'gemmalens-test/not-cached' could not be fetched" in r.stdout


def test_clt_weights_pickle_and_harvest(small, tmp_path):
    """A CLT's weights read back from its native copies; pickled (how SAEs travel to Ray actors) it encodes and
    decodes the same; gl.harvest writes CLT and transcoder-set features as run_with_cache gives them (spliced with the
    error term), and a harvest folder made with one CLT is refused to another whose weights differ."""
    import pickle

    rng = np.random.default_rng(11)
    N, d, dt = 7, 64, 24
    p = random_clt(rng, N, d, dt, skip=True)
    write_gs2_clt(str(tmp_path / "g"), p, rng)
    clt = gl.CLT.load(str(tmp_path / "g"))
    np.testing.assert_array_equal(clt.W_enc(3), p["W_enc"][3])
    np.testing.assert_array_equal(clt.W_dec(3), p["W_dec"][3])
    x = rng.standard_normal((N, 5, d)).astype(np.float32)
    copy = pickle.loads(pickle.dumps(clt))
    np.testing.assert_array_equal(copy(x), clt(x))
    assert (copy.hook_in, copy.architecture) == (clt.hook_in, clt.architecture)
    half = gl.CLT.load(str(tmp_path / "g"), dtype="bfloat16")
    assert rel_err(half.W_dec(0), p["W_dec"][0]) < 2 ** -7  # bf16 storage, widened
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(half))(x), half(x))

    qs = [random_layer(rng, d, 16) for _ in range(N)]
    for i, q in enumerate(qs):
        write_ct_layer(str(tmp_path / "ct" / f"layer_{i}.safetensors"), q)
    tset = gl.TranscoderSet.load(str(tmp_path / "ct"), feature_input_hook="hook_resid_mid",
                                 feature_output_hook="hook_mlp_out")
    rows = rng.integers(0, 320, (6, 8))
    hooks = ["blocks.2.hook_clt_acts_post", "blocks.4.hook_clt_recon", "blocks.3.hook_resid_mid.hook_sae_acts_post",
             "blocks.4.hook_resid_post"]
    r = gl.harvest(small, rows, hooks, tmp_path / "h", context_size=8, saes=[clt, tset], format="safetensors",
                   progress=False)
    got = r.load()
    with small.saes([clt, tset], use_error_term=True):
        _, cache = small.run_with_cache(got["token_ids"], names_filter=hooks)
    for h in hooks:
        close(got[h], cache[h], 1e-6)
    assert (got["blocks.2.hook_clt_acts_post"] != 0).mean() > 0.05
    p["b_enc"][5, 0] += 1.0
    write_gs2_clt(str(tmp_path / "g2"), p, rng)
    with pytest.raises(gl.HarvestError, match="different harvest.*saes"):
        gl.harvest(small, rows, hooks, tmp_path / "h", context_size=8, saes=[gl.CLT.load(str(tmp_path / "g2")), tset],
                   format="safetensors", progress=False)


def test_missing_pyyaml_names_the_extra(tmp_path, monkeypatch):
    write_ct_clt(str(tmp_path / "c"), random_clt(np.random.default_rng(12), 2, 8, 4))
    monkeypatch.setitem(sys.modules, "yaml", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'gemmalens\[transcoders\]'"):
        gl.CLT.load(str(tmp_path / "c"))


def test_clt_from_arrays_and_misuse(small):
    """gl.CLT(...) from arrays (hooks by circuit-tracer's names or gemmalens's), shapes checked; SAE-only
    interventions name what to do with a CLT instead."""
    rng = np.random.default_rng(13)
    N, d, dt = 7, 64, 12
    p = random_clt(rng, N, d, dt)
    clt = gl.CLT(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], threshold=p["threshold"], hook_in="mlp.hook_in")
    assert (clt.hook_in, clt.architecture) == ("ln2.hook_out", "jumprelu")
    x = rng.standard_normal((N, 3, d)).astype(np.float32)
    close(clt.encode(x), np_clt_encode(p, x, "jumprelu"))
    with pytest.raises(ValueError, match=r"layer 1: W_enc must be \(64, 12\) and W_dec \(12, 6, 64\)"):
        gl.CLT(p["W_enc"], p["b_enc"], [p["W_dec"][0]] * N, p["b_dec"], threshold=p["threshold"])
    with pytest.raises(ValueError, match="threshold must be None"):
        gl.CLT(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], threshold=p["threshold"], architecture="relu")
    with pytest.raises(ValueError, match="feature_input_hook 'hook_resid_post'"):
        gl.CLT(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], hook_in="hook_resid_post")
    with pytest.raises(ValueError, match=r"expected \[n_layers = 7, \.\.\., 64\]"):
        clt.encode(x[:3])
    with pytest.raises(TypeError, match="blocks.L.hook_clt_acts_post"):
        gl.interventions.steer(clt, 0)
    with pytest.raises(TypeError, match="expected gl.SAE, gl.TranscoderSet or gl.CLT"):
        small.run_with_saes([1, 2], saes=["not an sae"])


def test_clt_backward_hooks(small, hf_small, tmp_path):
    """Backward hooks on a CLT's feature hooks edit what flows on: with the error term (a constant) and every
    layer's feature gradient zeroed, nothing flows back through any MLP, so the embedding's gradient is HF's with
    every MLP output detached."""
    import torch

    rng = np.random.default_rng(14)
    p = random_clt(rng, 7, 64, 16)
    clt = gl.CLT.load(write_ct_clt(str(tmp_path / "c"), p, hook_in="mlp.hook_in"))
    ids = rng.integers(0, 320, (1, 7))
    got = {}

    def keep(g, hook):
        got[hook.name] = g.copy()

    with small.saes([clt], use_error_term=True):
        small.run_with_hooks(ids, metric="loss", bwd_hooks=[(lambda n: n.endswith("hook_clt_acts_post"),
                                                             lambda g, hook: np.zeros_like(g)), ("hook_embed", keep)])
        _, cache = small.run_with_cache(ids, incl_bwd=True, metric="loss", names_filter="hook_embed")
    handles = [layer.post_feedforward_layernorm.register_forward_hook(lambda m, i, o: o.detach())
               for layer in hf_small.model.layers]
    emb = {}
    handles.append(hf_small.model.embed_tokens.register_forward_hook(lambda m, i, o: emb.setdefault("x", o)))
    try:
        tl = torch.as_tensor(ids, dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(hf_small(tl).logits[0, :-1], tl[0, 1:])
        (g_emb,) = torch.autograd.grad(loss, [emb["x"]])
    finally:
        for h in handles:
            h.remove()
    close(got["hook_embed"], g_emb.numpy(), 2e-4)
    assert rel_err(cache["hook_embed_grad"], got["hook_embed"]) > 1e-3  # without the edit the features carry some
