"""gemmalens serve: a server in a subprocess on 127.0.0.1 (a tiny random model with a tokenizer and a small SAE),
driven by the official openai package and httpx. Every answer is checked against the library run in this process:
greedy and seeded completions (streamed or not, text and chat) equal model.generate; a steered request equals
model.hooks(...) + generate while requests beside it in the same batch equal plain generate; /v1/activations equals
run_with_cache; /v1/features equals the SAE's encode. Bad input gets a 400 with OpenAI's error body and the server
goes on; 413 past the body limit; 401 without the key; a client that goes away frees its row within one step; a
bounded load test of mixed requests from 16 clients."""
import base64
import concurrent.futures as cf
import io
import json
import os
import shutil
import socket
import sys
import time

import httpx
import numpy as np
import pytest

import gemmalens as gl
from serve_util import Server
from test_sae import random_sae, save_saelens
from test_tokenizer import spm_dir  # noqa: F401  (fixture: a small SentencePiece model)

KEY = "test-key-123"
HOOK = "blocks.3.hook_resid_post"
MAX_SEQ = 1024


@pytest.fixture(scope="module")
def env(spm_dir, tmp_path_factory):  # noqa: F811
    """(server, the same model loaded here, the SAE loaded here)."""
    from conftest import build_hf

    root = tmp_path_factory.mktemp("serve")
    tok = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    # no logit soft-capping: the logits keep their spread, greedy choices are not near ties
    build_hf(str(root / "model"), seed=11, vocab_size=len(tok), max_position_embeddings=4096)
    shutil.copy(spm_dir / "tokenizer.model", root / "model" / "tokenizer.model")
    # Most of this small vocabulary is byte-fallback pieces, which a random model would mostly emit (text of U+FFFD):
    # shrink their (tied) embedding rows so that its greedy text is words.
    from safetensors.numpy import load_file, save_file

    f = str(root / "model" / "model.safetensors")
    t = load_file(f)
    emb = t["model.embed_tokens.weight"]
    byte_ids = [i for i in range(len(tok)) if tok.id_to_piece(i).startswith("<0x")]
    emb[byte_ids] *= 0.02
    save_file(t, f, metadata={"format": "pt"})
    save_saelens(str(root / "sae"), random_sae(np.random.default_rng(0), 64, 48), "blocks.2.hook_resid_post",
                 model_name="tiny")
    srv = Server(["--model", str(root / "model"), "--dtype", "float32", "--weights", "native", "--max-batch", "8",
                  "--max-seq-len", str(MAX_SEQ), "--sae", f"feat={root / 'sae'}", "--max-body", "65536"],
                 str(root / "server.log"), api_key=KEY)
    try:
        model = gl.load(str(root / "model"))
        yield srv, model, gl.SAE.load(str(root / "sae"))
    finally:
        srv.stop()


