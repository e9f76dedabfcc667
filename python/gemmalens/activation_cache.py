"""ActivationCache: the activations of one run_with_cache call, read as in TransformerLens, with its residual-stream
helpers (accumulated_resid, decompose_resid, stack_activation, apply_ln_to_stack) over numpy arrays."""
from collections.abc import Mapping

import numpy as np

# TransformerLens's sublayer names (utils.get_act_name's layer_type) -> the part of a gemmalens hook name before hook_*
_SUBLAYERS = {"a": "attn", "attn": "attn", "attention": "attn", "m": "mlp", "mlp": "mlp", "b": "", "block": "",
              "blocks": ""}


def _index(sl, what):
    """A TransformerLens Slice input -> a numpy index for one axis: None (everything), an int (the axis is dropped),
    a tuple ((stop,), (start, stop) or (start, stop, step)), a slice, or a list / array of indices."""
    if sl is None:
        return slice(None)
    if isinstance(sl, slice):
        return sl
    if isinstance(sl, tuple):
        return slice(*sl)
    if isinstance(sl, (int, np.integer)) and not isinstance(sl, bool):
        return int(sl)
    idx = np.asarray(sl)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{what} must be None, an int, a tuple, a slice or a 1-D list of indices, got {sl!r}")
    return idx


class ActivationCache(Mapping):
    """name -> np.ndarray (float32), in forward order. The arrays own their buffers (no second copy).

    ``cache["blocks.3.hook_resid_post"]``, ``cache["resid_post", 3]``, ``cache["pattern", 5]``, ``cache["embed"]``,
    ``cache["normalized", 3, "ln1"]``; negative layers count from the end (``cache["resid_post", -1]``), as in
    TransformerLens. ``model`` is the Model that made it (the residual-stream helpers read its config).

    TransformerLens's residual-stream helpers, with its signatures: ``accumulated_resid`` (the stream before each
    block: logit lens), ``decompose_resid`` (the embedding and each attention / MLP output), ``stack_activation``
    and ``apply_ln_to_stack`` (the norms' RMS scales, computed from the cached norm inputs).

    After ``run_with_cache(..., incl_bwd=True, metric=...)`` it also holds ``name + "_grad"`` (the metric's gradient
    at that site, TransformerLens's key for backward captures) and ``metric_value``.
    """

    metric_value = None  # the metric of a gradient run (NaN when it was given as a dMetric/dLogits array)

    def __init__(self, arrays, table, model=None):
        self._arrays = arrays
        self._table = table
        self.model = model

    def _key(self, key):
        from .hooks import act_name  # (hooks imports this module)

        if isinstance(key, tuple):
            if len(key) not in (2, 3):
                raise KeyError(f"cache keys are names or (family, layer[, sublayer]) tuples, got {key!r}")
            fam, layer, sub = key if len(key) == 3 else (*key, None)
            if layer is not None:
                layer = int(layer)
                if -self._table.n_layers <= layer < 0:
                    layer += self._table.n_layers
            if isinstance(fam, str) and (fam, layer) not in self._table.by_family:
                # TransformerLens's key -> name (utils.get_act_name): ("scale", 3, "ln1"), ("normalized", None), ...
                tl = act_name(fam, layer, sub)
                if tl in self._table.ids:
                    return tl
            name = self._table.by_family.get((fam, layer))
            if name is None:
                raise KeyError(f"no hook {fam!r} at layer {layer}")
            if sub is not None:
                parts = name.split(".")[2:-1] if layer is not None else []
                if _SUBLAYERS.get(sub, sub) != (parts[0] if parts else ""):
                    raise KeyError(f"hook {fam!r} at layer {layer} is {name!r}, not in sublayer {sub!r}")
            return name
        if key not in self._arrays and isinstance(key, str):
            if (key, None) in self._table.by_family:
                return self._table.by_family[(key, None)]
            tl = act_name(key)  # TransformerLens: cache["normalized"] -> ln_final.hook_normalized
            if tl in self._table.ids:
                return tl
        return key

    def __getitem__(self, key):
        name = self._key(key)
        if name not in self._arrays:
            if name in self._table.ids:
                raise KeyError(f"{name!r} was not captured (see names_filter / stop_at_layer)")
            try:
                self._table.resolve(name)
            except ValueError as e:
                raise KeyError(str(e)) from None
        return self._arrays[name]

    def __contains__(self, key):
        try:
            return self._key(key) in self._arrays
        except KeyError:
            return False

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self):
        return len(self._arrays)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._arrays.values())

    def __repr__(self):
        return f"ActivationCache({len(self)} activations, {self.nbytes / 2**20:.1f} MiB)"

    # ---- the residual stream, as TransformerLens's ActivationCache reads it ----
    #
    # Gemma 3 has no LayerNorm centring and no position embedding: its norms are RMSNorms, x / sqrt(mean(x^2) + eps)
    # times (1 + w). TransformerLens divides by the `hook_scale` of a norm: so does this cache when it holds that
    # site, else it computes the same scale from the cached input of that norm: ln1 of block l reads
    # blocks.l.hook_resid_pre, ln2 blocks.l.hook_resid_mid, ln_final the last block's hook_resid_post.

    def _layer(self, layer, what):
        """TransformerLens's layer argument: None and -1 mean n_layers (the input of the unembedding)."""
        L = self._table.n_layers
        if layer is None:
            return L
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -1 <= layer <= L:
            raise ValueError(f"{what}: layer must be an int in [0, {L}], or -1 / None for {L} (the input of the "
                             f"unembedding), got {layer!r}")
        return L if layer == -1 else int(layer)

    def _need(self, name, what):
        if name not in self._arrays:
            raise KeyError(f"{what} needs {name!r}, which this cache does not hold: capture it (run_with_cache's "
                           "names_filter, stop_at_layer)")
        return self._arrays[name]

    def _eps(self, what):
        if self.model is None:
            raise ValueError(f"{what}: this ActivationCache was made without its model, whose rms_norm_eps (and, for "
                             "ln_final, weight) it needs; use the cache that model.run_with_cache returns")
        return float(self.model.config.rms_norm_eps)

    def _ln_scale(self, layer, mlp_input, eps, what):
        """The RMS scale [batch, pos, 1] of the norm that reads the residual stream at `layer` (ln1, or ln2 with
        mlp_input; ln_final at n_layers): its cached hook_scale, else sqrt(mean(x^2) + eps) of its cached input, as
        the norm computes it."""
        L = self._table.n_layers
        if layer == L:
            name, norm = f"blocks.{L - 1}.hook_resid_post", "ln_final"
        else:
            name, norm = f"blocks.{layer}.hook_{'resid_mid' if mlp_input else 'resid_pre'}", \
                f"blocks.{layer}.ln{2 if mlp_input else 1}"
        if norm + ".hook_scale" in self._arrays:
            return self._arrays[norm + ".hook_scale"]
        x = self._need(name, f"{what} (the RMS scale of {norm}: its hook_scale, or computed from its input)")
        return np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True) + eps).astype(np.float32)

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None,
                          has_batch_dim=True, recompute_ln=False):
        """Scale a stack of residual-stream pieces [n, batch, pos, d_model] (from accumulated_resid or
        decompose_resid) as the norm reading the stream at `layer` scales the whole stream: divided by that norm's
        RMS at each batch row and position (ln1; ln2 with mlp_input; ln_final for layer n_layers, -1 or None), so
        the pieces add up to the norm's input over its scale. No weight is applied and nothing is centred (RMSNorm).

        pos_slice / batch_slice: the positions / batch rows the stack already holds (TransformerLens Slice inputs:
        None, an int, a tuple, a slice or a list of indices); they select the matching scales, and batch_slice is
        applied to the stack's batch axis too when has_batch_dim (whether the stack has one). recompute_ln=True with
        the final layer instead runs ln_final on every piece on its own: x / sqrt(mean(x^2) + eps) * (1 + w), its
        own RMS and ln_final's weight, as the model does (on the last residual this gives
        cache["ln_final.hook_out"]). TransformerLens gives the same on
        a model whose weights it has not processed (a TransformerBridge without enable_compatibility_mode()); after
        fold_ln its (1 + w) sits in W_U instead. The scale's input must be in the cache; ln_final's weight is read
        from the model (once). Returns np.float32 of the stack's shape (less what an int slice drops).
        """
        what = "apply_ln_to_stack"
        layer = self._layer(layer, what)
        eps = self._eps(what)
        stack = np.asarray(residual_stack, dtype=np.float32)
        D = self.model.config.hidden_size
        if stack.ndim < (3 if has_batch_dim else 2) or stack.shape[-1] != D:
            raise ValueError(f"{what}: the stack must be [n, {'batch, ' if has_batch_dim else ''}..., d_model={D}], "
                             f"got shape {stack.shape}")
        b = _index(batch_slice, "batch_slice")
        if has_batch_dim:
            stack = stack[:, b]
        if recompute_ln and layer == self._table.n_layers:
            gain = self.model._ln_final_gain()  # (1 + w) [d_model]
            ms = np.mean(np.square(stack, dtype=np.float64), axis=-1, keepdims=True)
            return (stack / np.sqrt(ms + eps) * gain).astype(np.float32)
        scale = self._ln_scale(layer, mlp_input, eps, what)[..., _index(pos_slice, "pos_slice"), :][b]
        try:
            return stack / scale
        except ValueError:
            raise ValueError(f"{what}: a stack of shape {stack.shape} does not line up with the scales of shape "
                             f"{scale.shape[:-1] + (D,)} (batch and positions after batch_slice / pos_slice)") from None

    def accumulated_resid(self, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False,
                          return_labels=False):
        """The residual stream as it stands before each block, stacked: np.float32 [n, batch, pos, d_model] (as in
        TransformerLens) -- resid_pre of blocks 0..layer-1 ("0_pre", ...), then resid_pre of block `layer`, or for
        layer = n_layers (the default; also -1 / None) the last block's resid_post ("final_post").

        incl_mid: also resid_mid after each earlier block's attention ("l_mid"). mlp_input: also block `layer`'s
        resid_mid (the input of its MLP). pos_slice: keep these positions (TransformerLens Slice input; an int drops
        the axis). apply_ln: for layer < n_layers, divide by the RMS scale of the norm reading the stream there
        (ln1, or ln2 with mlp_input); for n_layers, run ln_final (its weight included) on every entry on its own --
        see apply_ln_to_stack. return_labels: also return the labels.

        >>> _, cache = model.run_with_cache(ids)
        >>> lens = model.unembed(cache.accumulated_resid()[:, 0, -1])   # logit lens: [n_layers + 1, vocab]
        """
        layer = self._layer(layer, "accumulated_resid")
        L = self._table.n_layers
        parts, labels = [], []
        for l in range(layer + 1):
            if l == L:
                parts.append(self["resid_post", L - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        p = _index(pos_slice, "pos_slice")
        stack = np.stack([a[..., p, :] for a in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == L)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None,
                        incl_embeds=True, return_labels=False):
        """The residual stream before block `layer` (default n_layers: the input of the final norm) as the stack of
        what wrote it: np.float32 [n, batch, pos, d_model] that sums to it -- hook_embed ("embed"; Gemma scales it
        by sqrt(d_model) and has no position embedding), then each earlier block's hook_attn_out ("l_attn_out") and
        hook_mlp_out ("l_mlp_out"), both already through their post-norms.

        mode: "all", "attn" or "mlp" (only those outputs). mlp_input: also block `layer`'s attention output (the
        MLP's input). incl_embeds: include the embedding. pos_slice, return_labels: as in accumulated_resid.
        apply_ln: divide by the RMS scale of the norm reading the stream at `layer` (apply_ln_to_stack; for
        n_layers ln_final's scale, without its weight).
        """
        layer = self._layer(layer, "decompose_resid")
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"decompose_resid: mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        if mlp_input and layer == self._table.n_layers:
            raise ValueError(f"decompose_resid: mlp_input needs a block's MLP input; layer {layer} is the unembedding")
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["embed"])
            labels.append("embed")
        for l in range(layer):
            for kind in ("attn", "mlp"):
                if mode in ("all", kind):
                    parts.append(self[f"{kind}_out", l])
                    labels.append(f"{l}_{kind}_out")
        if mlp_input and mode != "mlp":
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        if not parts:
            raise ValueError(f"decompose_resid: nothing to stack at layer {layer} with mode={mode!r}, "
                             f"incl_embeds={incl_embeds}, mlp_input={mlp_input}")
        p = _index(pos_slice, "pos_slice")
        stack = np.stack([a[..., p, :] for a in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name, layer=-1, sublayer_type=None):
        """cache[activation_name, l] for every block l before `layer` (default -1 / None: all of them), stacked on a
        new first axis: e.g. stack_activation("pattern") -> [n_layers, batch, head, query, key]. activation_name is a
        family ("resid_post", "z", "ln1", ...); sublayer_type as in TransformerLens (("normalized", "ln2"))."""
        layer = self._layer(layer, "stack_activation")
        if layer == 0:
            raise ValueError("stack_activation: layer 0 stacks nothing (the blocks before it); give 1..n_layers")
        return np.stack([self[activation_name, l, sublayer_type] for l in range(layer)])
