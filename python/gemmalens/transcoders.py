"""Transcoder sets and cross-layer transcoders (CLTs) in circuit-tracer's and Gemma Scope 2's files: loading, native
encode / decode (the oneDNN matmuls of ``_core.SAE``), and splicing into the forward pass with feature hooks.

File layouts (facts from circuit-tracer 0.5, circuit_tracer/transcoder/{single_layer,cross_layer}_transcoder.py and
utils/hf_utils.py, and from Gemma Scope 2's releases as SAELens's gemma_3 loader reads them):

- circuit-tracer ``config.yaml``: ``model_kind`` (``transcoder_set`` | ``cross_layer_transcoder``),
  ``feature_input_hook``, ``feature_output_hook`` (TransformerLens names), optional ``transcoders:`` (one file per
  layer, in layer order; local paths or ``hf://owner/repo/path?revision=r``).
- circuit-tracer per-layer file ``layer_{i}.safetensors``: ``W_enc`` [d_t, d], ``W_dec`` [d_t, d], ``b_enc`` [d_t],
  ``b_dec`` [d], optional ``activation_function.threshold`` [d_t] (JumpReLU, else ReLU), optional ``W_skip`` [d, d]
  (added as x @ W_skip.T). Its JumpReLU is x * (x > threshold), no ReLU ("jumprelu_signed" here).
- circuit-tracer CLT folder: ``W_enc_{i}.safetensors`` (``W_enc_{i}`` [d_t, d], ``b_enc_{i}``, ``b_dec_{i}`` [d] --
  the bias of layer i's output --, optional ``threshold_{i}``) and ``W_dec_{i}.safetensors`` (``W_dec_{i}``
  [d_t, N - i, d]: layer i's features write to the outputs of layers i..N-1). N = the number of W_enc files.
- Gemma Scope 2 per-layer transcoder: ``params.safetensors`` (``w_enc`` [d, d_t], ``w_dec`` [d_t, d], ``b_enc``,
  ``b_dec``, ``threshold``, optional ``affine_skip_connection`` [d, d], added as x @ it) + ``config.json``.
- Gemma Scope 2 CLT (``clt/<variant>/params_layer_{i}.safetensors``): per layer ``w_enc`` [d, d_t], ``w_dec``
  [d_t, N, d] (only rows i.. are used: a feature writes to its own layer and the later ones), ``b_enc``, ``b_dec``,
  ``threshold``, optional ``affine_skip_connection``. It reads pre_feedforward_layernorm's output (ln2.hook_out) and
  writes post_feedforward_layernorm's (hook_mlp_out), as SAELens's Gemma 3 loader and circuit-tracer's Gemma Scope 2
  configs (feature_input_hook mlp.hook_in) take it.

A CLT spliced in replaces the output of every layer's MLP (``hook_mlp_out``) by the sum of the decoder contributions
of the features of that layer and of every earlier one, plus b_dec (and the skip term); with the error term the
output is the model's own while the features stay observable and editable. Feature hooks, per layer L:
``blocks.L.hook_clt_acts_post`` [batch, pos, d_t] (features read at layer L), ``blocks.L.hook_clt_recon``
[batch, pos, d] (layer L's reconstructed MLP output) and, with the error term, ``blocks.L.hook_clt_error``.
"""
import glob
import json
import os
import re

import numpy as np

from . import _core
from .sae import SAE, _SIZES, _Edit, _apply_py, _from_hub, _hf_point_to_tl

# circuit-tracer's TransformerLens hook names for Gemma 3 (circuit_tracer/utils/tl_nnsight_mapping.py, Gemma3ForCausalLM)
# -> gemmalens block hooks: mlp.hook_in is pre_feedforward_layernorm's output (ln2's weighted output, ln2.hook_out),
# ln2.hook_normalized its normalised input before the weight (the same meaning in gemmalens), hook_resid_mid the
# norm's input, hook_mlp_out post_feedforward_layernorm's output.
_CT_INPUT_HOOKS = {"mlp.hook_in": "ln2.hook_out", "ln2.hook_out": "ln2.hook_out", "hook_resid_mid": "hook_resid_mid",
                   "ln2.hook_normalized": "ln2.hook_normalized"}
_CT_OUTPUT_HOOKS = {"hook_mlp_out": "hook_mlp_out"}
CLT_SUFFIXES = ("hook_clt_acts_post", "hook_clt_recon", "hook_clt_error")


def _hooks(feature_input_hook, feature_output_hook, where):
    """circuit-tracer's feature_input_hook / feature_output_hook -> gemmalens block-hook suffixes."""
    if feature_input_hook not in _CT_INPUT_HOOKS:
        raise ValueError(f"{where}: feature_input_hook {feature_input_hook!r} is not supported for Gemma 3 (supported: "
                         f"{', '.join(sorted(_CT_INPUT_HOOKS))})")
    if feature_output_hook not in _CT_OUTPUT_HOOKS:
        raise ValueError(f"{where}: feature_output_hook {feature_output_hook!r} is not supported for Gemma 3 "
                         f"(supported: {', '.join(sorted(_CT_OUTPUT_HOOKS))})")
    return _CT_INPUT_HOOKS[feature_input_hook], _CT_OUTPUT_HOOKS[feature_output_hook]


