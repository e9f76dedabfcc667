"""--chat on a base model: gl.load finds the chat template a checkpoint carries (HF tokenizer files, GGUF metadata);
the CLI warns when there is none, as for a base (pretrained) model."""
import shutil
import subprocess
import sys

import pytest

import gemmalens as gl
from gemmalens.__main__ import main
from test_tokenizer import spm_dir  # noqa: F401  (fixture: a small SentencePiece model)


@pytest.fixture(scope="module")
def chat_dirs(spm_dir, tmp_path_factory):  # noqa: F811
    """Two tiny HF directories with a tokenizer: 'base' carries no chat template, 'it' one in tokenizer_config.json."""
    from conftest import build_hf

    root = tmp_path_factory.mktemp("chat")
    build_hf(str(root / "base"), seed=4, vocab_size=448)
    shutil.copy(spm_dir / "tokenizer.model", root / "base" / "tokenizer.model")
    shutil.copytree(root / "base", root / "it")
    (root / "it" / "tokenizer_config.json").write_text('{"chat_template": "{{ bos_token }}{% for m in messages %}...", '
                                                       '"bos_token": "<bos>"}')
    return root


def test_chat_template_found_in_hf_directories(chat_dirs, tmp_path):
    assert gl.load(str(chat_dirs / "base")).tokenizer.chat_template is None
    assert gl.load(str(chat_dirs / "it")).tokenizer.chat_template.startswith("{{ bos_token }}")
    # transformers v5 writes chat_template.jinja beside the tokenizer
    d = tmp_path / "jinja"
    shutil.copytree(chat_dirs / "base", d)
    (d / "chat_template.jinja").write_text("{{ bos_token }}jinja")
    assert gl.load(str(d)).tokenizer.chat_template == "{{ bos_token }}jinja"
    # a list of named templates (tokenizer_config.json of some checkpoints): the default one
    d = tmp_path / "named"
    shutil.copytree(chat_dirs / "base", d)
    (d / "tokenizer_config.json").write_text('{"chat_template": [{"name": "tool_use", "template": "T"}, '
                                             '{"name": "default", "template": "D"}]}')
    assert gl.load(str(d)).tokenizer.chat_template == "D"
    # an unreadable tokenizer_config.json costs the template, not the load
    d = tmp_path / "broken"
    shutil.copytree(chat_dirs / "base", d)
    (d / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.warns(UserWarning, match="cannot read the chat template"):
        assert gl.load(str(d)).tokenizer.chat_template is None


def test_chat_template_from_gguf_metadata(hf_models, tmp_path):
    from gguf_util import write_gemma3_gguf

    hf = hf_models["mqa_scaled_softcap"][0]
    V = hf.config.vocab_size
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"t{i}" for i in range(V - len(pieces))]
    toks = (pieces, [0.0] * V, [3, 3, 3, 2, 4, 4] + [6] * 256 + [1] * (V - 262))
    write_gemma3_gguf(str(tmp_path / "base.gguf"), hf, tokenizer_tokens=toks)
    write_gemma3_gguf(str(tmp_path / "it.gguf"), hf, tokenizer_tokens=toks, chat_template="{{ bos_token }}gguf")
    assert gl.load(str(tmp_path / "base.gguf")).tokenizer.chat_template is None
    assert gl.load(str(tmp_path / "it.gguf")).tokenizer.chat_template == "{{ bos_token }}gguf"


def test_chat_warning_only_for_a_model_without_template(chat_dirs, capsys):
    argv = ["generate", "--max-new-tokens", "2", "--chat", "--dtype", "float32", "hello world"]
    assert main(argv + ["--model", str(chat_dirs / "base")]) == 0
    err = capsys.readouterr().err
    assert "carries no chat template" in err and "instruction-tuned checkpoint" in err
    assert main(argv + ["--model", str(chat_dirs / "it")]) == 0
    assert "chat template" not in capsys.readouterr().err


def test_chat_on_the_base_demo_model_warns(real_gguf_path, capsys):
    out = subprocess.run([sys.executable, "-m", "gemmalens", "generate", "--max-new-tokens", "3", "--chat",
                          "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "'gemma3-270m' carries no chat template" in out.stderr
    assert "base (pretrained) model" in out.stderr and "instruction-tuned checkpoint" in out.stderr
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--chat" in help_text and "needs an instruction-tuned checkpoint" in help_text
