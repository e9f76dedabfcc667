"""TransformerLens 4.3's view of an HF Gemma 3 checkpoint, dumped for tests/test_transformer_lens4.py.

Runs under a second interpreter (GEMMALENS_TL4_PYTHON: a venv with torch, transformer-lens 4.3 and transformers;
transformer-lens 4 and sae-lens do not install into one venv). TransformerBridge.boot_transformers loads the
folder itself (transformers' from_pretrained, eager attention, float32, no weight processing), then:

- ``act/<hook name>``: run_with_cache(tokens), every hook;
- ``grad/<hook name>``: run_with_cache(tokens, return_type="loss", incl_bwd=True), the loss's gradient at every hook;
- ``patch/<i>``: logits of run_with_hooks(tokens) with the i-th edit of EDITS (the test makes the same edits);
- ``weight/<name>``: the W_* properties (stacked and blocks[l]'s), ``cfg``: TransformerLens's config fields (JSON).

usage: python tl4_reference.py MODEL_DIR TOKENS.npy OUT.npz
"""
import json
import os
import sys
import warnings

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def edits(torch):
    """(hook name, torch hook fn) pairs; tests/test_transformer_lens4.py makes the same edits in gemmalens."""
    def zero_head1(x, hook):  # q_norm sites are [batch, head, pos, d_head] in TransformerLens
        x = x.clone()
        x[:, 1] = 0
        return x

    return [
        [("blocks.0.ln2.hook_scale", lambda x, hook: x * 2.0)],  # (ln1: a uniform scale there cancels in q_norm etc.)
        [("blocks.1.attn.q_norm.hook_normalized", zero_head1)],
        [("blocks.1.ln2.hook_normalized", lambda x, hook: x + 0.5), ("ln_final.hook_scale", lambda x, hook: x * 0.7)],
        [("blocks.0.attn.k_norm.hook_scale", lambda x, hook: x + 1.0),
         ("blocks.1.ln2_post.hook_normalized", lambda x, hook: x * 0.25)],
    ]


CFG_FIELDS = ["d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx",
              "n_key_value_heads", "eps", "act_fn", "normalization_type", "positional_embedding_type"]


def main(model_dir, tokens_path, out_path):
    import torch
    from tokenizers import Tokenizer, models
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(2)
    # TransformerBridge wants a tokenizer; the random-weight model has none: a stub (token ids are passed).
    stub = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>", bos_token="<unk>", eos_token="<unk>")
    tok_dir = os.path.join(os.path.dirname(os.path.abspath(out_path)), "stub-tokenizer")  # TL reloads it by path
    stub.save_pretrained(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    bridge = TransformerBridge.boot_transformers(os.path.abspath(model_dir), tokenizer=tok, device="cpu",
                                                 dtype=torch.float32)
    tokens = torch.as_tensor(np.load(tokens_path), dtype=torch.long)
    out = {}
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
    out["logits"] = logits.float().numpy()
    for name, value in cache.items():
        out["act/" + name] = value.detach().float().numpy()
    loss, gcache = bridge.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    out["loss"] = np.float32(loss.item())
    for name, value in gcache.items():
        if name.endswith("_grad"):
            out["grad/" + name[:-len("_grad")]] = value.detach().float().numpy()
    for i, hooks in enumerate(edits(torch)):
        with torch.no_grad():
            out[f"patch/{i}"] = bridge.run_with_hooks(tokens, fwd_hooks=hooks).float().numpy()
    for name in ("W_E", "W_U", "W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out"):
        out["weight/" + name] = getattr(bridge, name).detach().float().numpy()
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        out[f"weight/blocks.1.attn.{name}"] = getattr(bridge.blocks[1].attn, name).detach().float().numpy()
    for name in ("W_in", "W_gate", "W_out"):
        out[f"weight/blocks.1.mlp.{name}"] = getattr(bridge.blocks[1].mlp, name).detach().float().numpy()
    out["cfg"] = np.array(json.dumps({k: getattr(bridge.cfg, k) for k in CFG_FIELDS}))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
