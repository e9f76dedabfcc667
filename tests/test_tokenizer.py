"""gl.Tokenizer against HF's GemmaTokenizer on the same SentencePiece BPE model (byte fallback)."""
import shutil

import pytest

import gemmalens as gl

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and   runs of    spaces",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "def f(x):\n    return x ** 2  # code\n",
    "digits 1234567890 and 3.14159 and 1,000,000",
    "accents: café, naïve, Ærøskøbing, façade",
    "CJK: 東京は日本の首都です。中文测试",
    "emoji 😀🚀👍🏽 and symbols ∑∫√ €",
    "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
    "unseen bytes: \x01\x7f Ω ж ק",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    text = "\n".join(CORPUS[:8] * 20 + ["the cat sat on the mat " * 5, "hello world " * 10, "    indented code\n" * 5])
    (d / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        control_symbols=["<mask>"], user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
    return d


def test_matches_hf_gemma_tokenizer(spm_dir):
    from transformers import GemmaTokenizer

    ours = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    hf = GemmaTokenizer.from_pretrained(str(spm_dir))
    for text in CORPUS:
        expected = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False) == expected, text
        assert ours.encode(text) == [ours.bos_id] + expected
        assert ours.decode(expected) == hf.decode(expected), text


def test_decode_roundtrip_and_specials(spm_dir):
    tok = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    for text in CORPUS:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<start_of_turn>", "").replace("<end_of_turn>", "")
    ids = tok.encode("<bos>hi")
    assert ids.count(tok.bos_id) == 1  # BOS once, also when the text starts with it
    assert tok.decode(ids) == "<bos>hi"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([10**6])
    with pytest.raises(TypeError):
        tok.encode(123)


def test_chat_template_errors(spm_dir):
    """The rendering itself is compared with the official Gemma 3 template in tests/test_chat.py."""
    tok = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and tok.start_of_turn_id in ids
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("model\n")
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match="image content is not supported"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}])
    with pytest.raises(ValueError, match="content must be a string or a list"):
        tok.apply_chat_template([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="non-empty list"):
        tok.apply_chat_template([])


def test_load_attaches_tokenizer_and_generates_text(tiny_dir, spm_dir, tmp_path):
    from conftest import build_hf

    d = tmp_path / "with_tok"
    build_hf(str(d), seed=3, vocab_size=448)
    shutil.copy(spm_dir / "tokenizer.model", d / "tokenizer.model")
    model = gl.load(str(d))
    assert isinstance(model.tokenizer, gl.Tokenizer)
    out = model.generate("hello world", max_new_tokens=8, ignore_eos=True)
    assert isinstance(out, str)
    ids = model.generate(model.tokenizer.encode("hello world"), max_new_tokens=8, ignore_eos=True)
    assert out == model.tokenizer.decode(ids, skip_special_tokens=True)
    pieces = list(model.generate("hello world", max_new_tokens=8, ignore_eos=True, stream=True))
    assert "".join(pieces) == out
    outs = model.generate(["hello world", "the cat"], max_new_tokens=5, ignore_eos=True)
    assert outs[0] == model.generate("hello world", max_new_tokens=5, ignore_eos=True)
    assert gl.load(tiny_dir).tokenizer is None


def test_bad_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        gl.Tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        gl.Tokenizer(str(tmp_path / "bad.model"))