def _read(path):
    """Every tensor of a .safetensors file as float32 numpy (CheckpointError for a malformed file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"transcoder file '{path}' does not exist")
    return _core.read_safetensors(path)


def _need(t, path, names):
    missing = [n for n in names if n not in t]
    if missing:
        raise _core.CheckpointError(f"transcoder file '{path}' lacks tensor(s) {', '.join(missing)} (has: "
                                    f"{', '.join(sorted(t)) or 'nothing'})")


def _shape(t, path, name, shape):
    if tuple(t[name].shape) != tuple(shape):
        raise _core.CheckpointError(f"transcoder file '{path}': tensor '{name}' has shape {tuple(t[name].shape)}, "
                                    f"expected {tuple(shape)}")


def _no_extra(t, path, known):
    extra = sorted(set(t) - set(known))
    if extra:
        raise _core.CheckpointError(f"transcoder file '{path}' holds tensor(s) {', '.join(extra)} that this layout "
                                    f"does not have (known: {', '.join(known)}): refusing to ignore them")


def _yaml(path):
    try:
        import yaml
    except ImportError:
        raise ImportError("reading circuit-tracer's config.yaml needs PyYAML: pip install 'gemmalens[transcoders]'") from None
    try:
        with open(path, "rb") as f:
            cfg = yaml.safe_load(f.read().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise _core.CheckpointError(f"'{path}' is not valid UTF-8 YAML ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise _core.CheckpointError(f"'{path}' must hold a YAML mapping (model_kind, feature_input_hook, ...), got "
                                    f"{type(cfg).__name__}")
    return cfg


def _resolve(entry, base, what):
    """One entry of config.yaml's transcoders list -> a local file: hf://owner/repo/path[?revision=r] through
    huggingface_hub (the hub extra; the HF cache, HF_HUB_OFFLINE=1 honoured), else a path (relative ones from the
    config's folder first, as circuit-tracer's own configs hold hub URIs or absolute paths)."""
    if not isinstance(entry, str):
        raise _core.CheckpointError(f"{what}: transcoders entries must be strings, got {entry!r}")
    if entry.startswith("hf://"):
        m = re.fullmatch(r"hf://([^/?]+/[^/?]+)/([^?]+)(?:\?revision=([^&]+))?", entry)
        if not m:
            raise ValueError(f"{what}: {entry!r} is not an hf://owner/repo/path[?revision=r] URI")
        try:
            import huggingface_hub
        except ImportError:
            raise ImportError(f"{what}: {entry!r} is on the Hugging Face hub; pip install 'gemmalens[hub]' (or download "
                              "it and list the local path)") from None
        try:
            return huggingface_hub.hf_hub_download(m.group(1), m.group(2), revision=m.group(3))
        except Exception as e:  # huggingface_hub's errors: not found, gated, offline without a cached copy, network
            raise FileNotFoundError(f"{what}: {entry!r} could not be fetched ({type(e).__name__}: {e}); with "
                                    "HF_HUB_OFFLINE=1 it must already be in the HF cache") from None
    local = entry if os.path.isabs(entry) else os.path.join(base, entry)
    return local if os.path.exists(local) else entry


_HUB_FILES = ["config.yaml", "config.json", "*.safetensors"]


def _local(path, subfolder, what, example):
    """A local path (file or folder; subfolder joined), else a hub repository id with the folder inside it (as
    gl.SAE.load takes them): that folder's config.yaml / config.json / *.safetensors from the HF cache, fetched by
    huggingface_hub (gemmalens[hub]); hf:// entries of its config.yaml are fetched as they are read."""
    if subfolder is not None and not isinstance(subfolder, (str, os.PathLike)):
        raise TypeError(f"{what}: subfolder must be a folder name inside the repository, got {subfolder!r} (dtype is a "
                        f"keyword argument: {what}(path, dtype='bfloat16'))")
    path = os.fspath(path)
    if os.path.exists(path):
        return path if subfolder is None else os.path.join(path, os.fspath(subfolder))
    return _from_hub(path, None if subfolder is None else os.fspath(subfolder), _HUB_FILES, what, example)


def _numbered(folder, pattern):
    """Files folder/pattern with {i} = 0, 1, ... N-1 (refused when the numbers have a gap)."""
    rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
    found = {}
    for f in os.listdir(folder):
        m = rx.match(f)
        if m:
            found[int(m.group(1))] = os.path.join(folder, f)
    if found and sorted(found) != list(range(len(found))):
        raise _core.CheckpointError(f"'{folder}': the {pattern.format(i='*')} files are numbered "
                                    f"{sorted(found)}, not 0..{len(found) - 1}")
    return [found[i] for i in range(len(found))]


# ------------------------------------------------------------------------------------------------ per-layer files


def _transcoder_from_file(path, layer, hook_in, hook_out, model_name, dtype):
    """One per-layer transcoder file (circuit-tracer's layer_{i}.safetensors or a Gemma Scope 2 params.safetensors,
    told apart by their tensor names) -> gl.SAE reading blocks.{layer}.{hook_in}, writing blocks.{layer}.{hook_out}."""
    if path.endswith(".npz"):
        raise ValueError(f"'{path}': .npz transcoders are the first Gemma Scope's (Gemma 2), not Gemma 3's")
    t = _read(path)
    hin, hout = f"blocks.{layer}.{hook_in}", f"blocks.{layer}.{hook_out}"
    if "w_enc" in t:  # Gemma Scope 2: w_enc [d, d_t], w_dec [d_t, d], x @ affine_skip_connection; ReLU(x) * mask
        known = ["w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection"]
        _need(t, path, known[:5])
        _no_extra(t, path, known)
        if t["w_dec"].ndim == 3:
            raise ValueError(f"'{path}' is a Gemma Scope 2 cross-layer transcoder layer (w_dec {t['w_dec'].shape}): "
                             "load its folder with gl.CLT.load")
        if t["w_enc"].ndim != 2:
            raise _core.CheckpointError(f"'{path}': w_enc must be [d_model, d_transcoder], got {t['w_enc'].shape}")
        d, dt = t["w_enc"].shape
        for n, s in (("w_enc", (d, dt)), ("w_dec", (dt, d)), ("b_enc", (dt,)), ("b_dec", (d,)), ("threshold", (dt,))):
            _shape(t, path, n, s)
        skip = t.get("affine_skip_connection")
        if skip is not None:
            _shape(t, path, "affine_skip_connection", (d, d))
        return SAE(t["w_enc"], t["b_enc"], t["w_dec"], t["b_dec"], threshold=t["threshold"], W_skip=skip,
                   architecture="jumprelu", hook_name=hin, hook_name_out=hout, model_name=model_name, dtype=dtype,
                   cfg={"source": path})
    # circuit-tracer: W_enc [d_t, d], W_dec [d_t, d], x @ W_skip.T; JumpReLU without ReLU (x * (x > threshold))
    known = ["W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold", "W_skip"]
    _need(t, path, known[:4])
    _no_extra(t, path, known)
    if t["W_enc"].ndim != 2:
        raise _core.CheckpointError(f"'{path}': W_enc must be [d_transcoder, d_model], got {t['W_enc'].shape}")
    dt, d = t["W_enc"].shape
    for n, s in (("W_enc", (dt, d)), ("W_dec", (dt, d)), ("b_enc", (dt,)), ("b_dec", (d,))):
        _shape(t, path, n, s)
    thr = t.get("activation_function.threshold")
    if thr is not None:
        _shape(t, path, "activation_function.threshold", (dt,))
    skip = t.get("W_skip")
    if skip is not None:
        _shape(t, path, "W_skip", (d, d))
        skip = skip.T
    return SAE(t["W_enc"].T, t["b_enc"], t["W_dec"], t["b_dec"], threshold=thr, W_skip=skip,
               architecture="relu" if thr is None else "jumprelu_signed", hook_name=hin, hook_name_out=hout,
               model_name=model_name, dtype=dtype, cfg={"source": path})


