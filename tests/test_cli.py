"""The command line: --version, info, the fast mode by default, --verbose saying which mode runs, and --temperature /
--seed / --dtype / --chat against the Python API."""
import json
import shutil
import subprocess
import sys

import pytest

import gemmalens as gl
from gemmalens.__main__ import _parser, main
from test_chat import GEMMA3_CHAT_TEMPLATE
from test_tokenizer import spm_dir  # noqa: F401  (fixture: a small SentencePiece model)


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gemmalens", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_version():
    for argv in (["-m", "gemmalens", "--version"], ["-c", "from gemmalens.__main__ import main; main(['--version'])"]):
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"gemmalens {gl.__version__} (oneDNN {gl._core.dnnl_version()})"
    assert gl.__version__ == "0.1.0"


def test_info_reports_the_class_paths_and_rates(capsys):
    """gemmalens info: the version, the class and every path of gl.cpu_info(); --json is one object with the same
    values; --rates measures a bandwidth and three matmul rates; a forced class shows in a child process."""
    import os

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = gl.cpu_info()
    assert out.startswith(f"gemmalens {gl.__version__} (oneDNN {gl._core.dnnl_version()})")
    assert f"class: {info['class']} (this CPU: {info['detected']};" in out
    for k in ("bf16_matmul", "decode_bf16", "int8", "int8_prefill", "attention", "attention_decode_bf16"):
        assert f"{k}={info[k]}" in out
    assert main(["info", "--json", "--rates"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {k: d[k] for k in info} == info and d["threads"] >= 1 and d["cores"] == len(os.sched_getaffinity(0))
    assert d["read_bandwidth"] > 1e8 and set(d["matmul_rates"]) == {"float32", "bfloat16", "int8"}
    assert all(v > 1e8 for v in d["matmul_rates"].values())
    r = _cli("info", "--json", env=dict(os.environ, GEMMALENS_MAX_ISA="avx2"))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["class"] == "avx2" and d["cap"] == "avx2" and d["detected"] == info["detected"]
    assert d["decode_bf16"] == "avx2_widen" and d["int8"] == "avx2_maddubs"


def test_generate_defaults_to_the_fast_mode(capsys):
    args = _parser().parse_args(["generate", "hi"])
    assert (args.dtype, args.weights, args.threads) == ("bfloat16", "auto", None)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "gl.load in Python keeps float32 native weights" in help_text


def test_cli_verbose_names_the_mode(real_gguf_path):
    out = _cli("generate", "--max-new-tokens", "3", "--verbose", "The capital of France is")
    assert out.returncode == 0, out.stderr
    # the default mode: bf16 compute, the Q4_K_M file's weights kept as int8 blocks (--weights auto)
    assert "dtype bfloat16, weights int8 (--weights auto)" in out.stderr
    ref = _cli("generate", "--max-new-tokens", "3", "--verbose", "--dtype", "float32", "--weights", "native", "hi")
    assert ref.returncode == 0, ref.stderr
    assert "dtype float32, weights native," in ref.stderr


@pytest.fixture(scope="module")
def cli_dir(spm_dir, tmp_path_factory):  # noqa: F811
    """A tiny HF checkpoint with a tokenizer (as many embeddings as pieces) and the official Gemma 3 chat template in
    tokenizer_config.json, as an instruction-tuned checkpoint carries it."""
    from conftest import build_hf

    d = tmp_path_factory.mktemp("cli") / "it"
    build_hf(str(d), seed=4, vocab_size=420)
    shutil.copy(spm_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": GEMMA3_CHAT_TEMPLATE, "bos_token": "<bos>"}))
    return str(d)


def _run(capsys, *argv):
    """main() in-process -> (stdout, stderr); it must succeed."""
    capsys.readouterr()
    assert main(["generate", *argv]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_cli_temperature_and_seed_sample_as_the_python_api(cli_dir, capsys):
    """--temperature / --top-k / --top-p / --min-p / --repetition-penalty / --seed: the same seed gives the same
    text, other seeds other texts, and each equals gl.load(...).generate with those arguments in the CLI's mode
    (bf16; an HF folder's weights stay native under --weights auto). Temperature 0 is greedy whatever the seed."""
    api = gl.load(cli_dir, dtype="bfloat16")
    prompt, n = "hello world", 12
    base = ["--model", cli_dir, "--max-new-tokens", str(n)]
    texts = {}
    for seed in range(4):
        out, _ = _run(capsys, *base, "--temperature", "1.0", "--seed", str(seed), prompt)
        assert out == api.generate(prompt, max_new_tokens=n, temperature=1.0, seed=seed) + "\n", seed
        texts[seed] = out
    assert _run(capsys, *base, "--temperature", "1.0", "--seed", "0", prompt)[0] == texts[0]
    assert len(set(texts.values())) >= 3
    filtered, _ = _run(capsys, *base, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3", prompt)
    assert filtered == api.generate(prompt, max_new_tokens=n, temperature=0.7, top_k=5, top_p=0.9, seed=3) + "\n"
    min_p, _ = _run(capsys, *base, "--temperature", "1.3", "--min-p", "0.2", "--seed", "5", prompt)
    assert min_p == api.generate(prompt, max_new_tokens=n, temperature=1.3, min_p=0.2, seed=5) + "\n"
    greedy = api.generate(prompt, max_new_tokens=n)
    penalised, _ = _run(capsys, *base, "--repetition-penalty", "4", prompt)
    assert penalised == api.generate(prompt, max_new_tokens=n, repetition_penalty=4.0) + "\n"
    assert penalised != greedy + "\n"  # the greedy text repeats tokens (a tiny random model's does)
    assert greedy + "\n" not in texts.values()
    for seed in ("1", "2"):
        assert _run(capsys, *base, "--seed", seed, prompt)[0] == greedy + "\n"
        assert _run(capsys, *base, "--temperature", "0", "--seed", seed, prompt)[0] == greedy + "\n"


@pytest.mark.parametrize("flag,value,msg", [
    ("--min-p", "2", "min_p must be in [0, 1]"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
])
def test_cli_bad_sampling_values_are_named(cli_dir, capsys, flag, value, msg):
    capsys.readouterr()
    assert main(["generate", "--model", cli_dir, "--max-new-tokens", "4", flag, value, "hello"]) == 1
    assert f"gemmalens: error: {msg}" in capsys.readouterr().err


def test_cli_kv_dtype_int8(cli_dir, capsys):
    """--kv-dtype int8: the text of generate(kv_dtype="int8") in the CLI's mode, said by --verbose; other values are
    refused by argparse."""
    out, err = _run(capsys, "--model", cli_dir, "--max-new-tokens", "12", "--kv-dtype", "int8", "--verbose", "the cat")
    assert "KV cache int8" in err
    assert out == gl.load(cli_dir, dtype="bfloat16").generate("the cat", max_new_tokens=12, kv_dtype="int8") + "\n"
    with pytest.raises(SystemExit):
        main(["generate", "--model", cli_dir, "--kv-dtype", "q4_0", "hi"])
    assert "invalid choice: 'q4_0'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_dtype(cli_dir, capsys, dtype):
    """--dtype picks the compute mode (said by --verbose) and the text is the Python API's in that mode."""
    out, err = _run(capsys, "--model", cli_dir, "--max-new-tokens", "10", "--temperature", "0.9", "--seed", "11",
                    "--dtype", dtype, "--verbose", "the cat")
    assert f"dtype {dtype}, weights native (--weights auto)" in err
    api = gl.load(cli_dir, dtype=dtype)
    assert api.dtype == dtype
    assert out == api.generate("the cat", max_new_tokens=10, temperature=0.9, seed=11) + "\n"
    with pytest.raises(SystemExit):
        main(["generate", "--model", cli_dir, "--dtype", "float16", "hi"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err


def test_cli_chat_renders_the_official_template(cli_dir, capsys):
    """--chat wraps the prompt in Gemma 3's turn format, the text the checkpoint's own (official) template renders, and
    generates from it; no base-model warning for a checkpoint that carries a template."""
    from test_chat import U, hf_render

    prompt = "  What is 2+2? "
    api = gl.load(cli_dir, dtype="float32")
    assert api.tokenizer.chat_template == GEMMA3_CHAT_TEMPLATE
    wrapped = hf_render(api.tokenizer.chat_template, [U(prompt)], True)
    assert wrapped == "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    out, err = _run(capsys, "--model", cli_dir, "--chat", "--dtype", "float32", "--max-new-tokens", "8", prompt)
    assert "chat template" not in err
    assert out == api.generate(wrapped, max_new_tokens=8) + "\n"
    plain, _ = _run(capsys, "--model", cli_dir, "--dtype", "float32", "--max-new-tokens", "8", prompt)
    assert plain == api.generate(prompt, max_new_tokens=8) + "\n" and plain != out
