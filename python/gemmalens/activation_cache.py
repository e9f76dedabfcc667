"""ActivationCache: the activations of one run_with_cache call, read as in TransformerLens."""
from collections.abc import Mapping


class ActivationCache(Mapping):
    """name -> np.ndarray (float32), in forward order. The arrays own their buffers (no second copy).

    ``cache["blocks.3.hook_resid_post"]``, ``cache["resid_post", 3]``, ``cache["pattern", 5]``, ``cache["embed"]``;
    negative layers count from the end (``cache["resid_post", -1]``), as in TransformerLens.
    """

    def __init__(self, arrays, table):
        self._arrays = arrays
        self._table = table

    def _key(self, key):
        if isinstance(key, tuple):
            fam, layer = key
            if layer is not None:
                layer = int(layer)
                if -self._table.n_layers <= layer < 0:
                    layer += self._table.n_layers
            name = self._table.by_family.get((fam, layer))
            if name is None:
                raise KeyError(f"no hook {fam!r} at layer {layer}")
            return name
        if key not in self._arrays and (key, None) in self._table.by_family:
            return self._table.by_family[(key, None)]
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
