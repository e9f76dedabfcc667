"""Sparse autoencoders and transcoders: Gemma Scope 2 and SAELens folders, native encode/decode, splicing into
the forward pass (with or without the error term), feature hooks (SAELens names)."""
import json
import os
import re

import numpy as np

from . import _core
from .hooks import HookPoint, _GradHook, _wrap_callable
from .interventions import Intervention

_SIZES = {640: "270m", 1152: "1b", 2560: "4b", 3840: "12b", 5376: "27b"}
_SUFFIXES = ("hook_sae_acts_post", "hook_sae_recon", "hook_sae_error")


def _hf_point_to_tl(point):
    """Gemma Scope 2 hf_hook_point -> (TransformerLens hook name, flatten heads)."""
    m = re.fullmatch(r"(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)(?:\.(.+))?", point or "")
    if not m:
        raise ValueError(f"SAE hook point {point!r} is not a Gemma 3 layer site (model.layers.L....)")
    layer, rest = int(m.group(1)), m.group(2) or "output"  # model.layers.L: the layer's output
    # An HF norm module's output is the norm's weighted output: TransformerLens's hook_out (its hook_normalized is
    # before the weight). Gemma Scope 2 transcoders read pre_feedforward_layernorm.output = ln2.hook_out.
    table = {
        "output": ("hook_resid_post", False),
        "self_attn.o_proj.input": ("attn.hook_z", True),
        "post_feedforward_layernorm.output": ("hook_mlp_out", False),
        "pre_feedforward_layernorm.output": ("ln2.hook_out", False),
        "pre_feedforward_layernorm.input": ("hook_resid_mid", False),
        "post_attention_layernorm.output": ("hook_attn_out", False),
        "input_layernorm.output": ("ln1.hook_out", False),
        "input_layernorm.input": ("hook_resid_pre", False),
        "mlp.down_proj.input": ("mlp.hook_post", False),
        "mlp.input": ("ln2.hook_out", False),
    }
    if rest not in table:
        raise ValueError(f"SAE hook point {point!r}: site '{rest}' has no gemmalens hook")
    name, flat = table[rest]
    return f"blocks.{layer}.{name}", flat


_SAE_FILES = ["params.safetensors", "config.json", "cfg.json", "sae_weights.safetensors"]


def _from_hub(path, subfolder, files=_SAE_FILES, what="SAE.load",
              example="SAE.load('owner/repo', 'resid_post/layer_6_width_16k_l0_medium')"):
    """'owner/repo' + subfolder, or 'owner/repo/sub/folder' -> the folder's local copy in the HF cache (only its
    ``files``, glob patterns; gl.TranscoderSet / gl.CLT.load pass their own)."""
    parts = [p for p in path.replace(os.sep, "/").split("/") if p]
    if len(parts) < 2 or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what}: no such directory '{path}'")
    repo = "/".join(parts[:2])
    sub = "/".join(parts[2:] + ([subfolder.strip("/")] if subfolder else []))
    if not sub:
        raise FileNotFoundError(f"{what}: '{path}' is not a local folder; as a hub repository id it needs the "
                                f"folder inside it: {example}")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{what}: '{path}' is not a local folder; to read '{sub}' of the hub repository "
                                f"'{repo}' install huggingface_hub: pip install 'gemmalens[hub]' (or download the folder "
                                "and pass its path)") from None
    try:
        root = huggingface_hub.snapshot_download(repo, allow_patterns=[f"{sub}/{f}" for f in files])
    except Exception as e:  # huggingface_hub's own errors: not found, gated, offline without a cached copy, network
        raise FileNotFoundError(
            f"{what}: '{sub}' of the hub repository '{repo}' could not be fetched ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); check the id and folder; offline "
            "(HF_HUB_OFFLINE=1) only the HF cache is read") from None
    local = os.path.join(root, sub)
    if not os.path.isdir(local):
        raise FileNotFoundError(f"{what}: the hub repository '{repo}' has no folder '{sub}' with "
                                f"{'SAE files' if what == 'SAE.load' else 'transcoder files'} ({', '.join(files)})")
    return local