class TranscoderSet:
    """Per-layer transcoders (one ``gl.SAE`` each) used together, as circuit-tracer's TranscoderSet: circuit-tracer's
    ``config.yaml`` + ``layer_{i}.safetensors`` (or its ``transcoders:`` list), or Gemma Scope 2 transcoder folders.

    ``tset[L]`` is layer L's transcoder; ``model.saes([tset])`` / ``run_with_saes(ids, saes=[tset])`` splice them all
    (each replaces its layer's MLP output; features at ``blocks.L.<input hook>.hook_sae_acts_post``).
    ``encode`` / ``decode`` take and give arrays stacked over the set's layers, as circuit-tracer's do.
    """

    def __init__(self, transcoders, source=None):
        """transcoders: gl.SAE transcoders, a list (each at the layer it reads) or {layer: transcoder}."""
        given = list(transcoders.values()) if isinstance(transcoders, dict) else list(transcoders)
        for s in given:
            if not isinstance(s, SAE) or not s.is_transcoder:
                raise TypeError(f"TranscoderSet: expected gl.SAE transcoders (reading one site, writing another), got "
                                f"{s!r}")
        if isinstance(transcoders, dict):
            items = sorted(transcoders.items())
        else:
            items = sorted(((_layer_of(s), s) for s in given), key=lambda it: it[0])
        if not items:
            raise ValueError("TranscoderSet: no transcoders")
        for layer, s in items:
            if _layer_of(s) != layer:
                raise ValueError(f"TranscoderSet: the transcoder given for layer {layer} reads {s.hook_name}")
        layers = [layer for layer, _ in items]
        if len(set(layers)) != len(layers):
            raise ValueError(f"TranscoderSet: more than one transcoder for a layer ({layers})")
        self.layers = layers
        self.transcoders = [s for _, s in items]
        self.source = source

    def __len__(self):
        return len(self.transcoders)

    def __iter__(self):
        return iter(self.transcoders)

    def __getitem__(self, layer):
        if layer not in self.layers:
            raise KeyError(f"this TranscoderSet has no transcoder at layer {layer} (layers: {self.layers})")
        return self.transcoders[self.layers.index(layer)]

    def __repr__(self):
        s = self.transcoders[0]
        return (f"gemmalens.TranscoderSet({len(self)} layers {self.layers[0]}..{self.layers[-1]}, d_transcoder="
                f"{s.d_sae}, {s.hook_name.split('.', 2)[2]} -> {s.hook_name_out.split('.', 2)[2]})")

    @property
    def d_transcoder(self):
        widths = {s.d_sae for s in self.transcoders}
        if len(widths) != 1:
            raise ValueError(f"this TranscoderSet's transcoders have different widths {sorted(widths)}: use each one "
                             "(tset[layer])")
        return widths.pop()

    def _stacked(self, x, width, what):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 2 or x.shape[0] != len(self) or x.shape[-1] != width:
            raise ValueError(f"TranscoderSet.{what}: expected [n_layers = {len(self)}, ..., {width}] (stacked over the "
                             f"layers {self.layers}), got shape {x.shape}")
        return x

    def encode(self, x):
        """x [n_layers, ..., d] (each layer's input, stacked in the set's layer order) -> [n_layers, ..., d_t]."""
        x = self._stacked(x, self.transcoders[0].d_in, "encode")
        return np.stack([s.encode(x[i]) for i, s in enumerate(self.transcoders)])

    def decode(self, acts, x=None):
        """acts [n_layers, ..., d_t] -> [n_layers, ..., d] (x [n_layers, ..., d] for skip connections)."""
        acts = self._stacked(acts, self.d_transcoder, "decode")
        x = None if x is None else self._stacked(x, self.transcoders[0].d_in, "decode")
        return np.stack([s.decode(acts[i], None if x is None else x[i]) for i, s in enumerate(self.transcoders)])

    def __call__(self, x):
        return np.stack([s(xi) for s, xi in zip(self.transcoders, self._stacked(x, self.transcoders[0].d_in, "forward"))])

    def check_model(self, model):
        for s in self.transcoders:
            s.check_model(model)

    @classmethod
    def load(cls, path, subfolder=None, dtype="float32", feature_input_hook=None, feature_output_hook=None):
        """A transcoder set -> ``gl.TranscoderSet``.

        path: circuit-tracer's ``config.yaml`` (``model_kind: transcoder_set``) or its folder (``config.yaml`` beside
        ``layer_{i}.safetensors``, or with a ``transcoders:`` list of files, circuit-tracer's or Gemma Scope 2's
        ``params.safetensors``, local or ``hf://``); a folder of ``layer_{i}.safetensors`` without a config (give
        ``feature_input_hook`` / ``feature_output_hook``, circuit-tracer's TransformerLens names); or a list of Gemma
        Scope 2 transcoder folders (``params.safetensors`` + ``config.json``, each read by ``gl.SAE.load``). A path
        that is not local is a hub repository id with the folder inside it, after the id or as ``subfolder``, as
        circuit-tracer's own references are (``"mwhanna/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small"``).
        dtype: "float32" or "bfloat16" (weights' storage).

        >>> tset = gl.TranscoderSet.load("gemma-scope-2-270m-pt-transcoders-ct")     # config.yaml + files
        >>> tset = gl.TranscoderSet.load([f"google/gemma-scope-2-270m-pt/transcoder/layer_{i}_width_16k_l0_small"
        ...                               for i in range(18)])
        """
        if isinstance(path, (list, tuple)):
            return cls([SAE.load(p, dtype=dtype) for p in path], source=[os.fspath(p) for p in path])
        path = _local(path, subfolder, "TranscoderSet.load",
                      "TranscoderSet.load('owner/repo', 'transcoder_all/width_16k_l0_small')")
        cfg, base, cfg_path = _config_at(path, feature_input_hook, feature_output_hook, "TranscoderSet.load")
        if cfg.get("model_kind", "transcoder_set") != "transcoder_set":
            raise ValueError(f"TranscoderSet.load: '{cfg_path}' has model_kind {cfg.get('model_kind')!r}; a "
                             "cross_layer_transcoder loads with gl.CLT.load (or gl.load_transcoders)")
        hook_in, hook_out = _hooks(cfg.get("feature_input_hook"), cfg.get("feature_output_hook"), cfg_path)
        if cfg.get("activation") not in (None, "relu", "jump_relu", "jumprelu"):
            raise ValueError(f"TranscoderSet.load: '{cfg_path}': activation {cfg['activation']!r} is not supported "
                             "(ReLU or JumpReLU, told by the files' thresholds, as circuit-tracer 0.5 reads them)")
        files = _files(cfg, base, cfg_path, "layer_{i}.safetensors")
        model_name = cfg.get("model_name")
        return cls({i: _transcoder_from_file(f, i, hook_in, hook_out, model_name, dtype) for i, f in enumerate(files)},
                   source=path)


