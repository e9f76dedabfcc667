"""gl.harvest: token rows as SAELens packs them, values as run_with_cache gives them, a folder SAELens trains on,
resumption after SIGKILL, and bad input refused before any work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import gemmalens as gl
from test_tokenizer import CORPUS, spm_dir  # noqa: F401  (fixture: a small SentencePiece model)

datasets = pytest.importorskip("datasets")  # the test extra installs gemmalens[harvest]

TEXTS = [t for t in CORPUS] * 6 + ["<bos>a text that starts with BOS itself", "short", "",
                                    "a longer text " * 40, "another document about the cat on the mat " * 7]
HOOKS = ["blocks.1.attn.hook_z", "blocks.2.hook_resid_post", "blocks.3.hook_mlp_out"]


@pytest.fixture(scope="module")
def tiny(spm_dir, tmp_path_factory):  # noqa: F811
    """A tiny random Gemma 3 (HF-saved) with the SentencePiece tokenizer beside it: (directory, gl model)."""
    from conftest import build_hf

    d = tmp_path_factory.mktemp("harvest_model")
    build_hf(str(d), seed=11, vocab_size=448)
    shutil.copy(spm_dir / "tokenizer.model", d / "tokenizer.model")
    return str(d), gl.load(str(d), progress=False)


@pytest.fixture(scope="module")
def sae(tiny):
    rng = np.random.default_rng(5)
    d, f = 64, 96
    return gl.SAE(rng.normal(0, 0.2, (d, f)), rng.normal(0, 0.1, f), rng.normal(0, 0.2, (f, d)), rng.normal(0, 0.1, d),
                  threshold=np.full(f, 0.05), architecture="jumprelu", hook_name="blocks.2.hook_resid_post")


def _saelens_rows(spm_dir, texts, context_size, prepend_bos, tokenized=None):  # noqa: F811
    """SAELens's own token rows: an ActivationsStore over a TransformerLens model carrying HF's GemmaTokenizer on the
    same SentencePiece model (its packing reads only the tokenizer)."""
    import torch
    from sae_lens.training.activations_store import ActivationsStore
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GemmaTokenizer

    hf = GemmaTokenizer.from_pretrained(str(spm_dir))
    tl = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=256, d_head=4, n_heads=2, d_vocab=448,
                                                   act_fn="relu"), tokenizer=hf)
    data = {"text": texts} if tokenized is None else {"input_ids": tokenized}
    store = ActivationsStore(model=tl, dataset=datasets.Dataset.from_dict(data), streaming=False,
                             hook_name="blocks.0.hook_resid_post", hook_head_index=None, context_size=context_size,
                             d_in=8, n_batches_in_buffer=2, total_training_tokens=10, store_batch_size_prompts=4,
                             train_batch_size_tokens=64, prepend_bos=prepend_bos, normalize_activations="none",
                             device=torch.device("cpu"), dtype="float32")
    return np.stack([r.numpy() for r in store.iterable_sequences]).astype(np.int32)


@pytest.mark.parametrize("context_size,prepend_bos", [(16, True), (7, True), (16, False)])
def test_token_rows_equal_saelens(tiny, spm_dir, tmp_path, context_size, prepend_bos):  # noqa: F811
    _, model = tiny
    expected = _saelens_rows(spm_dir, TEXTS, context_size, prepend_bos)
    r = gl.harvest(model, TEXTS, ["hook_embed"], tmp_path / "o", context_size=context_size, prepend_bos=prepend_bos,
                   progress=False)
    ds = r.load().with_format("numpy")[:]
    assert r.rows == len(expected) == len(ds["token_ids"]) > 20
    np.testing.assert_array_equal(ds["token_ids"], expected)
    # the same texts as a datasets.Dataset ("text" column found as SAELens finds it) and as token sequences
    r2 = gl.harvest(model, datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}), ["hook_embed"],
                    tmp_path / "o2", context_size=context_size, prepend_bos=prepend_bos, progress=False)
    np.testing.assert_array_equal(r2.load().with_format("numpy")[:]["token_ids"], expected)
    it = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()  # streaming datasets too
    r4 = gl.harvest(model, it, ["hook_embed"], tmp_path / "o4", context_size=context_size, prepend_bos=prepend_bos,
                    progress=False)
    np.testing.assert_array_equal(r4.load().with_format("numpy")[:]["token_ids"], expected)
    seqs = [model.tokenizer.encode(t, add_bos=False) for t in TEXTS]
    r3 = gl.harvest(model, seqs, ["hook_embed"], tmp_path / "o3", context_size=context_size, prepend_bos=prepend_bos,
                    progress=False)
    np.testing.assert_array_equal(r3.load().with_format("numpy")[:]["token_ids"], expected)


def test_pretokenized_rows_equal_saelens(tiny, spm_dir, tmp_path):  # noqa: F811
    _, model = tiny
    rng = np.random.default_rng(0)
    rows = [list(map(int, rng.integers(0, 448, 20))) for _ in range(9)]
    expected = _saelens_rows(spm_dir, None, 12, True, tokenized=rows)
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    got = gl.harvest(model, ds, ["hook_embed"], tmp_path / "a", context_size=12, progress=False).load()
    np.testing.assert_array_equal(got.with_format("numpy")[:]["token_ids"], expected)
    got = gl.harvest(model, np.asarray(rows), ["hook_embed"], tmp_path / "b", context_size=12, progress=False).load()
    np.testing.assert_array_equal(got.with_format("numpy")[:]["token_ids"], expected)


def _reference(model, tokens, hooks, saes=()):
    with model.saes(list(saes), use_error_term=True):
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
    return {h: cache[h].reshape(*tokens.shape, -1) for h in hooks}


def _close(got, want, tol):
    scale = float(np.abs(want).max())
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= tol * scale, (err, scale)


def test_values_equal_run_with_cache(tiny, sae, tmp_path):
    _, model = tiny
    hooks = HOOKS + ["blocks.2.hook_resid_post.hook_sae_acts_post"]
    r = gl.harvest(model, TEXTS, hooks, tmp_path / "s", context_size=24, saes=[sae], batch_size=3,
                   shard_bytes=40_000, progress=False)
    assert r.shards > 3  # several shards, batches across shard ends
    feats = r.load().features
    assert feats["blocks.1.attn.hook_z"].shape == (24, 4 * 32)  # [T, heads * d_head], as SAELens stores hook_z
    assert feats["blocks.2.hook_resid_post.hook_sae_acts_post"].shape == (24, 96)
    ds = r.load().with_format("numpy")[:]
    tokens = ds["token_ids"]
    ref = _reference(model, tokens, hooks, [sae])
    for h in hooks:
        _close(ds[h], ref[h], 1e-6)
    assert (ds["blocks.2.hook_resid_post.hook_sae_acts_post"] > 0).mean() > 0.05  # features do fire
    import pickle  # SAEs travel to Ray actors pickled: the copy encodes the same

    x = ref["blocks.2.hook_resid_post"][:2]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(sae)).encode(x), sae.encode(x))
    # safetensors shards + index, float32 and bfloat16; datasets float16
    st = gl.harvest(model, TEXTS, hooks, tmp_path / "t", context_size=24, saes=[sae], format="safetensors",
                    shard_bytes=40_000, progress=False)
    got = st.load()
    np.testing.assert_array_equal(got["token_ids"], tokens)
    for h in hooks:
        _close(got[h], ref[h], 1e-6)
    with open(tmp_path / "t" / "index.json") as f:
        index = json.load(f)
    assert index["rows"] == len(tokens) and index["hooks"]["blocks.1.attn.hook_z"] == [24, 128]
    assert sum(s["rows"] for s in index["shards"]) == len(tokens) and index["shards"][1]["first_row"] > 0
    bf = gl.harvest(model, TEXTS, hooks, tmp_path / "b", context_size=24, saes=[sae], format="safetensors",
                    dtype="bfloat16", progress=False).load()
    half = gl.harvest(model, TEXTS, hooks, tmp_path / "h", context_size=24, saes=[sae], dtype="float16",
                      progress=False).load().with_format("numpy")[:]
    for h in hooks:
        _close(bf[h], ref[h], 2 ** -8)
        _close(half[h], ref[h], 2 ** -10)
        assert not np.array_equal(bf[h], ref[h])  # really stored in 16 bits


def test_max_tokens_and_stop_early(tiny, tmp_path):
    _, model = tiny
    r = gl.harvest(model, TEXTS, ["blocks.0.hook_resid_post"], tmp_path / "m", context_size=16, max_tokens=16 * 5 + 3,
                   progress=False)
    assert r.rows == 5 and r.tokens == 80
    full = gl.harvest(model, TEXTS, ["blocks.0.hook_resid_post"], tmp_path / "f", context_size=16,
                      progress=False).load().with_format("numpy")[:]
    np.testing.assert_array_equal(r.load().with_format("numpy")[:]["blocks.0.hook_resid_post"],
                                  full["blocks.0.hook_resid_post"][:5])
    # a completed harvest called again does nothing and says so
    again = gl.harvest(model, TEXTS, ["blocks.0.hook_resid_post"], tmp_path / "m", context_size=16,
                       max_tokens=16 * 5 + 3, progress=False)
    assert again.rows == 5 and again.computed_rows == 0


def test_saelens_trains_on_the_folder(tiny, spm_dir, tmp_path):  # noqa: F811
    """SAELens's own training loop, reading the harvest through use_cached_activations: a few hundred steps, and the
    trained SAE reconstructs the harvested activations far better than at initialisation."""
    import torch
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig,
                          StandardTrainingSAEConfig)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import GemmaTokenizer

    _, model = tiny
    hook = "blocks.3.hook_resid_post"
    out = tmp_path / "cache"
    gl.harvest(model, TEXTS * 4, [hook], out, context_size=32, progress=False)
    # The runner wants a TransformerLens model; with cached activations it never runs it. This stand-in has one layer,
    # so it has no blocks.3 at all: a run that fell back to computing activations would fail.
    tl = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=64, n_ctx=64, d_head=16, n_heads=4, d_vocab=448,
                                                   act_fn="relu"), tokenizer=GemmaTokenizer.from_pretrained(str(spm_dir)))
    steps, batch = 300, 64
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=64, d_sae=128, l1_coefficient=1e-3), model_name="tiny-gemma3",
        hook_name=hook, dataset_path="", context_size=32, training_tokens=steps * batch, train_batch_size_tokens=batch,
        store_batch_size_prompts=4, n_batches_in_buffer=2, use_cached_activations=True, cached_activations_path=str(out),
        logger=LoggingConfig(log_to_wandb=False), device="cpu", lr=3e-3, output_path=None, save_final_checkpoint=False,
        n_checkpoints=0)
    runner = LanguageModelSAETrainingRunner(cfg, override_model=tl,
                                            override_dataset=datasets.Dataset.from_dict({"text": TEXTS[:4]}))
    acts = torch.as_tensor(datasets.load_from_disk(str(out)).with_format("numpy")[:][hook].reshape(-1, 64))
    with torch.no_grad():
        before = float(((runner.sae(acts) - acts) ** 2).mean())
    trained = runner.run()
    with torch.no_grad():
        after = float(((trained(acts) - acts) ** 2).mean())
    assert after < 0.05 * before, (before, after)


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    import gemmalens as gl
    sys.path.insert(0, {tests!r})
    from test_harvest import TEXTS
    def slow():
        for t in TEXTS * 3:
            time.sleep(0.02)
            yield t
    model = gl.load({model!r}, progress=False)
    gl.harvest(model, slow(), {hooks!r}, {out!r}, context_size=16, shard_bytes=12_000, progress=False)
""")


