"""Type stubs for gemmalens._core, the pybind11 native module (private: use the gemmalens package).

Generated with pybind11-stubgen 3.0.0 and tools/gen_core_stub.py (run it after changing csrc/bindings/);
tests/test_stubs.py checks that every public name of the module has an entry here and the reverse, and the
parameters of each function.
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import os
import types
import typing
_testing: types.ModuleType  # kernels for the tests and bench/run.py (not API)
__all__: list[str] = ['CheckpointError', 'GGUFFile', 'Gemma3Config', 'GradTape', 'HookSet', 'KVCache', 'LoadProgress', 'Model', 'SAE', 'available_memory_bytes', 'cross_entropy_grad', 'dnnl_version', 'dtype_name', 'hook_names', 'hook_sites', 'load_arrays', 'load_gguf', 'load_hf', 'max_threads', 'planned_weight_bytes', 'read_safetensors']
class CheckpointError(ValueError):
    pass
class Gemma3Config:
    """
    Gemma 3 text config with HF field names.
    """
    __hash__: typing.ClassVar[None] = None
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    rope_scaling: dict[str, typing.Any] | None
    @staticmethod
    def default_layer_types(num_hidden_layers: typing.SupportsInt | typing.SupportsIndex, pattern: typing.SupportsInt | typing.SupportsIndex = 6) -> list[str]:
        ...
    @staticmethod
    def from_dict(d: dict[str, typing.Any]) -> Gemma3Config:
        """
        A config from a dict of HF config.json fields (added by gemmalens.config).
        """
    @staticmethod
    def from_json(text: str) -> Gemma3Config:
        ...
    @staticmethod
    def from_pretrained(path: str | os.PathLike[str]) -> Gemma3Config:
        """
        Read an HF ``config.json`` (a file, or a directory holding one).
        """
    @staticmethod
    def preset(size: str) -> Gemma3Config:
        ...
    def __eq__(self, other: object) -> bool:
        ...
    def __init__(self) -> None:
        ...
    def __repr__(self) -> str:
        ...
    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """
        Write config.json into directory (added by gemmalens.config).
        """
    def to_dict(self) -> dict[str, typing.Any]:
        """
        The HF config.json fields (added by gemmalens.config).
        """
    def to_json(self) -> str:
        ...
    def validate(self) -> None:
        ...
    @property
    def bos_token_id(self) -> int:
        ...
    @bos_token_id.setter
    def bos_token_id(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def eos_token_id(self) -> list[int]:
        ...
    @eos_token_id.setter
    def eos_token_id(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> None:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @head_dim.setter
    def head_dim(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def hidden_size(self) -> int:
        ...
    @hidden_size.setter
    def hidden_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def intermediate_size(self) -> int:
        ...
    @intermediate_size.setter
    def intermediate_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def layer_types(self) -> list[str]:
        ...
    @layer_types.setter
    def layer_types(self, arg0: collections.abc.Sequence[str]) -> None:
        ...
    @property
    def max_position_embeddings(self) -> int:
        ...
    @max_position_embeddings.setter
    def max_position_embeddings(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_attention_heads(self) -> int:
        ...
    @num_attention_heads.setter
    def num_attention_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_hidden_layers(self) -> int:
        ...
    @num_hidden_layers.setter
    def num_hidden_layers(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_key_value_heads(self) -> int:
        ...
    @num_key_value_heads.setter
    def num_key_value_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def pad_token_id(self) -> int:
        ...
    @pad_token_id.setter
    def pad_token_id(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def query_pre_attn_scalar(self) -> float:
        ...
    @query_pre_attn_scalar.setter
    def query_pre_attn_scalar(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def rms_norm_eps(self) -> float:
        ...
    @rms_norm_eps.setter
    def rms_norm_eps(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def rope_local_base_freq(self) -> float:
        ...
    @rope_local_base_freq.setter
    def rope_local_base_freq(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def rope_scaling_factor(self) -> float:
        ...
    @rope_scaling_factor.setter
    def rope_scaling_factor(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def rope_theta(self) -> float:
        ...
    @rope_theta.setter
    def rope_theta(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def sliding_window(self) -> int:
        ...
    @sliding_window.setter
    def sliding_window(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def vocab_size(self) -> int:
        ...
    @vocab_size.setter
    def vocab_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class HookSet:
    def __init__(self, n_layers: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def add_ablate_features(self, site: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex, enc: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b_enc: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], threshold: typing.Any, dec: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b_dec: typing.Any, positions: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], rows: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> None:
        ...
    def add_callback(self, arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.Any) -> None:
        ...
    def add_capture(self, arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def add_intervention(self, site: typing.SupportsInt | typing.SupportsIndex, layer: typing.SupportsInt | typing.SupportsIndex, kind: str, values: typing.Any = None, positions: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], scale: typing.SupportsFloat | typing.SupportsIndex = 1.0, heads: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], mean: bool = False, rows: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = []) -> None:
        ...
    def clear(self) -> None:
        ...
    def take_captures(self) -> list:
        ...
    @property
    def empty(self) -> bool:
        ...
class KVCache:
    """
    A preallocated key/value cache for incremental decoding (model.new_cache(batch, max_seq_len)). Sliding-window layers keep their last sliding_window positions in ring buffers, full-attention layers max_seq_len; its dtype follows the model's, or is int8 (new_cache(kv_dtype='int8')). forward / next_token_logits / generate append to it (positions continue from seq_len); it is refused by a model of another geometry.
    
    >>> cache = model.new_cache(batch=1)
    >>> model.forward(ids, cache=cache)                   # prefill
    >>> step = model.next_token_logits([818], cache=cache)  # one decode step
    """
    def __init__(self, config: Gemma3Config, batch: typing.SupportsInt | typing.SupportsIndex, max_seq_len: typing.SupportsInt | typing.SupportsIndex, dtype: str = 'float32', kv_dtype: typing.Any = None) -> None:
        """
        Usually made by Model.new_cache(); standalone for sizing.
        """
    def copy(self) -> KVCache:
        """
        An independent copy (its own buffers: a full copy's memory), e.g. to branch from one prefill.
        """
    def place_row(self, row: typing.SupportsInt | typing.SupportsIndex, src: KVCache, src_row: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        """
        Copy row src_row of src (another cache of this model) into row `row`, its sequence ending at this seq_len.
        """
    def row_valid(self, row: typing.SupportsInt | typing.SupportsIndex) -> bool:
        """
        Whether the row holds every slot of its sequence (False once a pass with cache_rows left it out).
        """
    def shift(self, d: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Move every valid row's slots by d (row_start and seq_len with them).
        """
    def truncate(self, n: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Forget every position from n on (seq_len becomes n): back up to a shared prefix and decode again. A ValueError where a sliding-window ring no longer holds the window before n (copy() the cache there instead).
        """
    @property
    def batch(self) -> int:
        """
        Rows it was made for.
        """
    @property
    def dtype(self) -> str:
        """
        The model's dtype (float32 or bfloat16), which passes over it compute in.
        """
    @property
    def kv_dtype(self) -> str:
        """
        How it holds keys and values: the model's dtype, or int8 (blocks of 32 with a scale each).
        """
    @property
    def max_seq_len(self) -> int:
        """
        The most positions it can hold.
        """
    @property
    def nbytes(self) -> int:
        """
        Bytes of its key/value buffers.
        """
    @property
    def row_start(self) -> list[int]:
        """
        Left-padding count of each row.
        """
    @property
    def seq_len(self) -> int:
        """
        Positions held so far (the next token's position).
        """
class GradTape:
    """
    What a forward keeps for a reverse pass (forward(..., tape=)). keep_bytes: the most memory the blocks' intermediates may take for the reverse pass to use them rather than recompute them.
    """
    def __init__(self, keep_bytes: typing.SupportsInt | typing.SupportsIndex = 2147483648) -> None:
        ...
    @property
    def kept_layers(self) -> int:
        ...
    @property
    def ready(self) -> bool:
        ...
class Model:
    def backward(self, tape: GradTape, dlogits: numpy.ndarray, logits: typing.Any = None, grad_hooks: HookSet | None = None, forward_hooks: HookSet | None = None) -> None:
        """
        The reverse pass of the forward recorded in tape: dlogits float32 [batch, pos, vocab] C-contiguous; the grad_hooks' sites fire with the gradients arriving there; forward_hooks (the forward's) are replayed and their edits' VJPs applied.
        """
    def export_tensors(self, names: typing.Any = None) -> dict:
        ...
    def forward(self, tokens: numpy.ndarray, row_start: typing.Any = None, cache: KVCache | None = None, logits: str = 'all', hooks: HookSet | None = None, stop_at_layer: typing.SupportsInt | typing.SupportsIndex = -1, allow_longer: bool = False, tape: GradTape | None = None, cache_rows: typing.Any = None) -> typing.Any:
        """
        tokens: int32 [batch, pos] C-contiguous; row_start: int32 [batch] left-padding counts or None; tape: keep what backward() needs; cache_rows: int32 [batch], the cache row of each row (some of the cache's rows), or None.
        """
    def new_cache(self, batch: typing.SupportsInt | typing.SupportsIndex, max_seq_len: typing.SupportsInt | typing.SupportsIndex, kv_dtype: typing.Any = None) -> KVCache:
        ...
    def unembed(self, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
        ...
    @property
    def config(self) -> Gemma3Config:
        ...
    @property
    def dtype(self) -> str:
        ...
    @property
    def prefill_chunk(self) -> int:
        ...
    @prefill_chunk.setter
    def prefill_chunk(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def threads(self) -> int:
        ...
    @threads.setter
    def threads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def weight_nbytes(self) -> int:
        ...
    @property
    def weights(self) -> str:
        ...
class GGUFFile:
    """
    A parsed, memory-mapped GGUF file.
    """
    def __init__(self, path: str) -> None:
        ...
    def config(self) -> Gemma3Config:
        ...
    def dequantize(self, name: str) -> numpy.typing.NDArray[numpy.float32]:
        """
        Dequantise one tensor to float32 with its row-major shape (ne reversed).
        """
    def get(self, key: str, default: typing.Any = None, max_len: typing.SupportsInt | typing.SupportsIndex = -1) -> typing.Any:
        """
        One metadata value (arrays as lists); max_len >= 0 refuses longer arrays before converting them.
        """
    @property
    def metadata(self) -> dict:
        ...
    @property
    def tensors(self) -> list:
        ...
    @property
    def version(self) -> int:
        ...
class LoadProgress:
    """
    Weights' elements handed to the model so far (done) of all (total).
    """
    def __init__(self) -> None:
        ...
    @property
    def done(self) -> int:
        ...
    @property
    def total(self) -> int:
        ...
class SAE:
    def __init__(self, W_enc: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b_enc: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], threshold: typing.Any, W_dec: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], b_dec: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], W_skip: typing.Any, architecture: str, k: typing.SupportsInt | typing.SupportsIndex, apply_b_dec_to_input: bool, dtype: str) -> None:
        ...
    def decode(self, acts: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], x: typing.Any = None) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def decode_vjp(self, g: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
        """
        The decoder's VJP: g [n, d_out] -> g W_dec^T [n, d_sae].
        """
    def encode(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def encode_topk(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def encode_vjp(self, g: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> numpy.typing.NDArray[numpy.float32]:
        """
        The encoder's VJP at the pre-activations: g [n, d_sae] -> g W_enc^T [n, d_in].
        """
    def weights(self) -> tuple:
        """
        (W_enc [d_in, d_sae], W_dec [d_sae, d_out]) as stored, in float32.
        """
def available_memory_bytes() -> int:
    """
    Memory this process may still take: MemAvailable, or the cgroup v2 limit's headroom when lower (0: unknown).
    """
def cpu_info() -> dict:
    """
    The CPU class gemmalens runs (after GEMMALENS_MAX_ISA), what the CPU has, and the path each op family takes.
    """
def cross_entropy_grad(logits: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], targets: typing.Annotated[numpy.typing.ArrayLike, numpy.int64], weights: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], with_grad: bool = True) -> tuple[float, typing.Any]:
    """
    (sum_m w_m CE(logits_m, target_m), its gradient [M, V] or None): the next-token loss's native kernel.
    """
def dnnl_version() -> str:
    ...
def dtype_name(dtype: str) -> str:
    """
    The canonical name of a dtype= value (the one alias table, common.h's parse_dtype); ValueError otherwise.
    """
def hook_names(n_layers: typing.SupportsInt | typing.SupportsIndex) -> list[str]:
    ...
def hook_sites() -> list:
    ...
def load_arrays(arrays: dict, config: Gemma3Config, dtype: str = 'float32', weights: str = 'native', progress: LoadProgress | None = None) -> Model:
    ...
@typing.overload
def load_gguf(path: str, dtype: str = 'float32', weights: str = 'native', progress: LoadProgress | None = None) -> Model:
    ...
@typing.overload
def load_gguf(file: GGUFFile, dtype: str = 'float32', weights: str = 'native', progress: LoadProgress | None = None) -> Model:
    """
    The model from an already parsed GGUFFile.
    """
def load_hf(weights_path: str, config: Gemma3Config, dtype: str = 'float32', weights: str = 'native', progress: LoadProgress | None = None) -> Model:
    ...
def max_threads() -> int:
    ...
def planned_weight_bytes(config: Gemma3Config, dtype: str = 'float32', weights: str = 'native') -> int:
    """
    About how many bytes the weights of a model of this config take once loaded (checked before a load allocates).
    """
def read_safetensors(path: str) -> dict:
    """
    Read every tensor of a .safetensors file as float32 (F32/F16/BF16 on disk).
    """
