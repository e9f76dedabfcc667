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


def _check_incremental(tok, ids, skip, bounded=True):
    """IncrementalDecoder.push gives tok.decode of every prefix, and its settled head never changes afterwards;
    bounded: it never decodes more than a tail's worth of ids at once (no fall back to the whole list)."""
    dec = tok.decoder(skip_special_tokens=skip)
    longest = []
    decode = tok.decode
    dec._tok = type("Counting", (), dict(decode=lambda self, x, s=False: longest.append(len(x)) or decode(x, s),
                                         vocab_size=tok.vocab_size, _sp=tok._sp))()
    seen = []
    for k, i in enumerate(ids):
        settled, before = dec.settled, dec.text
        text = dec.push(i)
        assert text == tok.decode(ids[:k + 1], skip_special_tokens=skip), (k, ids[max(0, k - 20):k + 1])
        assert text[:settled] == before[:settled]
        seen.append(text)
    if bounded:  # a tail that cannot end inside a run of byte pieces: at most 2 TAIL + the longest run
        run = longest_run = 0
        for i in ids:
            run = run + 1 if tok._sp.IsByte(i) else 0
            longest_run = max(longest_run, run)
        assert max(longest) <= 2 * dec._TAIL + dec._CONTEXT + longest_run
    return seen


def test_incremental_decoder_equals_decode_of_every_prefix(spm_dir, tmp_path):
    import numpy as np
    import sentencepiece as spm

    tok = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    byte_ids = [i for i in range(tok.vocab_size) if tok._sp.IsByte(i)]
    special = sorted(tok._special_ids)
    rng = np.random.default_rng(0)
    # real text (multi-byte characters as byte-fallback runs), then random ids: long runs of byte pieces (invalid
    # and incomplete UTF-8 included) across the points where the settled head moves, special tokens between them
    text_ids = tok.encode(" ".join(CORPUS) * 3, add_bos=False)
    for skip in (False, True):
        _check_incremental(tok, text_ids, skip)
        for trial in range(12):
            ids = []
            while len(ids) < 150:
                kind = rng.integers(3)
                if kind == 0:
                    ids += list(rng.choice(byte_ids, size=int(rng.integers(1, 40))))
                elif kind == 1:
                    ids += [int(rng.choice(special))]
                else:
                    ids += list(rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 20))))
            _check_incremental(tok, [int(i) for i in ids], skip)
    with pytest.raises(ValueError, match="out of range"):
        tok.decoder().push(tok.vocab_size)
    for bad in ("5", 5.0, None, [5]):  # one id, an int (numpy's ints pass: the rows of generate's arrays)
        with pytest.raises(TypeError, match="one token id"):
            tok.decoder().push(bad)
    assert tok.decoder().push(np.int64(text_ids[0])) == tok.decode(text_ids[:1])
    # a tokenizer that strips the leading space of the text's first piece (add_dummy_prefix): the tail's context
    # keeps the result exact
    (tmp_path / "c.txt").write_text("\n".join(CORPUS[:8] * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "dp"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True, minloglevel=2)
    tok2 = gl.Tokenizer(str(tmp_path / "dp.model"))
    ids2 = tok2.encode(" ".join(CORPUS[:8]) * 3, add_bos=False)
    assert tok2.decode(ids2[:1]) != tok2.id_to_piece(ids2[0]).replace("\u2581", " ")  # it does strip
    _check_incremental(tok2, ids2, True)


def test_incremental_decoder_on_the_real_tokenizer(real_gguf_path):
    """The real 270M's tokenizer (262144 pieces): its own greedy continuation and a stretch of multi-byte text."""
    model = gl.load(real_gguf_path, dtype="bfloat16", weights="int8")
    tok = model.tokenizer
    ids = model.generate(tok.encode("A short story about a robot: "), max_new_tokens=120, ignore_eos=True)
    ids = [int(i) for i in ids] + tok.encode("café 東京 😀🚀 ∑∫√ €" * 4, add_bos=False)
    _check_incremental(tok, ids, True)