class SAE:
    """A JumpReLU / ReLU / TopK SAE or (affine) transcoder. ``gl.SAE.load(path)`` reads Gemma Scope 2 and SAELens
    folders. hook_name is where it reads (TransformerLens name), hook_name_out where it writes. architecture:
    "jumprelu" (relu(pre) * (pre > threshold)), "relu", "topk", or "jumprelu_signed" (circuit-tracer's JumpReLU,
    pre * (pre > threshold), for its transcoder files: gl.TranscoderSet)."""

    def __init__(self, W_enc, b_enc, W_dec, b_dec, threshold=None, W_skip=None, architecture="jumprelu", k=0,
                 apply_b_dec_to_input=False, hook_name=None, hook_name_out=None, model_name=None, dtype="float32",
                 cfg=None):
        self.W_enc = np.ascontiguousarray(W_enc, np.float32)
        self.W_dec = np.ascontiguousarray(W_dec, np.float32)
        self.b_enc = np.ascontiguousarray(b_enc, np.float32).reshape(-1)
        self.b_dec = np.ascontiguousarray(b_dec, np.float32).reshape(-1)
        self.threshold = None if threshold is None else np.ascontiguousarray(threshold, np.float32).reshape(-1)
        self.W_skip = None if W_skip is None else np.ascontiguousarray(W_skip, np.float32)
        self.architecture, self.k = architecture, int(k or 0)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.hook_name = hook_name
        self.hook_name_out = hook_name_out or hook_name
        self.model_name = model_name
        self.cfg = cfg or {}
        self.d_in, self.d_sae = self.W_enc.shape
        self.d_out = self.W_dec.shape[1]
        self._dtype = dtype
        self._core = _core.SAE(self.W_enc, self.b_enc, self.threshold, self.W_dec, self.b_dec, self.W_skip,
                               self.architecture, self.k, self.apply_b_dec_to_input, dtype)

    def __reduce__(self):
        """Pickled as its arrays and settings (the native half is rebuilt): SAEs travel to Ray actors."""
        return (type(self), (self.W_enc, self.b_enc, self.W_dec, self.b_dec, self.threshold, self.W_skip,
                             self.architecture, self.k, self.apply_b_dec_to_input, self.hook_name, self.hook_name_out,
                             self.model_name, self._dtype, self.cfg))

    @property
    def is_transcoder(self):
        return self.hook_name_out != self.hook_name

    def __repr__(self):
        kind = "transcoder" if self.is_transcoder else "SAE"
        return (f"gemmalens.SAE({kind}, {self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"hook={self.hook_name!r}" + (f" -> {self.hook_name_out!r}" if self.is_transcoder else "") + ")")

    # ---- loading ----
    @classmethod
    def load(cls, path, subfolder=None, dtype="float32"):
        """An SAE or transcoder from a folder, local or in a Hugging Face hub repository -> ``gl.SAE``.

        path: a Gemma Scope 2 folder (``params.safetensors`` + ``config.json``, as in google/gemma-scope-2-*: its
        ``hf_hook_point_in`` / ``_out`` name HF modules, mapped to hook names: ``model.layers.L.output`` ->
        ``blocks.L.hook_resid_post``, ``pre_feedforward_layernorm.output`` -> ``blocks.L.ln2.hook_out``, ...) or a
        SAELens folder (``cfg.json`` + ``sae_weights.safetensors``: jumprelu, standard / relu, topk, and the
        (jumprelu_)(skip_)transcoder architectures; ``hook_name`` read with TransformerLens's meaning, except that an
        ``hf_hook_name`` in the cfg, which names the HF module the data was recorded at, wins).
        A path that is not a local folder is taken as a hub repository id with the folder inside it, either as
        ``subfolder`` (``gl.SAE.load("google/gemma-scope-2-270m-pt", "resid_post/layer_6_width_16k_l0_medium")``) or
        after the id (``"google/gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_medium"``): only that folder is
        fetched into the HF cache by huggingface_hub (gemmalens[hub]); offline (HF_HUB_OFFLINE=1) the cache is read.
        dtype: "float32" or "bfloat16" (the encoder / decoder weights' storage; computation is float32).

        The result's ``hook_name`` is where it reads, ``hook_name_out`` where it writes (a transcoder's differs);
        ``model.run_with_saes(ids, saes=[sae])`` or ``with model.saes([sae]):`` splice it in. Errors: a folder of
        neither kind, an unsupported architecture or normalisation, a config whose fields disagree with the tensors
        (ValueError; ``gl.CheckpointError`` for malformed files).

        >>> sae = gl.SAE.load("gemma-scope-2-270m-pt/resid_post/layer_6_width_16k_l0_medium")
        >>> sae.hook_name
        'blocks.6.hook_resid_post'
        """
        path = os.fspath(path)
        if subfolder is not None and not isinstance(subfolder, (str, os.PathLike)):
            raise TypeError(f"SAE.load: subfolder must be a folder name inside the repository, got {subfolder!r} "
                            "(dtype is a keyword argument: SAE.load(path, dtype='bfloat16'))")
        if os.path.isdir(path):
            if subfolder is not None:
                path = os.path.join(path, os.fspath(subfolder))
        else:
            path = _from_hub(path, None if subfolder is None else os.fspath(subfolder))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"SAE.load: no such directory '{path}'")
        if os.path.isfile(os.path.join(path, "params.safetensors")) and os.path.isfile(os.path.join(path, "config.json")):
            loader = cls._load_gemma_scope
        elif os.path.isfile(os.path.join(path, "cfg.json")) and os.path.isfile(os.path.join(path, "sae_weights.safetensors")):
            loader = cls._load_saelens
        else:
            loader = None
        if loader is not None:
            try:
                return loader(path, dtype)
            except (TypeError, AttributeError, KeyError, IndexError, OverflowError) as e:
                # Interpreting a downloaded config: a field of the wrong JSON type (a list where a dict belongs, ...).
                raise _core.CheckpointError(f"SAE.load: '{path}': its config has a field of the wrong type or shape "
                                            f"({type(e).__name__}: {e})") from None
        raise ValueError(f"SAE.load: '{path}' is neither a Gemma Scope 2 folder (params.safetensors + config.json) nor a "
                         "SAELens folder (cfg.json + sae_weights.safetensors)")

    @staticmethod
    def _tensors(path, names, required):
        t = _core.read_safetensors(path)
        for n in required:
            if n not in t:
                raise ValueError(f"SAE file '{path}' lacks tensor '{n}' (has: {', '.join(sorted(t))})")
        for n, want in (("w_enc", 2), ("W_enc", 2), ("w_dec", 2), ("W_dec", 2)):
            if n in t and t[n].ndim != want:
                raise _core.CheckpointError(f"SAE file '{path}': tensor '{n}' has shape {t[n].shape}, expected 2-D")
        return {n: t.get(n) for n in names}

    @staticmethod
    def _config(path):
        """A JSON object from a config file, or CheckpointError naming the file."""
        try:
            with open(path, "rb") as f:
                cfg = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise _core.CheckpointError(f"SAE config '{path}' is not valid UTF-8 JSON ({type(e).__name__}: {e})") from None
        if not isinstance(cfg, dict):
            raise _core.CheckpointError(f"SAE config '{path}' must hold a JSON object, got {type(cfg).__name__}")
        return cfg

    @classmethod
    def _load_gemma_scope(cls, path, dtype):
        cfg = cls._config(os.path.join(path, "config.json"))
        t = cls._tensors(os.path.join(path, "params.safetensors"),
                         ["w_enc", "b_enc", "threshold", "w_dec", "b_dec", "affine_skip_connection"],
                         ["w_enc", "b_enc", "w_dec", "b_dec"])
        arch = str(cfg.get("architecture", "jump_relu")).lower().replace("_", "")
        arch = {"jumprelu": "jumprelu", "relu": "relu", "standard": "relu", "topk": "topk"}.get(arch)
        if arch is None:
            raise ValueError(f"SAE config architecture {cfg.get('architecture')!r} is not supported")
        hook_in, flat = _hf_point_to_tl(cfg.get("hf_hook_point_in"))
        hook_out, _ = _hf_point_to_tl(cfg.get("hf_hook_point_out", cfg.get("hf_hook_point_in")))
        sae = cls(t["w_enc"], t["b_enc"], t["w_dec"], t["b_dec"], threshold=t["threshold"],
                  W_skip=t["affine_skip_connection"], architecture=arch, k=cfg.get("k", 0), apply_b_dec_to_input=False,
                  hook_name=hook_in, hook_name_out=hook_out, model_name=cfg.get("model_name"), dtype=dtype, cfg=cfg)
        sae._flatten = flat
        return sae

    # SAELens architectures -> (gemmalens architecture, is a transcoder)
    _SAELENS_ARCH = {"jumprelu": ("jumprelu", False), "standard": ("relu", False), "relu": ("relu", False),
                     "topk": ("topk", False), "transcoder": ("relu", True), "skip_transcoder": ("relu", True),
                     "jumprelu_transcoder": ("jumprelu", True), "jumprelu_skip_transcoder": ("jumprelu", True)}

    @classmethod
    def _load_saelens(cls, path, dtype):
        """A SAELens folder. Where its cfg names the HF module the activations were recorded at (``hf_hook_name``,
        ``hf_hook_name_out``: SAELens writes them for Gemma Scope 2), that site is read, as the data was trained on
        it; else ``hook_name`` / ``hook_name_out`` with TransformerLens's meaning (``ln2.hook_normalized`` is before
        ln2's weight). SAELens names Gemma Scope 2 transcoders' input ``hook_mlp_in`` -- in TransformerLens the MLP
        branch's input before ln2 -- while they were trained on pre_feedforward_layernorm's output (ln2.hook_out)."""
        cfg = cls._config(os.path.join(path, "cfg.json"))
        meta = cfg.get("metadata") or {}
        if not isinstance(meta, dict):
            raise _core.CheckpointError(f"SAELens cfg '{path}': metadata must be a JSON object")

        def field(key, default=None):
            v = cfg.get(key)
            return meta.get(key, default) if v is None else v

        t = cls._tensors(os.path.join(path, "sae_weights.safetensors"),
                         ["W_enc", "b_enc", "threshold", "W_dec", "b_dec", "W_skip"], ["W_enc", "b_enc", "W_dec", "b_dec"])
        arch_name = str(cfg.get("architecture", "standard")).lower()
        if arch_name not in cls._SAELENS_ARCH:
            raise ValueError(f"SAELens architecture {cfg.get('architecture')!r} is not supported (supported: "
                             f"{', '.join(sorted(cls._SAELENS_ARCH))})")
        arch, transcoder = cls._SAELENS_ARCH[arch_name]
        norm = cfg.get("normalize_activations", "none") or "none"
        if norm != "none":
            raise ValueError(f"SAELens normalize_activations={norm!r} is not supported (only 'none')")
        for key in ("d_in", "d_sae"):
            if key in cfg:
                want = t["W_enc"].shape[0 if key == "d_in" else 1]
                if int(cfg[key]) != want:
                    raise ValueError(f"SAELens cfg {key}={cfg[key]} but W_enc has shape {tuple(t['W_enc'].shape)}")
        hook, hook_out = field("hook_name"), field("hook_name_out")
        flat = bool(hook) and hook.endswith("attn.hook_z")
        hf_in, hf_out = field("hf_hook_name"), field("hf_hook_name_out")
        if hf_in:  # the site the data was recorded at wins over the TransformerLens name
            hook, flat = _hf_point_to_tl(hf_in)
            if hf_out:
                hook_out = _hf_point_to_tl(hf_out)[0]
        if not hook:
            raise ValueError("SAELens cfg.json has no hook_name")
        head = field("hook_head_index")
        if head is not None:
            raise ValueError(f"SAELens cfg hook_head_index={head}: an SAE on one attention head is not supported")
        if hook.endswith(".hook_mlp_in"):
            raise ValueError(f"SAELens cfg hook_name {hook!r}: in TransformerLens hook_mlp_in is the MLP branch's input "
                             "before ln2 (= hook_resid_mid), but SAELens gives this name to Gemma Scope 2 transcoders, "
                             "trained on ln2's output (ln2.hook_out), and this cfg has no hf_hook_name to tell which: set "
                             "hook_name to 'blocks.L.ln2.hook_out' (the Gemma Scope 2 data) or 'blocks.L.hook_resid_mid'")
        if transcoder and not hook_out:
            raise ValueError(f"SAELens architecture {arch_name!r} is a transcoder but cfg.json has no hook_name_out")
        W_skip = t["W_skip"]
        if W_skip is not None:
            if not transcoder:
                raise ValueError(f"SAELens architecture {arch_name!r} has no skip connection, but the file holds W_skip")
            W_skip = np.asarray(W_skip).T  # SAELens: x @ W_skip.T, W_skip [d_out, d_in]; gemmalens: x @ W_skip
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k", 0)
        W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens TopKSAE: encode multiplies the pre-activations by ||W_dec[f]|| before the top-k, decode divides
            # the activations by it. Folded in: encoder columns and bias scaled, decoder rows normalised (the same
            # activations and reconstructions).
            n = np.linalg.norm(W_dec.astype(np.float64), axis=1)
            n = np.where(n > 0, n, 1.0)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        sae = cls(W_enc, b_enc, W_dec, t["b_dec"], threshold=t["threshold"], W_skip=W_skip, architecture=arch, k=k,
                  apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", False), hook_name=hook,
                  hook_name_out=hook_out if transcoder else None, model_name=field("model_name"), dtype=dtype, cfg=cfg)
        sae._flatten = flat
        return sae

    # ---- computation (native) ----
    def _2d(self, x, width, what):
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != width:
            raise ValueError(f"SAE.{what}: the last axis must be {width}, got shape {x.shape}")
        return x.reshape(-1, width), x.shape[:-1]

    def encode(self, x):
        """x [..., d_in] -> feature activations [..., d_sae]."""
        x2, lead = self._2d(x, self.d_in, "encode")
        return self._core.encode(x2).reshape(*lead, self.d_sae)

    def decode(self, acts, x=None):
        """acts [..., d_sae] -> [..., d_out] (transcoders with a skip connection also need their input x)."""
        a2, lead = self._2d(acts, self.d_sae, "decode")
        x2 = None if x is None else self._2d(x, self.d_in, "decode")[0]
        return self._core.decode(a2, x2).reshape(*lead, self.d_out)

    def __call__(self, x):
        """Reconstruction decode(encode(x))."""
        x2, lead = self._2d(x, self.d_in, "forward")
        return self._core.decode(self._core.encode(x2), x2 if self.W_skip is not None else None).reshape(*lead, self.d_out)

    def encode_topk(self, x, k):
        """The k most active features per position, without a dense [tokens, d_sae] array:
        (indices int32 [..., k], values [..., k]), by descending activation."""
        x2, lead = self._2d(x, self.d_in, "encode_topk")
        idx, val = self._core.encode_topk(x2, int(k))
        return idx.reshape(*lead, k), val.reshape(*lead, k)

    # ---- checks against a model ----
    def check_model(self, model):
        cfg = model.config
        model._hook_table.resolve(self.hook_name)
        model._hook_table.resolve(self.hook_name_out)
        width = {"attn.hook_z": cfg.num_attention_heads * cfg.head_dim, "mlp.hook_post": cfg.intermediate_size}
        site = self.hook_name.split(".", 2)[2]
        want = width.get(site, cfg.hidden_size)
        if self.model_name:
            size = _SIZES.get(cfg.hidden_size)
            m = re.search(r"(270m|1b|4b|12b|27b)", str(self.model_name).lower())
            if size and m and m.group(1) != size:
                raise ValueError(f"SAE was made for {self.model_name!r} ({m.group(1)}) but the model is Gemma 3 {size}")
        if self.d_in != want:
            raise ValueError(f"SAE d_in = {self.d_in} does not match {self.hook_name} of this model (width {want})")


