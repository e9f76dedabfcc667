"""gemmalens: Gemma 3 on the CPU with TransformerLens-style access to every activation.

>>> import gemmalens as gl
>>> model = gl.load("path/to/hf-checkpoint", dtype="float32")
>>> logits = model.forward([2, 651, 6037])          # np.float32 [1, 3, vocab]
"""
import ctypes as _ctypes

from . import _cpu, _threads

# Before the extension is loaded: a CPU below its x86-64-v3 baseline gets an ImportError, not a SIGILL.
_cpu.check_baseline()
# Before oneDNN (and with it libgomp) is loaded: libgomp reads its waiting policy from the environment once.
_threads.configure()

from . import _deps  # noqa: E402


def _preload_dnnl():
    # The extension's RPATH points at <prefix>/lib where the onednn-cpu-gomp wheel puts libdnnl.so.3.
    # Loading it here by its absolute path also covers layouts the RPATH misses (e.g. --user installs).
    lib = _deps.dnnl_library()
    if lib:
        try:
            _ctypes.CDLL(lib, mode=_ctypes.RTLD_GLOBAL)
        except OSError:
            pass


_preload_dnnl()

from . import _core  # noqa: E402
from ._core import CheckpointError, Gemma3Config, KVCache  # noqa: E402
from ._cpu import cpu_info  # noqa: E402
from .config import _install_config_helpers  # noqa: E402

_install_config_helpers(Gemma3Config)

from .model import Model  # noqa: E402
from .formats import load  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402
from . import interventions  # noqa: E402
from .activation_cache import ActivationCache  # noqa: E402
from . import hooks  # noqa: E402
from .hooks import HookPoint  # noqa: E402
from .sae import SAE  # noqa: E402
from .transcoders import CLT, TranscoderSet, load_transcoders  # noqa: E402
from . import steering  # noqa: E402
from . import metrics  # noqa: E402
from . import attribution  # noqa: E402
from . import grad  # noqa: E402
from .harvest import HarvestError, HarvestResult, harvest  # noqa: E402

__version__ = "0.1.0"
__all__ = ["load", "Model", "Gemma3Config", "KVCache", "CheckpointError", "Tokenizer", "interventions",
           "ActivationCache", "hooks", "HookPoint", "SAE", "TranscoderSet", "CLT", "load_transcoders", "steering",
           "metrics", "attribution", "harvest", "HarvestError", "HarvestResult", "cpu_info"]