def _layer_of(s):
    m = re.match(r"blocks\.(\d+)\.", s.hook_name or "")
    if not m:
        raise ValueError(f"{s!r} does not read a block's site")
    return int(m.group(1))


def _config_at(path, feature_input_hook, feature_output_hook, what):
    """path (a config.yaml or a folder) -> (config dict, the folder, the config's path). A folder without config.yaml
    takes the hooks from the arguments; arguments given beside a config must agree with it."""
    if os.path.isfile(path):
        cfg_path, base = path, os.path.dirname(os.path.abspath(path))
        cfg = _yaml(path)
    elif os.path.isdir(path):
        base, cfg_path = path, os.path.join(path, "config.yaml")
        cfg = _yaml(cfg_path) if os.path.isfile(cfg_path) else {}
    else:
        raise FileNotFoundError(f"{what}: no such file or directory '{path}'")
    for key, given in (("feature_input_hook", feature_input_hook), ("feature_output_hook", feature_output_hook)):
        if given is not None:
            if key in cfg and cfg[key] != given:
                raise ValueError(f"{what}: {key}={given!r} but '{cfg_path}' says {cfg[key]!r}")
            cfg[key] = given
        elif key not in cfg:
            raise ValueError(f"{what}: '{path}' has no config.yaml naming {key}: pass {key}= (circuit-tracer's names: "
                             f"{', '.join(sorted(_CT_INPUT_HOOKS if 'input' in key else _CT_OUTPUT_HOOKS))})")
    return cfg, base, cfg_path


def _files(cfg, base, cfg_path, pattern):
    """The per-layer files: config.yaml's transcoders list (layer i = entry i), else base/pattern numbered from 0."""
    if "transcoders" in cfg:
        entries = cfg["transcoders"]
        if not isinstance(entries, list) or not entries:
            raise _core.CheckpointError(f"'{cfg_path}': transcoders must be a non-empty list of files")
        return [_resolve(e, base, cfg_path) for e in entries]
    files = _numbered(base, pattern)
    if not files:
        raise FileNotFoundError(f"'{base}' has no {pattern.format(i='0')} (and its config has no transcoders: list)")
    return files


# ------------------------------------------------------------------------------------------------ cross-layer