def _as_list(fns):
    return fns if isinstance(fns, (list, tuple)) else [fns]


def _apply_py(fn, arr, name, layer):
    """A hook on an SAE tensor: a Python callable or an intervention, applied in numpy."""
    if isinstance(fn, Intervention):
        return fn.apply_numpy(arr)
    return _wrap_callable(fn, HookPoint(name, layer))(arr)


class _Edit:
    """A hook on an SAE tensor in a gradient run: applied as _apply_py, with its VJP (an intervention's own, or a
    Python hook's as for any forward hook: hooks._GradHook)."""

    def __init__(self, fn, name, layer):
        self.fn = fn
        self.py = None if isinstance(fn, Intervention) else _GradHook(fn, HookPoint(name, layer))

    def __call__(self, arr):
        return self.fn.apply_numpy(arr) if self.py is None else self.py(arr)

    def vjp(self, g):
        if self.py is None:
            return self.fn.vjp_numpy(g)
        out = self.py.vjp(np.ascontiguousarray(g, dtype=np.float32))
        return g if out is None else out


class SpliceGrad:
    """What a gradient run asks of the spliced SAEs: backward hooks on their tensors ({name: [fn]}), the names whose
    gradient to capture, and ``grads`` ({name + "_grad": array}), filled as the reverse pass reaches them."""

    def __init__(self, bwd_hooks=None, captures=()):
        self.bwd_hooks = bwd_hooks or {}
        self.captures = set(captures)
        self.grads = {}

    def arrive(self, g, name, layer):
        """The gradient reaching SAE tensor `name`: its backward hooks (which may edit it), then its capture."""
        for fn in self.bwd_hooks.get(name, []):
            g = _apply_py(fn, g, name, layer)
        if name in self.captures:
            self.grads[name + "_grad"] = np.array(g, dtype=np.float32, copy=True)
        return g

    def back_through(self, g, name, layer, edits):
        """arrive(), then back through the forward edits made at `name` (the last one first): the gradient at the
        tensor's value before those edits."""
        g = self.arrive(g, name, layer)
        for e in reversed(edits):
            g = e.vjp(g)
        return g