def test_models_health_and_greedy_completions_equal_generate(env):
    srv, model, _ = env
    client = srv.openai()
    assert [m.id for m in client.models.list().data] == ["model"]
    h = srv.health()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["max_seq_len"] == MAX_SEQ
    for prompt in ("the cat sat on", "hello world", "def f(x):\n"):
        want = model.generate(prompt, max_new_tokens=12)
        r = client.completions.create(model="model", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
        assert r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("stop", "length")
        pieces = [c.choices[0].text for c in client.completions.create(model="model", prompt=prompt, max_tokens=12,
                                                                        temperature=0, stream=True)]
        assert "".join(pieces) == want and len(pieces) > 1
    # token ids in, ids out (extension return_token_ids): generate's ids, stop token included; ignore_eos
    ids = model.tokenizer.encode("the cat")
    r = client.completions.create(model="model", prompt=ids, max_tokens=20, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.choices[0].model_extra["token_ids"] == model.generate(ids, max_new_tokens=20, ignore_eos=True).tolist()
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    # several prompts in one request: one choice each, in order
    r = client.completions.create(model="model", prompt=["the cat", "hello"], max_tokens=6, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [
        model.generate("the cat", max_new_tokens=6), model.generate("hello", max_new_tokens=6)]


def test_stop_strings_late_in_a_long_generation(env):
    """Text is kept id by id (Tokenizer.decoder) and a stop string is looked for near the text's new end only: stop
    strings met after 100+ tokens, across the decoder's settled head, end generate's text and the server's where
    they first occur in the free text; a stream hands out nothing that the stop string then cuts."""
    srv, model, _ = env
    client = srv.openai()
    n = 160
    kw = dict(max_new_tokens=n, ignore_eos=True, temperature=1.0, seed=5)  # sampled: a random model's greedy text repeats
    free = model.generate("the cat", **kw)
    ids = model.generate(model.tokenizer.encode("the cat"), **kw)
    assert len(ids) == n and free == model.tokenizer.decode(ids, skip_special_tokens=True)
    # the first sampled id a stop id: no text at all, streamed or not
    assert model.generate("the cat", stop=[int(ids[0])], **kw) == ""
    assert list(model.generate("the cat", stop=[int(ids[0])], stream=True, **kw)) == []
    checked = 0
    # (start, length): short stop strings, and one longer than the decoder's tail of ids, so that it begins inside
    # the settled head when its last character comes
    for c, k in ((len(free) // 2, 4), (3 * len(free) // 4, 4), (len(free) - 6, 4), (len(free) // 3, len(free) // 3)):
        stop = free[c:c + k]
        want = free[:free.find(stop)]
        checked += len(want) > len(free) // 3  # a stop string first met late
        assert model.generate("the cat", stop=[stop], **kw) == want
        assert "".join(model.generate("the cat", stop=["@@@", stop], stream=True, **kw)) == want
        for stream in (False, True):
            r = client.completions.create(model="model", prompt="the cat", max_tokens=n, temperature=1.0, seed=5,
                                          stop=[stop], stream=stream, extra_body={"ignore_eos": True})
            assert ("".join(c.choices[0].text for c in r) if stream else r.choices[0].text) == want
    assert checked >= 2


def test_chat_sampling_stop_n_and_logprobs_equal_the_library(env):
    srv, model, _ = env
    client = srv.openai()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
    want = model.generate(model.tokenizer.apply_chat_template(msgs), max_new_tokens=10)
    r = client.chat.completions.create(model="model", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="model", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # seeded sampling with HF's filters: choice j draws from seed + j
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, seed=5, max_new_tokens=14)
    r = client.completions.create(model="model", prompt="the cat", max_tokens=14, temperature=0.9, top_p=0.95, seed=5,
                                  n=2, extra_body={"top_k": 30})
    got = {c.index: c.text for c in r.choices}
    assert got[0] == model.generate("the cat", **kw)
    assert got[1] == model.generate("the cat", **dict(kw, seed=6))
    # six sampled choices in one step batch: their rows are drawn on the engine's sampling threads, each with its own
    # generator, so each equals generate with its own seed
    kw6 = dict(temperature=1.0, min_p=0.02, repetition_penalty=1.2, seed=11, max_new_tokens=24, ignore_eos=True)
    r = client.completions.create(model="model", prompt="hello world", max_tokens=24, temperature=1.0, seed=11, n=6,
                                  extra_body={"min_p": 0.02, "repetition_penalty": 1.2, "ignore_eos": True})
    got = {c.index: c.text for c in r.choices}
    assert [got[j] for j in range(6)] == [model.generate("hello world", **dict(kw6, seed=11 + j)) for j in range(6)]
    r = client.completions.create(model="model", prompt="the cat", max_tokens=14, temperature=0.7, seed=3,
                                  extra_body={"min_p": 0.05, "repetition_penalty": 1.3})
    assert r.choices[0].text == model.generate("the cat", temperature=0.7, seed=3, min_p=0.05, repetition_penalty=1.3,
                                               max_new_tokens=14)
    # a stop string: the text ends before it, as generate's does; streamed pieces add up to the same
    free = model.generate("hello world", max_new_tokens=16, ignore_eos=True)
    stop = free[5:8]
    want = model.generate("hello world", max_new_tokens=16, ignore_eos=True, stop=[stop])
    assert len(want) < len(free)
    for stream in (False, True):
        r = client.completions.create(model="model", prompt="hello world", max_tokens=16, temperature=0, stop=[stop],
                                      stream=stream, extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].text for c in r) if stream else r.choices[0].text
        assert text == want
    # logprobs: the model's log-softmax at each generated position, and the top alternatives by value
    r = client.completions.create(model="model", prompt="the cat", max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = model.tokenizer.encode("the cat")
    gen = r.choices[0].model_extra["token_ids"]
    logits = model.forward(ids + gen)[0, len(ids) - 1:-1].astype(np.float64)
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    lp = r.choices[0].logprobs
    np.testing.assert_allclose(lp.token_logprobs, lsm[np.arange(len(gen)), gen], atol=1e-4)
    for k, top in enumerate(lp.top_logprobs):
        assert sorted(top.values(), reverse=True) == pytest.approx(np.sort(lsm[k])[::-1][:3], abs=1e-4)
    c = client.chat.completions.create(model="model", messages=msgs, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
                                      for e in content)


def _vector(model, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(model.config.hidden_size) * scale).astype(np.float32)


def _npy(v):
    buf = io.BytesIO()
    np.save(buf, v)
    return base64.b64encode(buf.getvalue()).decode()


def test_steered_request_beside_unsteered_ones_in_one_batch(env):
    srv, model, sae = env
    client = srv.openai()
    v = _vector(model, 1)
    w = _vector(model, 2)
    prompts = ["the cat sat on", "hello world", "def f(x):\n", "the quick brown"]
    n = 30
    plain = [model.generate(p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    with model.hooks(fwd_hooks=[(HOOK, gl.interventions.add(v, scale=3.0))]):
        steered = model.generate(prompts[0], max_new_tokens=n, ignore_eos=True)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", gl.interventions.add(w, scale=2.0, positions=[0, 1]))]):
        steered_pos = model.generate(prompts[1], max_new_tokens=n, ignore_eos=True)
    with model.hooks(fwd_hooks=[gl.interventions.steer(sae, 7, scale=6.0)]):
        steered_sae = model.generate(prompts[2], max_new_tokens=n, ignore_eos=True)
    assert steered != plain[0] and steered_pos != plain[1] and steered_sae != plain[2]

    jobs = [(prompts[0], [{"hook": HOOK, "vector": v.tolist(), "scale": 3.0}], steered),
            (prompts[1], [{"hook": "blocks.1.hook_resid_post", "vector": _npy(w), "scale": 2.0, "positions": [0, 1]}],
             steered_pos),
            (prompts[2], [{"sae": "feat", "feature": 7, "scale": 6.0}], steered_sae)]
    jobs += [(p, None, want) for p, want in zip(prompts, plain)] * 2
    before = srv.health()["decode_steps"]

    def run(job):
        prompt, steering, _ = job
        extra = {"ignore_eos": True}
        if steering:
            extra["steering"] = steering
        r = client.completions.create(model="model", prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                      extra_body=extra)
        return "".join(c.choices[0].text for c in r)

    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(run, jobs))
    assert got == [want for _, _, want in jobs]
    h = srv.health()
    # they shared decode steps: far fewer steps than sequences x tokens
    assert h["peak_running"] >= 4 and h["decode_steps"] - before < len(jobs) * n / 2


def test_activations_equal_run_with_cache(env):
    srv, model, _ = env
    hooks = ["hook_embed", "blocks.0.attn.hook_pattern", "blocks.2.attn.hook_z", HOOK, "ln_final.hook_normalized"]
    ids = model.tokenizer.encode("the cat sat on the mat")
    _, cache = model.run_with_cache(ids, names_filter=hooks)
    for body in ({"text": "the cat sat on the mat", "hooks": hooks},
                 {"tokens": ids, "hooks": hooks, "encoding": "list"}):
        r = srv.post("/v1/activations", body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["tokens"] == ids and len(out["token_strings"]) == len(ids)
        assert list(out["activations"]) == hooks
        for h in hooks:
            a = out["activations"][h]
            arr = (np.load(io.BytesIO(base64.b64decode(a["data"]))) if a["encoding"] == "npy"
                   else np.asarray(a["data"], np.float32))
            assert a["shape"] == list(cache[h].shape) and arr.dtype == np.float32
            np.testing.assert_array_equal(arr, cache[h])
    # under steering: the activations run_with_cache gives with the same intervention
    v = _vector(model, 3)
    _, steered = model.run_with_cache(ids, names_filter=["blocks.5.hook_resid_post"],
                                      fwd_hooks=[(HOOK, gl.interventions.add(v, scale=2.0))])
    r = srv.post("/v1/activations", {"tokens": ids, "hooks": "blocks.5.hook_resid_post", "encoding": "list",
                                     "steering": [{"hook": HOOK, "vector": v.tolist(), "scale": 2.0}]}).json()
    np.testing.assert_array_equal(np.asarray(r["activations"]["blocks.5.hook_resid_post"]["data"], np.float32),
                                  steered["blocks.5.hook_resid_post"])


def test_features_equal_sae_encode(env):
    srv, model, sae = env
    ids = model.tokenizer.encode("hello world, the cat sat")
    _, cache = model.run_with_cache(ids, names_filter=sae.hook_name)
    acts = sae.encode(cache[sae.hook_name][0])  # [pos, d_sae]
    r = srv.post("/v1/features", {"text": "hello world, the cat sat", "sae": "feat", "top_k": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["hook_name"] == sae.hook_name and out["token_ids"] == ids and len(out["results"]) == len(ids)
    assert sum(len(res["top_features"]) for res in out["results"]) > len(ids)  # the SAE is active here
    for p, res in enumerate(out["results"]):
        assert res["token_position"] == p
        order = np.argsort(-acts[p], kind="stable")[:6]
        want = [(int(f), float(acts[p, f])) for f in order if acts[p, f] > 0]
        got = [(f["feature_index"], f["activation_value"]) for f in res["top_features"]]
        assert [f for f, _ in got] == [f for f, _ in want]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=1e-5, atol=1e-6)
    r = srv.post("/v1/features", {"tokens": ids, "sae": "feat", "ignore_bos": True}).json()
    assert [res["token_position"] for res in r["results"]] == list(range(1, len(ids)))
    assert srv.post("/v1/saes", {}).status_code == 405
    assert httpx.get(srv.url + "/v1/saes", headers=srv.headers()).json()["data"][0]["d_sae"] == 48


BAD = [
    ("/v1/completions", b"{not json", None),
    ("/v1/completions", b"[1, 2]", None),
    ("/v1/completions", b"[" * 30000 + b"]" * 30000, None),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": True}, "n"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": [1, 2]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [1, 999999]}, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "the cat " * 600}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_SEQ}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, "n"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"hook": "blocks.3.hook_resid_pots", "vector": [0.0] * 64}]},
     "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"hook": "blocks.99.hook_resid_post", "vector": [0.0] * 64}]},
     "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"hook": HOOK, "vector": [0.0] * 63}]}, "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"hook": HOOK, "vector": "bm90IG5weQ=="}]}, "steering[0].vector"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"hook": "blocks.1.attn.hook_pattern", "vector": [1.0]}]},
     "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"sae": "nope", "feature": 1}]}, "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": [{"sae": "feat", "feature": 48}]}, "steering[0]"),
    ("/v1/completions", {"prompt": "hi", "steering": {"hook": HOOK}}, "steering"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/activations", {"text": "hi", "hooks": ["blocks.0.hook_nothing"]}, "hooks"),
    ("/v1/activations", {"text": "hi"}, "hooks"),
    ("/v1/activations", {"text": "hi", "tokens": [1], "hooks": [HOOK]}, "text"),
    ("/v1/activations", {"text": "hi", "hooks": [HOOK], "encoding": "csv"}, "encoding"),
    ("/v1/features", {"text": "hi", "sae": "nope"}, "sae"),
    ("/v1/features", {"text": "hi", "sae": "feat", "top_k": 0}, "top_k"),
]


