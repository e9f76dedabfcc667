"""circuit-tracer 0.5's view of transcoder files that tests/test_transcoders.py writes, dumped for that test.

Runs under a second interpreter (GEMMALENS_CT_PYTHON: a venv with torch and circuit-tracer==0.5.0, which pins
transformers <= 4.57.3 and huggingface-hub < 1, while the test extra has transformers 5 (transformer-lens 3.9 needs
it): they do not install into one venv). circuit-tracer's own loaders read each fixture, then its encode / decode run
on the inputs the test saved beside it:

- ``ct_set``: ``load_transcoders`` (utils/hf_utils.py) of the config.yaml (transcoder_set, a ``transcoders:`` list of
  circuit-tracer layer files): ``load_relu_transcoder`` per layer; TranscoderSet.encode / .decode.
- ``gs2_set``: the same for a list of Gemma Scope 2 ``params.safetensors`` with ``repo_id`` naming gemma-scope-2 (what
  circuit-tracer keys its Gemma Scope 2 loader on): ``load_gemma_scope_2_transcoder``.
- ``ct_clt``: ``load_clt`` of a circuit-tracer CLT folder (what load_transcoders calls once the hub snapshot is
  downloaded); CrossLayerTranscoder.encode / .decode.
- ``gs2_clt``: ``load_transcoders`` of a cross_layer_transcoder config listing Gemma Scope 2 CLT files; its error is
  recorded (``gs2_clt/error``: ``load_gemma_scope_2_clt`` loads range(max(paths)) = N - 1 layer files), then
  ``load_gemma_scope_2_clt`` is called with one more, unread, key so that it reads all N.

Each fixture gets ``<name>/acts`` and ``<name>/recon`` in OUT.npz.

usage: python circuit_tracer_reference.py FIXTURES_DIR OUT.npz
"""
import os
import sys
import warnings

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def main(root, out_path):
    import torch
    import yaml
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
    from circuit_tracer.utils.hf_utils import load_transcoders

    cpu = torch.device("cpu")
    out = {"version": np.array(__import__("circuit_tracer").__version__)}

    def config(name, **extra):
        with open(os.path.join(root, name, "config.yaml")) as f:
            cfg = yaml.safe_load(f)
        cfg.update(scan=None, **extra)
        return cfg

    def run(name, model):
        x = torch.from_numpy(np.load(os.path.join(root, name, "x.npy")))
        with torch.no_grad():
            acts = model.encode(x)
            recon = model.decode(acts, x)
        out[f"{name}/acts"] = acts.float().numpy()
        out[f"{name}/recon"] = recon.float().numpy()

    run("ct_set", load_transcoders(config("ct_set"), device=cpu, dtype=torch.float32, lazy_decoder=False))
    run("gs2_set", load_transcoders(config("gs2_set", repo_id="google/gemma-scope-2-270m-pt"), device=cpu,
                                    dtype=torch.float32, lazy_decoder=False))
    cfg = config("ct_clt")
    run("ct_clt", load_clt(os.path.join(root, "ct_clt"), feature_input_hook=cfg["feature_input_hook"],
                           feature_output_hook=cfg["feature_output_hook"], device=cpu, dtype=torch.float32,
                           lazy_decoder=False))
    cfg = config("gs2_clt", repo_id="google/gemma-scope-2-270m-pt")
    try:
        load_transcoders(cfg, device=cpu, dtype=torch.float32, lazy_decoder=False)
        out["gs2_clt/error"] = np.array("")
    except Exception as e:  # the defect: N - 1 files read, then W_dec shapes that do not fit
        out["gs2_clt/error"] = np.array(f"{type(e).__name__}: {e}")
    paths = dict(enumerate(cfg["transcoders"]))
    paths[len(paths)] = None  # never read: range(max(paths)) now covers every layer
    run("gs2_clt", load_gemma_scope_2_clt(paths, feature_input_hook=cfg["feature_input_hook"],
                                          feature_output_hook=cfg["feature_output_hook"], device=cpu,
                                          dtype=torch.float32))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