def splice_hooks(model, saes, use_error_term, sae_hooks, captures, captured=None, grad=None):
    """Python callbacks implementing the SAEs at their sites.

    sae_hooks: {sae hook name: [fn, ...]}; captures: set of sae hook names to record into `captured` (a new dict
    unless one is given), filled while the forward runs. grad: a SpliceGrad in a gradient run -- each callback then
    also has a ``vjp`` (see hooks.with_vjp) that the reverse pass calls. Returns (fwd_hooks, captured dict).

    Gradients follow SAELens (``SAE.forward`` with ``use_error_term``; Marks et al. 2024, "Sparse Feature Circuits",
    A.3): the error term is a constant of the forward, so the gradient reaches the site's input through the SAE's
    features alone, with or without the error term; ``hook_sae_error_grad`` is the gradient the error node receives.
    A feature's gradient passes its activation function where the feature is on (JumpReLU's threshold, ReLU, TopK's
    choice count as fixed)."""
    captured = {} if captured is None else captured
    fwd = []
    for sae in saes:
        sae.check_model(model)
        if hasattr(sae, "_splice"):  # a cross-layer transcoder (transcoders.CLT) splices itself
            fwd += sae._splice(use_error_term, sae_hooks, captures, captured, grad)
            continue
        base = sae.hook_name
        layer = int(base.split(".")[1])
        stash = {}
        name, rname, ename = (f"{base}.hook_sae_acts_post", f"{base}.hook_sae_recon", f"{base}.hook_sae_error")
        edits = {n: [_Edit(fn, n, layer) if grad is not None else fn for fn in sae_hooks.get(n, [])]
                 for n in (name, rname, ename)}

        def apply(n, arr, edits=edits, layer=layer):
            for fn in edits[n]:
                arr = fn(arr) if grad is not None else _apply_py(fn, arr, n, layer)
            return arr

        def run(x_in, x_out, sae=sae, name=name, rname=rname, ename=ename, stash=stash, edits=edits, apply=apply):
            lead = x_in.shape[:2]
            xi = x_in.reshape(lead[0] * lead[1], -1)
            acts = sae._core.encode(xi)
            acts_orig = acts
            if grad is not None:
                stash["on"] = acts_orig != 0  # where each feature passes its gradient
            a3 = acts.reshape(*lead, sae.d_sae)
            if edits[name]:
                a3 = a3.copy()  # hooks may edit in place; the error term needs the unedited features
            a3 = apply(name, a3)
            if name in captures:
                captured[name] = np.array(a3, copy=True)
            acts = np.ascontiguousarray(a3.reshape(-1, sae.d_sae), dtype=np.float32)
            skip_in = xi if sae.W_skip is not None else None
            recon = sae._core.decode(acts, skip_in).reshape(*lead, sae.d_out)
            recon = apply(rname, recon)
            if rname in captures:
                captured[rname] = np.array(recon, copy=True)
            if use_error_term:
                edited = bool(edits[name]) or bool(edits[rname])
                clean = sae._core.decode(acts_orig, skip_in).reshape(*lead, sae.d_out) if edited else recon
                err = x_out.reshape(*lead, sae.d_out) - clean
                err = apply(ename, err)
                if ename in captures:
                    captured[ename] = np.array(err, copy=True)
                recon = recon + err
            return recon.reshape(x_out.shape).astype(np.float32)

        def run_vjp(g_out, sae=sae, name=name, rname=rname, ename=ename, stash=stash, edits=edits, layer=layer):
            """The gradient at the SAE's output -> (at its input x_in, at x_out: zero, the output does not depend on
            it). Python arithmetic in float64 on [tokens, width] arrays."""
            lead = g_out.shape[:2]
            g = g_out.reshape(*lead, sae.d_out).astype(np.float32)
            if use_error_term:
                grad.back_through(g, ename, layer, edits[ename])  # the error term is a constant: it stops here
            g = grad.back_through(g, rname, layer, edits[rname])
            g2 = g.reshape(-1, sae.d_out).astype(np.float64)
            ga = (g2 @ sae.W_dec.T.astype(np.float64)).reshape(*lead, sae.d_sae)
            ga = grad.back_through(ga, name, layer, edits[name])
            gpre = np.asarray(ga, dtype=np.float64).reshape(-1, sae.d_sae) * stash.pop("on")
            gx = gpre @ sae.W_enc.T.astype(np.float64)
            if sae.W_skip is not None:
                gx += g2 @ sae.W_skip.T.astype(np.float64)
            return gx.astype(np.float32)

        if not sae.is_transcoder:
            def same(a, hook, run=run):
                return run(a, a)

            if grad is not None:
                same.vjp = lambda g, a, hook, run_vjp=run_vjp: run_vjp(g).reshape(a.shape)
            fwd.append((base, same))
        else:
            def keep(a, hook, stash=stash):
                stash["x"] = a.copy()

            def replace(a, hook, run=run, stash=stash):
                return run(stash.pop("x"), a)

            if grad is not None:
                def keep_inject(g, stash=stash):  # the transcoder's share joins the gradient at its input site
                    return g + stash.pop("gx").reshape(g.shape)

                def replace_vjp(g, a, hook, run_vjp=run_vjp, stash=stash):
                    stash["gx"] = run_vjp(g)
                    return np.zeros_like(g)

                keep.vjp = lambda g, a, hook: None  # keep only reads the site
                keep.inject, replace.vjp = keep_inject, replace_vjp
            fwd.append((sae.hook_name, keep))
            fwd.append((sae.hook_name_out, replace))
    return fwd, captured


