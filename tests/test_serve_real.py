"""gemmalens serve on the real Gemma 3 270M (the demo GGUF) in the CLI's default mode (bfloat16, int8 weights):
concurrent greedy completions equal model.generate run alone, and /health answers while a long prompt is prefilled
(the native forward releases the GIL)."""
import concurrent.futures as cf
import threading
import time

import httpx
import pytest

import gemmalens as gl
from serve_util import Server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    # one thread: the prefill below takes long enough to be seen on a fast machine too
    srv = Server(["--model", "gemma3-270m", "--max-batch", "4", "--max-seq-len", "2048", "--threads", "1"],
                 str(tmp_path_factory.mktemp("serve_real") / "server.log"))
    try:
        yield srv, gl.load("gemma3-270m", dtype="bfloat16", weights="auto", threads=1, progress=False)
    finally:
        srv.stop()


def test_real_model_concurrent_completions_equal_generate(real):
    srv, model = real
    client = srv.openai()
    n = 24
    want = [model.generate(p, max_new_tokens=n) for p in PROMPTS]

    def run(p):
        r = client.completions.create(model="gemma3-270m", prompt=p, max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in r)

    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        got = list(ex.map(run, PROMPTS))
    assert got == want
    assert srv.health()["peak_running"] >= 2
    msgs = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(model="gemma3-270m", messages=msgs, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == model.generate(model.tokenizer.apply_chat_template(msgs), max_new_tokens=12)


def test_health_answers_during_a_long_prefill(real):
    srv, model = real
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 65)  # ~600 tokens
    result = {}

    def complete():
        result["r"] = srv.post("/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=300)

    t = threading.Thread(target=complete)
    t.start()
    seen, latencies = 0, []
    while t.is_alive():
        t0 = time.perf_counter()
        h = httpx.get(srv.url + "/health", timeout=30).json()
        latencies.append(time.perf_counter() - t0)
        seen += h["busy"] == "prefill"
        time.sleep(0.005)
    t.join()
    assert result["r"].status_code == 200, result["r"].text
    # answered while the engine thread was inside the native prefill, and promptly
    assert seen >= 3, (seen, latencies)
    assert sorted(latencies)[len(latencies) // 2] < 0.25, latencies