def _texts():
    yield from TEXTS * 3


def test_resume_after_sigkill(tiny, tmp_path):
    """A harvest SIGKILLed part way (in a subprocess) and started again ends with exactly an uninterrupted run's rows."""
    d, model = tiny
    out = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=os.path.dirname(__file__), model=d, hooks=HOOKS, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    manifest = out / "gemmalens_harvest.json"
    deadline = time.time() + 120
    n_done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            n_done = len(json.loads(manifest.read_text())["shards"])
        except (OSError, ValueError, KeyError):
            n_done = 0
        if n_done >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 3 <= len(state["shards"])
    assert not (out / "state.json").exists()  # not a loadable dataset until complete
    resumed = gl.harvest(model, _texts(), HOOKS, out, context_size=16, shard_bytes=12_000, progress=False)
    assert 0 < resumed.computed_rows < resumed.rows
    fresh = gl.harvest(model, _texts(), HOOKS, tmp_path / "fresh", context_size=16, shard_bytes=12_000,
                       progress=False)
    a, b = resumed.load().with_format("numpy")[:], fresh.load().with_format("numpy")[:]
    assert len(a["token_ids"]) == len(b["token_ids"]) == fresh.rows
    for col in HOOKS + ["token_ids"]:
        np.testing.assert_array_equal(a[col], b[col])
    assert not (out / ".gemmalens_tmp").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("data-")) == \
        sorted(p.name for p in (tmp_path / "fresh").iterdir() if p.name.startswith("data-"))