def test_bad_inputs_get_400_and_the_server_goes_on(env):
    import openai

    srv, model, _ = env
    for path, body, param in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(srv.url + path, content=raw, headers={**srv.headers(), "Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, (path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], (path, body, err)
        if param is not None:
            assert err["param"] == param, (path, body, err)
    # the official client sees an OpenAI error
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        srv.openai().completions.create(model="model", prompt="hi", max_tokens=0)
    r = httpx.get(srv.url + "/v1/nothing", headers=srv.headers())
    assert r.status_code == 404 and "error" in r.json()
    # still serving, and correctly
    r = srv.openai().completions.create(model="model", prompt="the cat", max_tokens=8, temperature=0)
    assert r.choices[0].text == model.generate("the cat", max_new_tokens=8)
    assert srv.health()["errors"] == 0


def test_body_limit_413_and_api_key_401(env):
    srv, _, _ = env
    big = {"prompt": "hi", "steering": [{"hook": HOOK, "vector": [0.125] * 64}] * 200}
    r = srv.post("/v1/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "' + b"x" * 40000
        yield b"y" * 40000 + b'"}'

    r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers=srv.headers(), timeout=30)
    assert r.status_code == 413
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for path in ("/v1/models", "/v1/completions"):
            r = httpx.request("GET" if path == "/v1/models" else "POST", srv.url + path, headers=headers,
                              json={"prompt": "hi"}, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (headers, path)
    assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key


def test_client_disconnect_frees_its_row_within_a_step(env):
    srv, _, _ = env
    h0 = srv.health()
    body = {"prompt": "the cat", "max_tokens": MAX_SEQ - 10, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body, headers=srv.headers()) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = 0
            while seen < 3:
                seen += next(lines).startswith("data:")
        # the response is closed with the generation running: the connection goes away
    # a non-streaming request whose client goes away (a raw socket closed after sending)
    raw = json.dumps(dict(body, stream=False)).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
              + KEY.encode() + b"\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
    time.sleep(0.3)
    s.close()
    deadline = time.time() + 20
    while True:
        h = srv.health()
        if h["running"] == 0 and h["waiting"] == 0 and h["cancelled"] >= h0["cancelled"] + 2:
            break
        assert time.time() < deadline, json.dumps([h0, h])
        time.sleep(0.05)
    assert h["finished"] == h0["finished"]  # neither ran to its end
    assert h["steps_after_cancel_max"] <= 1
    assert h["decode_steps"] - h0["decode_steps"] < 2 * (MAX_SEQ - 20)


def test_cli_client_streams_and_serve_names_its_extra(env, capsys, monkeypatch):
    import subprocess

    srv, model, _ = env
    out = subprocess.run([sys.executable, "-m", "gemmalens", "client", "--url", srv.url, "--api-key", KEY,
                          "--completion", "the cat sat on", "--max-tokens", "10", "--temperature", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == model.generate("the cat sat on", max_new_tokens=10) + "\n"
    out = subprocess.run([sys.executable, "-m", "gemmalens", "client", "--url", srv.url, "--completion", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "401" in out.stderr and "API key" in out.stderr
    from gemmalens.__main__ import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    assert main(["serve", "--model", "gemma3-270m"]) == 1
    assert "pip install 'gemmalens[serve]'" in capsys.readouterr().err


def test_load_mixed_requests_from_16_clients(env):
    """200 requests from 16 clients at once: streamed and plain completions, chat, steering, activations, features and
    deliberately bad ones; every answer is checked, and the server's memory does not grow."""
    srv, model, sae = env
    v = _vector(model, 4)
    prompts = ["the cat sat on", "hello world", "def f(x):\n", "the quick brown", "tabs\tand", "digits 1234"]
    n = 10
    plain = {p: model.generate(p, max_new_tokens=n, ignore_eos=True) for p in prompts}
    with model.hooks(fwd_hooks=[(HOOK, gl.interventions.add(v, scale=3.0))]):
        steered = {p: model.generate(p, max_new_tokens=n, ignore_eos=True) for p in prompts[:2]}
    ids = model.tokenizer.encode("the cat sat on the mat")
    _, cache = model.run_with_cache(ids, names_filter=[HOOK, sae.hook_name])
    feats = sae.encode(cache[sae.hook_name][0])
    url, headers = srv.url, srv.headers()

    def job(k, client):
        kind = k % 7
        p = prompts[k % len(prompts)]
        if kind in (0, 1):  # completion, streamed or not
            body = {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": kind == 1}
            if kind == 1:
                with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                    assert r.status_code == 200
                    text = ""
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
            else:
                r = client.post(url + "/v1/completions", json=body, headers=headers)
                assert r.status_code == 200, r.text
                text = r.json()["choices"][0]["text"]
            assert text == plain[p], (k, body)
        elif kind == 2:  # steered
            p = prompts[k % 2]
            body = {"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "steering": [{"hook": HOOK, "vector": _npy(v), "scale": 3.0}]}
            r = client.post(url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == steered[p], (k, r.text)
        elif kind == 3:  # chat
            msgs = [{"role": "user", "content": p}]
            r = client.post(url + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0},
                            headers=headers)
            want = model.generate(model.tokenizer.apply_chat_template(msgs), max_new_tokens=6)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        elif kind == 4:  # activations
            r = client.post(url + "/v1/activations", json={"tokens": ids, "hooks": [HOOK], "encoding": "npy"},
                            headers=headers)
            a = np.load(io.BytesIO(base64.b64decode(r.json()["activations"][HOOK]["data"])))
            np.testing.assert_array_equal(a, cache[HOOK])
        elif kind == 5:  # features
            r = client.post(url + "/v1/features", json={"tokens": ids, "sae": "feat", "top_k": 3}, headers=headers)
            res = r.json()["results"]
            for pos, item in enumerate(res):
                top = [f["feature_index"] for f in item["top_features"]]
                assert top == [int(f) for f in np.argsort(-feats[pos], kind="stable")[:3] if feats[pos, f] > 0]
        else:  # bad on purpose
            r = client.post(url + "/v1/completions", json={"prompt": p, "max_tokens": -1}, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
            return 400
        return 200

    def worker(ks):
        with httpx.Client(timeout=120) as client:
            return [job(k, client) for k in ks]

    def run(ks):
        with cf.ThreadPoolExecutor(16) as ex:
            return [c for codes in ex.map(worker, [ks[i::16] for i in range(16)]) for c in codes]

    run(list(range(32)))  # warm-up: buffers and caches reach their working size
    rss0 = srv.rss()
    t0 = time.time()
    codes = run(list(range(200)))
    elapsed = time.time() - t0
    rss1 = srv.rss()
    assert codes.count(400) == sum(1 for k in range(200) if k % 7 == 6) and len(codes) == 200
    h = srv.health()
    assert h["errors"] == 0 and h["running"] == 0 and h["waiting"] == 0 and h["peak_running"] >= 4
    assert rss1 - rss0 < 50 << 20, (rss0, rss1)
    print(f"load: 200 requests in {elapsed:.1f} s; server RSS {rss0 / 1e6:.0f} -> {rss1 / 1e6:.0f} MB")


def test_engine_never_samples_ids_past_the_tokenizer(spm_dir, tmp_path):  # noqa: F811
    """A model with more embedding rows than tokenizer pieces (HF's 4b+ checkpoints): the engine, which always returns
    text, samples as generate does with text out (those rows never), here where they would otherwise win every step."""
    import threading

    from conftest import build_hf
    from safetensors.numpy import load_file, save_file

    from gemmalens.serve.engine import Engine, GenerationRequest

    tok = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    d = tmp_path / "padded"
    build_hf(str(d), seed=5, vocab_size=len(tok) + 16)
    shutil.copy(spm_dir / "tokenizer.model", d / "tokenizer.model")
    t = load_file(str(d / "model.safetensors"))
    t["model.embed_tokens.weight"][len(tok):] *= 50.0  # the padding rows dominate the tied logits
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    model = gl.load(str(d))
    ids = tok.encode("the cat sat")
    assert int(model.next_token_logits(ids)[0].argmax()) >= len(tok)
    want = model.generate("the cat sat", max_new_tokens=8, ignore_eos=True)
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if ev["type"] in ("done", "error"):
            done.set()

    eng = Engine(model, max_batch=2, max_seq_len=64)
    try:
        eng.submit(GenerationRequest([ids], 1, 8, dict(temperature=0.0), None, set(), [], [], None, emit))
        assert done.wait(60), events
    finally:
        eng.close()
    assert events[-1]["type"] == "done"
    text = "".join(ev["text"] for ev in events if ev["type"] == "delta")
    assert text == want
    assert all(i < len(tok) for ev in events if "token_ids" in ev for i in ev["token_ids"])


def _engine_events(n):
    """For n Engine requests: (each one's events, an Event set at its "done" or "error", emitter(k) -> its emit)."""
    import threading

    events = [[] for _ in range(n)]
    done = [threading.Event() for _ in range(n)]

    def emitter(k):
        def emit(ev):
            events[k].append(ev)
            if ev["type"] in ("done", "error"):
                done[k].set()
        return emit

    return events, done, emitter


def test_engine_step_of_greedy_and_sampled_rows_equals_generate(env):
    """Greedy and sampled rows in the same decode steps (the sampled ones shared between the engine thread, which
    accepts each of its rows as soon as it is drawn, and the sampling pool): each request's streamed pieces add up to
    model.generate's text, a stop string and logprobs included, and every request ends with one "done"."""
    from gemmalens.serve.engine import Engine, GenerationRequest

    _, model, _ = env
    tok = model.tokenizer
    free = model.generate("the cat", max_new_tokens=20, ignore_eos=True)
    stop = free[6:9]
    specs = [  # (prompt, n, sampling, seed, stop strings, logprobs, generate's kwargs for choice j)
        ("hello world", 3, dict(temperature=1.0, top_p=0.9), 21, [], None,
         lambda j: dict(temperature=1.0, top_p=0.9, seed=21 + j)),
        ("the cat", 1, dict(temperature=0.0), None, [stop], None, lambda j: dict(stop=[stop])),
        ("a dog ran", 2, dict(temperature=0.8, min_p=0.05), 4, [], 2,
         lambda j: dict(temperature=0.8, min_p=0.05, seed=4 + j)),
        ("once upon", 1, dict(temperature=0.0), None, [], None, lambda j: {}),
    ]
    events, done, emitter = _engine_events(len(specs))
    eng = Engine(model, max_batch=8, max_seq_len=64)
    try:
        for k, (prompt, n, sampling, seed, stops, lp, _) in enumerate(specs):
            eng.submit(GenerationRequest([tok.encode(prompt)], n, 20, sampling, seed, set(), stops, [], lp,
                                         emitter(k)))
        for d in done:
            assert d.wait(120)
        assert eng.stats["peak_running"] >= 5
    finally:
        eng.close()
    for k, (prompt, n, _, _, stops, lp, kw) in enumerate(specs):
        evs = events[k]
        assert [e["type"] for e in evs].count("done") == 1 and evs[-1]["type"] == "done", evs[-3:]
        assert not [e for e in evs if e["type"] == "error"]
        for j in range(n):
            mine = [e for e in evs if e["type"] == "delta" and e["index"] == j]
            text = "".join(e["text"] for e in mine)
            assert text == model.generate(prompt, max_new_tokens=20, ignore_eos=True, **kw(j)), (k, j)
            if lp is not None:
                entries = [x for e in mine for x in e["logprobs"]]
                assert [x[0] for x in entries] == mine[-1]["token_ids"] and all(len(x[2]) == lp for x in entries)
    assert stop not in "".join(e["text"] for e in events[1] if e["type"] == "delta")


def test_serve_load_bench_refuses_bad_options():
    """bench/serve_load.py: an unknown or empty server list, fewer than one request per client and a negative or NaN
    temperature are refused, naming the fix, before any server starts."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import serve_load

    for kw, msg in ((dict(which=["auto", "llamma"]), r"unknown server\(s\) \['llamma'\]: choose one or more of auto"),
                    (dict(which=[]), "no server to run"),
                    (dict(per_client=0), "at least 1, got 0"),
                    (dict(temperature=-1.0), "temperature must be >= 0"),
                    (dict(temperature=float("nan")), "temperature must be >= 0")):
        with pytest.raises(ValueError, match=msg):
            serve_load.rows(gguf="unused.gguf", threads=1, **kw)


def test_engine_with_an_int8_cache_equals_generate_with_one(env):
    """Engine(kv_dtype="int8") (gemmalens serve --kv-dtype int8): its batch cache and each prompt's prefill cache
    hold int8 rows, and greedy requests decoded together give model.generate(kv_dtype="int8")'s text."""
    from gemmalens.serve.engine import Engine, GenerationRequest

    _, model, _ = env
    tok = model.tokenizer
    prompts = ["hello world", "the cat sat on", "once upon a time there"]
    events, done, emitter = _engine_events(len(prompts))
    eng = Engine(model, max_batch=4, max_seq_len=64, kv_dtype="int8")
    try:
        assert eng.cache.kv_dtype == "int8"
        for k, prompt in enumerate(prompts):
            eng.submit(GenerationRequest([tok.encode(prompt)], 1, 16, dict(temperature=0.0), None, set(), [], [], None,
                                         emitter(k)))
        for d in done:
            assert d.wait(120)
    finally:
        eng.close()
    for k, prompt in enumerate(prompts):
        text = "".join(e["text"] for e in events[k] if e["type"] == "delta")
        assert text == model.generate(prompt, max_new_tokens=16, ignore_eos=True, kv_dtype="int8"), k
    with pytest.raises(ValueError, match="kv_dtype must be None .* or 'int8'"):
        Engine(model, max_batch=1, max_seq_len=8, kv_dtype="int4")