def sae_hook_anchors(saes):
    """The hooks of spliced SAEs / transcoders -> the model hook each follows in forward order: an SAE's
    {hook_name}.hook_sae_* follow the site it reads; a CLT says for its own (transcoders.CLT.anchors)."""
    out = {}
    for s in saes:
        out.update(s.anchors() if hasattr(s, "anchors") else {f"{s.hook_name}.{suf}": s.hook_name for suf in _SUFFIXES})
    return out


def sae_hook_names(saes):
    return list(sae_hook_anchors(saes))


class Splice:
    """The SAEs spliced into one forward call, ``[(SAE, use_error_term)]`` from ``model.saes(...)`` /
    ``run_with_saes``: the names of their hooks, the routing of the call's hooks and captures aimed at them, and
    the SAE tensors captured while the forward runs (``captured``). With no SAEs it routes nothing."""

    def __init__(self, model, active):
        self.model = model
        self.active = list(active)
        self.anchors = sae_hook_anchors([s for s, _ in self.active])
        self.names = list(self.anchors)  # {hook_name}.hook_sae_* (and a CLT's blocks.L.hook_clt_*), in splice order
        self.captured = {}
        self.grad = None  # a SpliceGrad in gradient runs (gl.grad)

    def select(self, names_filter):
        """run_with_cache's names_filter -> the model's hook names it selects, then the SAE hooks it selects."""
        table = self.model._hook_table
        if not self.active:
            return table.select(names_filter)
        if names_filter is not None and not callable(names_filter):
            wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            ours = set(self.names)
            return table.select([n for n in wanted if n not in ours]) + [n for n in wanted if n in ours]
        return table.select(names_filter) + [n for n in self.names if names_filter is None or names_filter(n)]

    def route(self, pairs, captures):
        """(target, fn) pairs and capture names -> those for the native HookSet: hooks and captures on SAE tensors
        are taken over by the SAEs' callbacks (a filter also keeps its model hooks), which are added."""
        if not self.active:
            return pairs, list(captures)
        ours = set(self.names)
        native, sae_hooks = self.split_hooks(pairs)
        sae_captures = {n for n in captures if n in ours}
        for use_error_term in (False, True):
            group = [s for s, e in self.active if e == use_error_term]
            if group:
                native += splice_hooks(self.model, group, use_error_term, sae_hooks, sae_captures, self.captured,
                                       self.grad)[0]
        return native, [n for n in captures if n not in ours]

    def split_hooks(self, pairs):
        """(target, fn) pairs -> (those for the native HookSet, {SAE tensor name: [fn]}): a name of an SAE tensor goes
        to the SAEs, a filter to both. route() splits forward hooks with it; gradient runs split bwd_hooks."""
        ours, native, sae_bwd = set(self.names), [], {}
        for target, fn in pairs:
            if isinstance(target, str) and target in ours:
                sae_bwd.setdefault(target, []).extend(_as_list(fn))
                continue
            if callable(target) and not isinstance(target, str):
                for n in self.names:
                    if target(n):
                        sae_bwd.setdefault(n, []).extend(_as_list(fn))
            native.append((target, fn))
        return native, sae_bwd

    def ordered(self, arrays):
        """{name: array} -> the same in forward order, each SAE's tensors right after the site it reads (a CLT's
        reconstruction and error after the site it writes)."""
        after = {}
        for m, site in self.anchors.items():
            after.setdefault(site, []).append(m)
        order = []
        for n in self.model._hook_table.names:
            order.append(n)
            order += after.get(n, [])
        return {n: arrays[n] for n in order if n in arrays}