def test_other_harvest_or_changed_source_refused(tiny, tmp_path):
    _, model = tiny
    out = tmp_path / "x"
    gl.harvest(model, TEXTS, HOOKS[:1], out, context_size=16, max_tokens=64, progress=False)
    with pytest.raises(gl.HarvestError, match="different harvest.*hooks"):
        gl.harvest(model, TEXTS, HOOKS[1:], out, context_size=16, max_tokens=64, progress=False)
    with pytest.raises(gl.HarvestError, match="different harvest.*context_size"):
        gl.harvest(model, TEXTS, HOOKS[:1], out, context_size=8, max_tokens=64, progress=False)
    # an unfinished harvest resumed from a different source: refused when a finished shard's rows differ
    part = tmp_path / "part"
    gl.harvest(model, TEXTS, HOOKS[:1], part, context_size=16, shard_bytes=9_000, progress=False)
    m = json.loads((part / "gemmalens_harvest.json").read_text())
    m["complete"] = False
    (part / "gemmalens_harvest.json").write_text(json.dumps(m))
    with pytest.raises(gl.HarvestError, match="source differs"):
        gl.harvest(model, list(reversed(TEXTS)), HOOKS[:1], part, context_size=16, shard_bytes=9_000, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(gl.HarvestError, match="not empty and holds no gemmalens harvest"):
        gl.harvest(model, TEXTS, HOOKS[:1], foreign, context_size=16, progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("case,match", [
    ("unknown_hook", "unknown hook name"),
    ("pattern_hook", "not a per-token activation"),
    ("too_long", "above the model's max_seq_len"),
    ("empty_list", "source is empty"),
    ("empty_dataset", "source is empty"),
    ("missing_column", "no column 'body'"),
    ("no_text_column", "no 'tokens', 'input_ids', 'text' or 'problem' column"),
    ("string_source", "single string"),
    ("out_is_file", "is a file"),
    ("out_under_file", "is a file, not a directory"),
    ("bad_dtype", "dtype must be one of"),
    ("bf16_saelens", "dtype must be one of"),
    ("bad_format", "format must be one of"),
    ("no_hooks", "hooks is empty"),
    ("token_out_of_range", "out of range"),
    ("too_few_tokens", "no full row"),
    ("short_pretokenized", "fewer than context_size"),
])
def test_bad_input_refused_and_nothing_left(tiny, tmp_path, case, match):
    _, model = tiny
    out = tmp_path / "out"
    kw = dict(source=TEXTS, hooks=HOOKS[:1], out_dir=out, context_size=16)
    if case == "unknown_hook":
        kw["hooks"] = ["blocks.2.hook_resid_pots"]
    elif case == "pattern_hook":
        kw["hooks"] = ["blocks.2.attn.hook_pattern"]
    elif case == "too_long":
        kw["context_size"] = model.max_seq_len + 1
    elif case == "empty_list":
        kw["source"] = []
    elif case == "empty_dataset":
        kw["source"] = datasets.Dataset.from_dict({"text": []})
    elif case == "missing_column":
        kw["source"], kw["column"] = datasets.Dataset.from_dict({"text": TEXTS}), "body"
    elif case == "no_text_column":
        kw["source"] = datasets.Dataset.from_dict({"body": TEXTS})
    elif case == "string_source":
        kw["source"] = "one long text"
    elif case == "out_is_file":
        out.write_text("x")
    elif case == "out_under_file":
        (tmp_path / "f").write_text("x")
        kw["out_dir"] = tmp_path / "f" / "sub" / "out"
    elif case == "bad_dtype":
        kw["dtype"] = "int8"
    elif case == "bf16_saelens":
        kw["dtype"] = "bfloat16"
    elif case == "bad_format":
        kw["format"] = "parquet"
    elif case == "no_hooks":
        kw["hooks"] = []
    elif case == "token_out_of_range":
        kw["source"] = [[1, 2, 3] * 10, [5, 448, 6]]
    elif case == "too_few_tokens":
        kw["source"] = ["hi"]
    elif case == "short_pretokenized":
        kw["source"] = np.ones((4, 10), np.int64)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(gl.HarvestError, match=match):
        gl.harvest(model, progress=False, **kw)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created (or left behind)
    # the model is still usable
    assert model.run_with_cache([[2, 5, 6]], names_filter="hook_embed")[1]["hook_embed"].shape == (1, 3, 64)


def test_cli_harvest(tiny, tmp_path, capsys):
    from gemmalens.__main__ import main

    d, model = tiny
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(t.replace("\n", " ") for t in TEXTS) + "\n")
    out = tmp_path / "cli"
    assert main(["harvest", "--model", d, "--hooks", ",".join(HOOKS[:2]), "--texts", str(texts), "--out", str(out),
                 "--context-size", "16", "--max-tokens", "320", "--no-progress"]) == 0
    api = gl.harvest(model, [t.replace("\n", " ") for t in TEXTS if t.replace("\n", " ").strip()], HOOKS[:2],
                     tmp_path / "api", context_size=16, max_tokens=320, progress=False)
    a = datasets.load_from_disk(str(out)).with_format("numpy")[:]
    b = api.load().with_format("numpy")[:]
    assert len(a["token_ids"]) == 20
    for col in HOOKS[:2] + ["token_ids"]:
        np.testing.assert_array_equal(a[col], b[col])
    # a dataset file with a named column
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n")
    assert main(["harvest", "--model", d, "--hooks", HOOKS[0], "--dataset", str(jl), "--column", "body", "--out",
                 str(tmp_path / "cli2"), "--context-size", "16", "--format", "safetensors", "--no-progress"]) == 0
    assert (tmp_path / "cli2" / "index.json").is_file()
    assert main(["harvest", "--model", d, "--hooks", "blocks.99.hook_resid_post", "--texts", str(texts), "--out",
                 str(tmp_path / "cli3"), "--no-progress"]) == 1
    assert not (tmp_path / "cli3").exists()

    # a corpus that is not there: a one-line error naming it, before any model load or folder
    for args, what in [(["--texts", str(tmp_path / "missing.txt")], "--texts"),
                       (["--dataset", str(tmp_path / "missing.jsonl")], "--dataset"),
                       (["--dataset", str(texts)], "not a save_to_disk folder")]:
        capsys.readouterr()
        assert main(["harvest", "--model", d, "--hooks", HOOKS[0], *args, "--out", str(tmp_path / "cli4"),
                     "--no-progress"]) == 1
        assert what in capsys.readouterr().err
        assert not (tmp_path / "cli4").exists()