class CLT:
    """A cross-layer transcoder: N encoders, one per layer, each reading that layer's MLP input; the features of layer
    i write to the MLP outputs of layers i..N-1. Output of layer j = sum over i <= j of acts_i @ W_dec_i[:, j - i]
    + b_dec_j (+ x_j @ W_skip_j).

    ``gl.CLT.load(path)`` reads circuit-tracer's CLT folders and Gemma Scope 2's. ``model.saes([clt])`` /
    ``run_with_saes(ids, saes=[clt], use_error_term=...)`` splice it into every layer; its feature hooks are
    ``blocks.L.hook_clt_acts_post``, ``blocks.L.hook_clt_recon`` and ``blocks.L.hook_clt_error``.

    The weights live natively only (layer i's encoder and its decoder to every later layer as one ``_core.SAE`` whose
    decoder is W_dec_i flattened to [d_t, (N - i) * d]): a CLT costs its weights once in ``dtype``, and gradient runs
    use the native VJPs.
    """

    def __init__(self, W_enc, b_enc, W_dec, b_dec, threshold=None, W_skip=None, hook_in="ln2.hook_out",
                 hook_out="hook_mlp_out", architecture=None, model_name=None, dtype="float32", source=None):
        """From arrays, per layer i of N: W_enc[i] [d, d_t], b_enc[i] [d_t], W_dec[i] [d_t, N - i, d] (to layers
        i..N-1), b_dec[i] [d] (layer i's output bias), threshold[i] [d_t] (JumpReLU; None: ReLU), W_skip[i] [d, d]
        (added as x_i @ W_skip[i]; None: no skip). hook_in / hook_out: gemmalens block-hook suffixes it reads and
        writes. architecture: "jumprelu" (Gemma Scope 2: relu(x) * (x > threshold)), "jumprelu_signed"
        (circuit-tracer: x * (x > threshold)) or "relu"; default: jumprelu with thresholds, else relu."""
        N = len(W_enc)
        if architecture is None:
            architecture = "relu" if threshold is None else "jumprelu"
        shape = np.shape(W_enc[0]) if N else (0, 0)
        if len(shape) != 2:
            raise ValueError(f"CLT: W_enc[0] must be [d_model, d_transcoder], got shape {shape}")
        hook_in, hook_out = _hooks(hook_in, hook_out, "CLT")
        self._start(N, *shape, hook_in, hook_out, architecture, model_name, dtype, source, W_skip is not None)
        for i in range(N):
            self._add_layer(i, W_enc[i], b_enc[i], None if threshold is None else threshold[i], W_dec[i], b_dec[i],
                            None if W_skip is None else W_skip[i])

    def _start(self, N, d, dt, hook_in, hook_out, architecture, model_name, dtype, source, skip):
        if N < 1 or d < 1 or dt < 1:
            raise ValueError(f"CLT: needs at least one layer and positive widths, got n_layers={N}, d_model={d}, "
                             f"d_transcoder={dt}")
        if architecture not in ("jumprelu", "jumprelu_signed", "relu"):
            raise ValueError(f"CLT: architecture must be 'jumprelu', 'jumprelu_signed' or 'relu', got {architecture!r}")
        self.n_layers, self.d_model, self.d_transcoder = N, d, dt
        self.hook_in, self.hook_out = hook_in, hook_out
        self.architecture, self.model_name, self.source, self._dtype = architecture, model_name, source, dtype
        self.b_dec = np.zeros((N, d), np.float32)
        self.b_enc = np.zeros((N, dt), np.float32)
        self.threshold = None if architecture == "relu" else np.zeros((N, dt), np.float32)
        self.W_skip = np.zeros((N, d, d), np.float32) if skip else None
        self._layers = [None] * N

    def _add_layer(self, i, W_enc, b_enc, threshold, W_dec, b_dec, W_skip):
        """Layer i's arrays -> its native encoder + decoder (the numpy arrays are not kept: a CLT's weights live once,
        natively; loaders read a layer, add it and drop it)."""
        N, d, dt = self.n_layers, self.d_model, self.d_transcoder
        W_enc, W_dec = np.asarray(W_enc, np.float32), np.asarray(W_dec, np.float32)
        if W_enc.shape != (d, dt) or W_dec.shape != (dt, N - i, d):
            raise ValueError(f"CLT layer {i}: W_enc must be {(d, dt)} and W_dec {(dt, N - i, d)}, got {W_enc.shape} and "
                             f"{W_dec.shape}")
        for name, a, shape in (("b_enc", b_enc, (dt,)), ("b_dec", b_dec, (d,)),
                               ("threshold", threshold, (dt,) if self.threshold is not None else None),
                               ("W_skip", W_skip, (d, d) if self.W_skip is not None else None)):
            if (a is None) != (shape is None) or a is not None and np.shape(a) != shape:
                raise ValueError(f"CLT layer {i}: {name} must be " + (f"{shape}" if shape else "None") +
                                 f", got {None if a is None else np.shape(a)}")
        self.b_enc[i], self.b_dec[i] = b_enc, b_dec
        if threshold is not None:
            self.threshold[i] = threshold
        if W_skip is not None:
            self.W_skip[i] = W_skip
        # Layer i's decoder to layers i..N-1 as one matrix [d_t, (N - i) * d] (one matmul gives every later layer's
        # share); b_dec is added per output layer, not here.
        self._layers[i] = _core.SAE(W_enc, self.b_enc[i], None if threshold is None else self.threshold[i],
                                    np.ascontiguousarray(W_dec.reshape(dt, (N - i) * d)),
                                    np.zeros((N - i) * d, np.float32), None, self.architecture, 0, False, self._dtype)

    def __repr__(self):
        return (f"gemmalens.CLT({self.architecture}, n_layers={self.n_layers}, d_model={self.d_model}, d_transcoder="
                f"{self.d_transcoder}, {self.hook_in} -> {self.hook_out}" + (", skip" if self.W_skip is not None else "")
                + ")")

    # ---- loading ----
    @classmethod
    def load(cls, path, subfolder=None, dtype="float32", feature_input_hook=None, feature_output_hook=None):
        """A cross-layer transcoder -> ``gl.CLT``.

        path: a circuit-tracer CLT folder (``W_enc_{i}.safetensors`` + ``W_dec_{i}.safetensors``, with a
        ``config.yaml`` naming the hooks or ``feature_input_hook`` / ``feature_output_hook`` given: circuit-tracer's
        TransformerLens names), circuit-tracer's ``config.yaml`` (``model_kind: cross_layer_transcoder``; with a
        ``transcoders:`` list it names Gemma Scope 2 CLT files, local or ``hf://``), or a Gemma Scope 2 CLT folder
        (``params_layer_{i}.safetensors``, e.g. gemma-scope-2-270m-pt/clt/width_262k_l0_medium: it reads ln2.hook_out,
        writes hook_mlp_out). A path that is not local is a hub repository id with the folder inside it, after the id or
        as ``subfolder`` (``gl.CLT.load("google/gemma-scope-2-270m-pt", "clt/width_262k_l0_medium")``; circuit-tracer's
        ``"mwhanna/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine"``, whose config.yaml lists hf:// files).
        dtype: "float32" or "bfloat16" (weights' storage).
        """
        path = _local(path, subfolder, "CLT.load", "CLT.load('google/gemma-scope-2-270m-pt', 'clt/width_262k_l0_medium')")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.yaml")):
            gs2 = _numbered(path, "params_layer_{i}.safetensors")
            if gs2:
                return cls._from_gemma_scope_2(gs2, _gs2_hooks(path, feature_input_hook, feature_output_hook), None,
                                               dtype, path)
        cfg, base, cfg_path = _config_at(path, feature_input_hook, feature_output_hook, "CLT.load")
        if cfg.get("model_kind", "cross_layer_transcoder") != "cross_layer_transcoder":
            raise ValueError(f"CLT.load: '{cfg_path}' has model_kind {cfg.get('model_kind')!r}; a transcoder_set "
                             "loads with gl.TranscoderSet.load (or gl.load_transcoders)")
        hooks = _hooks(cfg.get("feature_input_hook"), cfg.get("feature_output_hook"), cfg_path)
        if "transcoders" in cfg:  # circuit-tracer reads these as Gemma Scope 2 CLT files (its gemma-scope-2 configs)
            return cls._from_gemma_scope_2(_files(cfg, base, cfg_path, ""), hooks, cfg.get("model_name"), dtype, path)
        return cls._from_circuit_tracer(base, hooks, cfg.get("model_name"), dtype, path)

    @classmethod
    def _from_circuit_tracer(cls, folder, hooks, model_name, dtype, source):
        enc = _numbered(folder, "W_enc_{i}.safetensors")
        if not enc:
            raise FileNotFoundError(f"CLT.load: '{folder}' has no W_enc_0.safetensors (circuit-tracer's CLT layout) nor "
                                    "params_layer_0.safetensors (Gemma Scope 2's)")
        N = len(enc)
        clt = cls.__new__(cls)
        for i, f in enumerate(enc):  # one layer's files at a time: read, made native, dropped
            t = _read(f)
            known = [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"]
            _need(t, f, known[:3])
            _no_extra(t, f, known)
            W = t[f"W_enc_{i}"]
            if W.ndim != 2:
                raise _core.CheckpointError(f"'{f}': W_enc_{i} must be [d_transcoder, d_model], got {W.shape}")
            if i == 0:
                # circuit-tracer's JumpReLU (thresholds present) is x * (x > threshold), no ReLU
                arch = "jumprelu_signed" if "threshold_0" in t else "relu"
                clt._start(N, W.shape[1], W.shape[0], hooks[0], hooks[1], arch, model_name, dtype, source, False)
            if (f"threshold_{i}" in t) != (clt.threshold is not None):
                raise _core.CheckpointError(f"'{folder}': some layers have thresholds (JumpReLU) and some do not")
            dt, d = clt.d_transcoder, clt.d_model
            for n, shape in ((f"W_enc_{i}", (dt, d)), (f"b_enc_{i}", (dt,)), (f"b_dec_{i}", (d,)), (f"threshold_{i}", (dt,))):
                if n in t:
                    _shape(t, f, n, shape)
            fd = os.path.join(folder, f"W_dec_{i}.safetensors")
            td = _read(fd)
            _need(td, fd, [f"W_dec_{i}"])
            _no_extra(td, fd, [f"W_dec_{i}"])
            _shape(td, fd, f"W_dec_{i}", (dt, N - i, d))
            clt._add_layer(i, W.T, t[f"b_enc_{i}"], t.get(f"threshold_{i}"), td[f"W_dec_{i}"], t[f"b_dec_{i}"], None)
            del t, td, W
        return clt

    @classmethod
    def _from_gemma_scope_2(cls, files, hooks, model_name, dtype, source):
        N = len(files)
        clt = cls.__new__(cls)
        for i, f in enumerate(files):  # one layer file at a time: read, made native, dropped
            t = _read(f)
            known = ["w_enc", "w_dec", "b_enc", "b_dec", "threshold", "affine_skip_connection"]
            if "W_enc" in t:
                raise _core.CheckpointError(f"'{f}' is a circuit-tracer per-layer transcoder file, not a Gemma Scope 2 "
                                            "CLT layer: load it with gl.TranscoderSet.load")
            _need(t, f, known[:5])
            _no_extra(t, f, known)
            if t["w_enc"].ndim != 2 or t["w_dec"].ndim != 3:
                raise _core.CheckpointError(f"'{f}': a Gemma Scope 2 CLT layer has w_enc [d, d_t] and w_dec "
                                            f"[d_t, n_layers, d], got {t['w_enc'].shape} and {t['w_dec'].shape}")
            d, dt = t["w_enc"].shape
            if i == 0:
                clt._start(N, d, dt, hooks[0], hooks[1], "jumprelu", model_name, dtype, source,
                           "affine_skip_connection" in t)
            elif ("affine_skip_connection" in t) != (clt.W_skip is not None):
                raise _core.CheckpointError(f"'{f}': some layers have an affine_skip_connection and some do not")
            if t["w_dec"].shape[1] != N:
                raise _core.CheckpointError(f"'{f}': w_dec {t['w_dec'].shape} decodes to {t['w_dec'].shape[1]} layers "
                                            f"but there are {N} layer files")
            d, dt = clt.d_model, clt.d_transcoder
            for n, shape in (("w_enc", (d, dt)), ("w_dec", (dt, N, d)), ("b_enc", (dt,)), ("b_dec", (d,)),
                             ("threshold", (dt,)), ("affine_skip_connection", (d, d))):
                if n in t:
                    _shape(t, f, n, shape)
            # Rows i.. of w_dec: layer i's features write to its own output and the later layers' (rows < i unused).
            clt._add_layer(i, t["w_enc"], t["b_enc"], t["threshold"], t["w_dec"][:, i:, :], t["b_dec"],
                           t.get("affine_skip_connection"))
            del t
        return clt

    # ---- weights (read back from the native copies) ----
    def W_enc(self, layer):
        """Layer ``layer``'s encoder [d, d_t] (float32; bf16 storage widened)."""
        return self._layers[self._layer(layer)].weights()[0]

    def W_dec(self, layer):
        """Layer ``layer``'s decoder to layers layer..N-1: [d_t, N - layer, d] (W_dec(i)[f, j - i] is feature f's
        direction in layer j's MLP output)."""
        i = self._layer(layer)
        return self._layers[i].weights()[1].reshape(self.d_transcoder, self.n_layers - i, self.d_model)

    def __reduce__(self):
        """Pickled as its arrays (read back from the native copies) and settings: CLTs travel to Ray actors."""
        N = self.n_layers
        return (type(self), ([self.W_enc(i) for i in range(N)], self.b_enc, [self.W_dec(i) for i in range(N)],
                             self.b_dec, self.threshold, self.W_skip, self.hook_in, self.hook_out, self.architecture,
                             self.model_name, self._dtype, self.source))

    def _identity(self):
        """What tells this CLT from another (gl.harvest's resume check): its settings and a hash of every weight."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.b_enc, self.b_dec, self.threshold, self.W_skip):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        for layer in self._layers:
            for w in layer.weights():
                h.update(w.tobytes())
        return {"clt": True, "hook_in": self.hook_in, "hook_out": self.hook_out, "n_layers": self.n_layers,
                "d_transcoder": self.d_transcoder, "architecture": self.architecture, "sha256": h.hexdigest()}

    # ---- computation (native) ----
    def _x(self, x, width, what, stacked=True):
        x = np.asarray(x, dtype=np.float32)
        if stacked and (x.ndim < 2 or x.shape[0] != self.n_layers) or x.shape[-1] != width:
            want = f"[n_layers = {self.n_layers}, ..., {width}]" if stacked else f"[..., {width}]"
            raise ValueError(f"CLT.{what}: expected {want}, got shape {x.shape}")
        return x

    def encode_layer(self, x, layer):
        """x [..., d] (layer ``layer``'s MLP input) -> that layer's features [..., d_t]."""
        x = self._x(x, self.d_model, "encode_layer", stacked=False)
        return self._layers[self._layer(layer)].encode(x.reshape(-1, self.d_model)).reshape(*x.shape[:-1], self.d_transcoder)

    def encode(self, x):
        """x [n_layers, ..., d] (every layer's MLP input) -> features [n_layers, ..., d_t]."""
        x = self._x(x, self.d_model, "encode")
        return np.stack([self.encode_layer(x[i], i) for i in range(self.n_layers)])

    def decode(self, acts, x=None):
        """features [n_layers, ..., d_t] -> every layer's MLP output [n_layers, ..., d]: layer j's is the sum over
        i <= j of layer i's decoder to j, plus b_dec[j] (plus x[j] @ W_skip[j]: a CLT with skip needs x)."""
        acts = self._x(acts, self.d_transcoder, "decode")
        lead = acts.shape[1:-1]
        if self.W_skip is not None:
            if x is None:
                raise ValueError("CLT.decode: this CLT has skip connections and needs the inputs x [n_layers, ..., d]")
            x = self._x(x, self.d_model, "decode")
        out = np.zeros((self.n_layers, int(np.prod(lead, dtype=np.int64)), self.d_model), np.float32)
        for i in range(self.n_layers):
            self._accumulate(out, i, acts[i].reshape(-1, self.d_transcoder))
        out += self.b_dec[:, None, :]
        if self.W_skip is not None:
            for j in range(self.n_layers):
                out[j] += x[j].reshape(-1, self.d_model) @ self.W_skip[j]
        return out.reshape(self.n_layers, *lead, self.d_model)

    def __call__(self, x):
        """The reconstruction of every layer's MLP output: decode(encode(x), x)."""
        return self.decode(self.encode(x), x)

    def _accumulate(self, out, i, acts):
        """out[j] += layer i's decoder contribution to layer j, for j = i..N-1 (acts [M, d_t], out [N, M, d])."""
        c = self._layers[i].decode(np.ascontiguousarray(acts, np.float32))  # [M, (N - i) * d]
        out[i:] += c.reshape(c.shape[0], self.n_layers - i, self.d_model).transpose(1, 0, 2)

    def _layer(self, layer):
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")
        return int(layer)

    # ---- splicing ----
    def hook_names(self):
        """The feature hooks of a splice: per layer, blocks.L.hook_clt_acts_post / _recon / _error."""
        return [f"blocks.{i}.{s}" for i in range(self.n_layers) for s in CLT_SUFFIXES]

    def anchors(self):
        """Each feature hook -> the model hook it follows in forward order (features after the input site, the
        reconstruction and the error after the output site)."""
        out = {}
        for i in range(self.n_layers):
            out[f"blocks.{i}.hook_clt_acts_post"] = f"blocks.{i}.{self.hook_in}"
            out[f"blocks.{i}.hook_clt_recon"] = out[f"blocks.{i}.hook_clt_error"] = f"blocks.{i}.{self.hook_out}"
        return out

    def _splice(self, use_error_term, sae_hooks, captures, captured, grad):
        """The forward hooks of this CLT in one forward call (sae.splice_hooks's contract: sae_hooks {feature hook:
        [fn]}, captures {names to record into captured}, grad a SpliceGrad in gradient runs).

        At layer i's input site its features are encoded, edited by their hooks, and decoded at once to layers
        i..N-1 into per-layer accumulators; at layer i's output site the MLP output is replaced by its accumulator
        + b_dec (+ skip) and, with the error term, the MLP output minus the reconstruction from the unedited
        features (clean).

        Gradients follow SAELens's convention, as the SAE splices do (sae.splice_hooks): the error term is a
        constant, so the gradient leaves the output site only through the reconstruction: at each output site j it is
        kept (after the hooks on hook_clt_recon / _error); at input site i, which the reverse pass reaches after
        every later output site, layer i's features get the sum over j >= i of those through decoder i -> j, their
        activation function passes it where they are on, and the encoder (and the skip) carry it to the input."""
        N, d, dt = self.n_layers, self.d_model, self.d_transcoder
        trios = [(f"blocks.{i}.hook_clt_acts_post", f"blocks.{i}.hook_clt_recon", f"blocks.{i}.hook_clt_error")
                 for i in range(N)]
        edits = {n: [_Edit(fn, n, i) if grad is not None else fn for fn in sae_hooks.get(n, [])]
                 for i, trio in enumerate(trios) for n in trio}
        acts_edited = any(edits[a] for a, _, _ in trios)
        st = {"skip": {}, "on": {}, "g": {}}

        def apply(n, arr, layer):
            for fn in edits[n]:
                arr = fn(arr) if grad is not None else _apply_py(fn, arr, n, layer)
            return arr

        def make(i):
            an, rn, en = trios[i]
            enc = self._layers[i]

            def read(a, hook):
                lead = a.shape[:2]
                x = np.ascontiguousarray(a.reshape(-1, d), dtype=np.float32)
                if i == 0:  # a forward starts: the accumulators of every layer's reconstruction [N, M, d]
                    st["recon"] = np.zeros((N, x.shape[0], d), np.float32)
                    st["clean"] = np.zeros_like(st["recon"]) if use_error_term and acts_edited else None
                acts = enc.encode(x)  # [M, d_t]
                if grad is not None:
                    st["on"][i] = acts != 0  # where each feature passes its gradient
                a3 = acts.reshape(*lead, dt)
                if edits[an]:
                    a3 = apply(an, a3.copy(), i)  # hooks may edit in place; the error term needs the unedited features
                if an in captures:
                    captured[an] = np.array(a3, copy=True)
                self._accumulate(st["recon"], i, np.asarray(a3, np.float32).reshape(-1, dt))
                if st["clean"] is not None:
                    self._accumulate(st["clean"], i, acts)
                if self.W_skip is not None:
                    st["skip"][i] = x @ self.W_skip[i]
                return None  # reads only

            def write(a, hook):
                lead = a.shape[:2]
                base = st["recon"][i] + self.b_dec[i]
                skip = st["skip"].pop(i) if self.W_skip is not None else 0.0
                base += skip
                if use_error_term:
                    clean = (st["clean"][i] + self.b_dec[i] + skip if st["clean"] is not None
                             else base.copy() if edits[rn] else base)
                recon = apply(rn, base.reshape(*lead, d), i)
                if rn in captures:
                    captured[rn] = np.array(recon, copy=True)
                if use_error_term:
                    err = apply(en, a.reshape(*lead, d) - clean.reshape(*lead, d), i)
                    if en in captures:
                        captured[en] = np.array(err, copy=True)
                    recon = recon + err
                return np.asarray(recon, np.float32).reshape(a.shape)

            if grad is not None:
                def write_vjp(g, a, hook):
                    g3 = g.reshape(*g.shape[:2], d).astype(np.float32)
                    if use_error_term:
                        grad.back_through(g3, en, i, edits[en])  # the error term is a constant: it stops here
                    gr = grad.back_through(g3, rn, i, edits[rn])
                    st["g"][i] = np.ascontiguousarray(np.asarray(gr, np.float32).reshape(-1, d))
                    return np.zeros_like(g)  # the output does not depend on the MLP's own output

                def inject(g):
                    missing = [j for j in range(i, N) if j not in st["g"]]
                    if missing:
                        raise RuntimeError(f"CLT: the gradient reached layer {i}'s input before layer {missing[0]}'s "
                                           "output (a gemmalens bug)")
                    lead = g.shape[:2]
                    ga = enc.decode_vjp(np.concatenate([st["g"][j] for j in range(i, N)], axis=1))  # [M, d_t]
                    ga = grad.back_through(ga.reshape(*lead, dt), an, i, edits[an])
                    gpre = np.ascontiguousarray(np.asarray(ga, np.float32).reshape(-1, dt) * st["on"].pop(i))
                    gx = enc.encode_vjp(gpre)
                    if self.W_skip is not None:
                        gx += st["g"][i] @ self.W_skip[i].T
                    return g + gx.reshape(g.shape)

                read.vjp = lambda g, a, hook: None  # read only looks at the site
                read.inject, write.vjp = inject, write_vjp
            return [(f"blocks.{i}.{self.hook_in}", read), (f"blocks.{i}.{self.hook_out}", write)]

        return [h for i in range(N) for h in make(i)]

    def check_model(self, model):
        cfg = model.config
        if self.n_layers != cfg.num_hidden_layers:
            raise ValueError(f"CLT spans {self.n_layers} layers but the model has {cfg.num_hidden_layers}")
        if self.d_model != cfg.hidden_size:
            raise ValueError(f"CLT d_model = {self.d_model} does not match the model's hidden_size {cfg.hidden_size}")
        if self.model_name:
            size = _SIZES.get(cfg.hidden_size)
            m = re.search(r"(270m|1b|4b|12b|27b)", str(self.model_name).lower())
            if size and m and m.group(1) != size:
                raise ValueError(f"CLT was made for {self.model_name!r} ({m.group(1)}) but the model is Gemma 3 {size}")
        model._hook_table.resolve(f"blocks.0.{self.hook_in}")
        model._hook_table.resolve(f"blocks.0.{self.hook_out}")


def _gs2_hooks(folder, feature_input_hook, feature_output_hook):
    """A Gemma Scope 2 CLT folder's sites: its config.json's hf_hook_point_in / _out when they name a layer site,
    else pre_feedforward_layernorm's output -> post_feedforward_layernorm's (how SAELens's Gemma 3 loader and
    circuit-tracer's Gemma Scope 2 configs read these CLTs); circuit-tracer names given as arguments win."""
    hook_in, hook_out = "ln2.hook_out", "hook_mlp_out"
    cfg_path = os.path.join(folder, "config.json")
    if os.path.isfile(cfg_path):
        cfg = SAE._config(cfg_path)
        arch = str(cfg.get("architecture", "jump_relu")).lower().replace("_", "")
        if arch != "jumprelu":
            raise ValueError(f"'{cfg_path}': architecture {cfg.get('architecture')!r}: Gemma Scope 2 CLTs are JumpReLU")
        for key in ("hf_hook_point_in", "hf_hook_point_out"):
            point = cfg.get(key)
            if isinstance(point, str) and re.fullmatch(r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.\d+\..+", point):
                site = _hf_point_to_tl(point)[0].split(".", 2)[2]
                if key == "hf_hook_point_in":
                    hook_in = site
                else:
                    hook_out = site
    if feature_input_hook is not None or feature_output_hook is not None:
        ct_in, ct_out = _hooks(feature_input_hook or "mlp.hook_in", feature_output_hook or "hook_mlp_out", folder)
        hook_in, hook_out = ct_in, ct_out
    if hook_in not in _CT_INPUT_HOOKS.values() or hook_out not in _CT_OUTPUT_HOOKS.values():
        raise ValueError(f"'{folder}': a CLT reading {hook_in} and writing {hook_out} is not supported (it must read the "
                         "MLP's input and write its output)")
    return hook_in, hook_out


def load_transcoders(path, subfolder=None, dtype="float32", feature_input_hook=None, feature_output_hook=None):
    """circuit-tracer's ``load_transcoders``: a ``config.yaml`` (or its folder) -> ``gl.TranscoderSet`` for
    ``model_kind: transcoder_set``, ``gl.CLT`` for ``cross_layer_transcoder``; a folder of circuit-tracer's CLT files
    or of Gemma Scope 2's ``params_layer_{i}.safetensors`` -> ``gl.CLT``; of ``layer_{i}.safetensors`` ->
    ``gl.TranscoderSet``. Local, or a hub repository id with the folder (circuit-tracer's references:
    ``gl.load_transcoders("mwhanna/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine")``)."""
    path = _local(path, subfolder, "load_transcoders", "load_transcoders('owner/repo', 'clt/width_262k_l0_medium')")
    cfg_path = path if os.path.isfile(path) else os.path.join(path, "config.yaml")
    kind = _yaml(cfg_path).get("model_kind") if os.path.isfile(cfg_path) else None
    if kind is None and os.path.isdir(path):
        if _numbered(path, "W_enc_{i}.safetensors") or _numbered(path, "params_layer_{i}.safetensors"):
            kind = "cross_layer_transcoder"
        elif _numbered(path, "layer_{i}.safetensors"):
            kind = "transcoder_set"
    if kind == "transcoder_set":
        return TranscoderSet.load(path, dtype=dtype, feature_input_hook=feature_input_hook,
                                  feature_output_hook=feature_output_hook)
    if kind == "cross_layer_transcoder":
        return CLT.load(path, dtype=dtype, feature_input_hook=feature_input_hook, feature_output_hook=feature_output_hook)
    raise ValueError(f"load_transcoders: '{path}' is neither a circuit-tracer config (model_kind transcoder_set or "
                     f"cross_layer_transcoder; got {kind!r}) nor a folder of transcoder files")
