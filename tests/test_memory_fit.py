"""A model too large for the machine is refused before any allocation, with its size and the modes that would fit;
the planned size matches what a load really takes."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gemmalens as gl
from gemmalens import _core


def test_planned_bytes_match_a_real_load(tmp_path):
    """Dims that are multiples of 64, as every real Gemma 3's are (tiny odd dims pad oneDNN's blocked layouts)."""
    from conftest import build_hf

    d = str(tmp_path / "m")
    build_hf(d, hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=4096, num_hidden_layers=3, query_pre_attn_scalar=64)
    cfg = gl.Gemma3Config.from_pretrained(d)
    for dtype, weights in [("float32", "native"), ("bfloat16", "native"), ("float32", "int8"), ("bfloat16", "int4")]:
        m = gl.load(d, dtype=dtype, weights=weights, progress=False)
        planned = _core.planned_weight_bytes(cfg, dtype, weights)
        if m.weights == "native" and weights != "native":  # the CPU or K did not take the quantisation
            continue
        assert abs(planned - m.weight_nbytes) <= 0.02 * m.weight_nbytes, (dtype, weights, planned, m.weight_nbytes)


def _shapes(D, F, L, H, KV, Hd, V):
    """{HF name: shape} of every weight of a Gemma 3 with these dims."""
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n, s in [("input_layernorm", (D,)), ("self_attn.q_proj", (H * Hd, D)), ("self_attn.k_proj", (KV * Hd, D)),
                     ("self_attn.v_proj", (KV * Hd, D)), ("self_attn.q_norm", (Hd,)), ("self_attn.k_norm", (Hd,)),
                     ("self_attn.o_proj", (D, H * Hd)), ("post_attention_layernorm", (D,)),
                     ("pre_feedforward_layernorm", (D,)), ("mlp.gate_proj", (F, D)), ("mlp.up_proj", (F, D)),
                     ("mlp.down_proj", (D, F)), ("post_feedforward_layernorm", (D,))]:
            shapes[p + n + ".weight"] = s
    return shapes


def _write_checkpoint(path, D, F, L, H, KV, Hd, V, sparse=False):
    """An HF folder with a bf16 model.safetensors for these dims: random N(0, 0.02) weights written a tensor at a
    time, or (sparse) a file that only claims its size (a hole: no disk, no data)."""
    cfg = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=D, intermediate_size=F,
               num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV, head_dim=Hd, vocab_size=V,
               sliding_window=512, max_position_embeddings=4096, query_pre_attn_scalar=Hd, rms_norm_eps=1e-6)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    shapes = _shapes(D, F, L, H, KV, Hd, V)
    header, off = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        if sparse:
            f.truncate(8 + len(hb) + off)
        else:
            rng = np.random.default_rng(0)
            for s in shapes.values():
                a = rng.standard_normal(s, dtype=np.float32) * 0.02
                f.write((a.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    return off


def _sparse_checkpoint(path, n_layers):
    """A large Gemma 3 that takes no disk."""
    _write_checkpoint(path, D=2048, F=16384, L=n_layers, H=8, KV=4, Hd=256, V=262144, sparse=True)
    return gl.Gemma3Config.from_pretrained(path)


def test_too_large_refused_before_allocating(tmp_path):
    avail = _core.available_memory_bytes()
    assert avail > 0  # /proc/meminfo is readable here
    per_layer = 2 * (8 * 256 * 2048 + 2 * 4 * 256 * 2048 + 2048 * 8 * 256 + 3 * 16384 * 2048)
    n_layers = int(1.5 * avail // per_layer) + 1  # bf16 alone is 1.5x the memory there is
    cfg = _sparse_checkpoint(str(tmp_path / "big"), n_layers)
    need = _core.planned_weight_bytes(cfg, "bfloat16", "native")
    assert need > avail
    # In a child with its writable memory capped below the model: were the check missing, the load would fail on its
    # first large allocation (a different MemoryError) instead of taking the machine's memory.
    script = textwrap.dedent(f"""
        import resource, sys, time
        cap = 12 << 30
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))  # writable memory only: the mmap of the file is not counted
        import gemmalens as gl
        t = time.time()
        try:
            gl.load({str(tmp_path / 'big')!r}, dtype=sys.argv[1], weights=sys.argv[2], progress=False)
        except MemoryError as e:
            print("MemoryError:", e)
            print("seconds", time.time() - t)
        else:
            print("loaded")
    """)
    for dtype, weights in [("bfloat16", "native"), ("float32", "native")]:
        out = subprocess.run([sys.executable, "-c", script, dtype, weights], capture_output=True, text=True,
                             timeout=300)
        assert "MemoryError: this model's weights need about" in out.stdout, out.stdout + out.stderr[-3000:]
        msg = out.stdout
        assert f"{_core.planned_weight_bytes(cfg, dtype, weights) / 1e9:.1f} GB" in msg
        assert 'weights="int8"' in msg and 'weights="int4"' in msg and "GEMMALENS_NO_MEMORY_CHECK" in msg
        if dtype == "float32":
            assert 'dtype="bfloat16"' in msg
        assert float(msg.split("seconds")[1]) < 10  # refused up front, not after reading the weights


def _peak_rss_of_load(path, dtype, weights):
    """(RSS growth at the load's peak, final weight bytes, the weights mode taken) of gl.load in a fresh process."""
    code = textwrap.dedent(f"""
        import gemmalens as gl
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        base = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        m = gl.load({path!r}, dtype={dtype!r}, weights={weights!r}, progress=False)
        print(base, status("VmHWM:"), m.weight_nbytes, m.weights)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    base, hwm, weights_bytes, mode = out.stdout.split()
    return int(hwm) - int(base), int(weights_bytes), mode


@pytest.mark.parametrize("dtype,weights", [("bfloat16", "native"), ("bfloat16", "int8"), ("float32", "int4")])
def test_streaming_load_peak_rss(tmp_path, dtype, weights):
    """A load's peak RSS stays within 1.3x of the weights it ends with: each tensor is read from the mapped file,
    converted, and its pages dropped (a load that kept the file's pages would peak near file + weights)."""
    d = str(tmp_path / "m")
    file_bytes = _write_checkpoint(d, D=1024, F=4096, L=6, H=8, KV=4, Hd=128, V=32768)  # ~256 MB
    grew, weights_bytes, mode = _peak_rss_of_load(d, dtype, weights)
    assert mode == weights  # the quantisation was taken
    # beside the weights a load holds one fused matmul's rows in f32 (gate | up: 2 F D floats; a loader without row
    # access adds the part being read, 3 F D), a few % of a real model (27b: 0.7 GB of 15 GB) but half of this small
    # one's int4 weights
    transient = 3 * 4096 * 1024 * 4
    assert grew <= 1.3 * weights_bytes + transient, (grew / 1e6, weights_bytes / 1e6, file_bytes / 1e6)
    assert grew < file_bytes + weights_bytes - transient  # not the file's pages kept beside the weights


@pytest.mark.parametrize("dtype,weights", [("bfloat16", "native"), ("bfloat16", "int8")])
def test_streaming_gguf_load_peak_rss(tmp_path, dtype, weights):
    """The same streaming for a GGUF (written by the gguf package, Q8_0 projections, F32 norms): each tensor is
    dequantised from the mapped file and its pages dropped, so the peak stays near the weights, not file + weights."""
    import torch
    from types import SimpleNamespace

    from gguf import GGMLQuantizationType
    from gguf_util import write_gemma3_gguf

    D, F, L, H, KV, Hd, V = 1024, 4096, 6, 8, 4, 128, 32768
    cfg = SimpleNamespace(max_position_embeddings=4096, hidden_size=D, num_hidden_layers=L, intermediate_size=F,
                          num_attention_heads=H, num_key_value_heads=KV, head_dim=Hd, rms_norm_eps=1e-6,
                          sliding_window=512, rope_parameters={"full_attention": {"rope_theta": 1e6}})
    rng = np.random.default_rng(0)
    tensors = _shapes(D, F, L, H, KV, Hd, V)

    class Model:  # what write_gemma3_gguf reads of an HF model: its config and its state dict
        config = cfg

        def state_dict(self):
            return {name: torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 0.02) for name, s in tensors.items()}

    model = Model()
    path = str(tmp_path / "m.gguf")
    write_gemma3_gguf(path, model, quant=GGMLQuantizationType.Q8_0)
    file_bytes = os.path.getsize(path)
    grew, weights_bytes, mode = _peak_rss_of_load(path, dtype, weights)
    assert mode == weights
    transient = 3 * F * D * 4  # one fused matmul's rows in f32, as above
    assert grew <= 1.3 * weights_bytes + transient, (grew / 1e6, weights_bytes / 1e6, file_bytes / 1e6)
    assert grew < file_bytes + weights_bytes - transient  # the file's pages were not kept


HUGE_CODE = r"""
import json, sys, numpy as np, gemmalens as gl
def anon_huge():
    return int([l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]) * 1024
before = anon_huge()
cache = gl.KVCache(gl.Gemma3Config.preset("270m"), 1, 16384, "float32")  # 16 MiB of k and of v per global layer
kv = anon_huge() - before
m = gl.load(sys.argv[1], dtype=sys.argv[2], progress=False)
ids = np.arange(40)[None] % 300
print(json.dumps({"kv": kv, "model": anon_huge() - before - kv, "logits": m.forward(ids).tolist()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_pages_for_weights_and_kv_cache(tmp_path, dtype):
    """Weights of 4 MB and more and the KV cache ask for transparent huge pages before they are written (ops/pages.h):
    with the kernel's THP mode "madvise" (its default) or "always" they get some; GEMMALENS_HUGE_PAGES=0 leaves them
    on 4 KB pages in "madvise" mode. The logits are the same either way. /sys says which mode this machine runs."""
    from conftest import build_hf

    build_hf(str(tmp_path), hidden_size=256, intermediate_size=4096, num_hidden_layers=2)  # gate/up 8192 x 256
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    runs = {}
    for flag in ("1", "0"):
        env = dict(os.environ, GEMMALENS_HUGE_PAGES=flag)
        r = subprocess.run([sys.executable, "-c", HUGE_CODE, str(tmp_path), dtype], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["1"]["logits"] == runs["0"]["logits"]
    if mode in ("madvise", "always"):
        assert runs["1"]["kv"] >= 2 << 21 and runs["1"]["model"] >= 2 << 21, (mode, runs["1"]["kv"], runs["1"]["model"])
    else:  # "never": the advice changes nothing
        assert runs["1"]["kv"] == runs["1"]["model"] == 0
    if mode != "always":
        assert runs["0"]["kv"] == runs["0"]["model"] == 0


USED_HEAP_CODE = r"""
import json, numpy as np, gemmalens as gl
def anon_huge():
    return int([l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]) * 1024
used = np.ones(256 << 20, np.uint8)  # heap pages written on 4 KB pages (no advice), then back to the heap's free list
del used
before = anon_huge()
cache = gl.KVCache(gl.Gemma3Config.preset("270m"), 1, 16384, "float32")  # 16 MiB of k and of v per global layer
print(json.dumps({"kv": anon_huge() - before}))
"""


def test_kv_cache_gets_huge_pages_on_a_used_heap():
    """The KV cache's large buffers come from fresh mappings (ops/pages.h: map_pages), not from heap memory that
    earlier buffers wrote on 4 KB pages, which advice cannot turn into huge pages. The child's allocator takes
    everything from the heap and keeps what is freed (MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_), and a 256 MiB
    array is written and freed first: a cache built on that memory got no huge pages; from map_pages, all of its
    global layers' 96 MiB are (THP mode "madvise" or "always")."""
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 31))
    r = subprocess.run([sys.executable, "-c", USED_HEAP_CODE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kv = json.loads(r.stdout.strip().splitlines()[-1])["kv"]
    if mode in ("madvise", "always"):
        assert kv >= 96 << 20, (mode, kv)
    else:
        assert kv == 0


ARENA_CODE = r"""
import gc, json, sys, numpy as np, gemmalens as gl
t = gl._core._testing
def anon_huge():
    return int([l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]) * 1024
c0, before = t.weight_arena_chunks(), anon_huge()
m = gl.load(sys.argv[1], dtype=sys.argv[2], weights=sys.argv[3], progress=False)
loaded, huge = t.weight_arena_chunks() - c0, anon_huge() - before
logits = m.forward(np.arange(40)[None] % 300).tolist()
del m
gc.collect()
print(json.dumps({"loaded": loaded, "after": t.weight_arena_chunks() - c0, "huge": huge, "logits": logits}))
"""


@pytest.mark.parametrize("dtype,weights", [("bfloat16", "native"), ("bfloat16", "int8"), ("float32", "native")])
def test_small_weights_share_huge_page_chunks(tmp_path, dtype, weights):
    """Matrices under 16 MiB (every layer of this model: the largest is 1 MiB) go to the weight arena (ops/pages.h):
    chunks of 2 MB pages shared one after another, where a buffer of their own would get none. With huge pages on
    (GEMMALENS_HUGE_PAGES unset or 1) the model's weights sit in arena chunks, on 2 MB pages where THP is "madvise" or
    "always", and freeing the model frees them; off (0), nothing goes to the arena. The logits are the same."""
    from conftest import build_hf

    build_hf(str(tmp_path), hidden_size=256, intermediate_size=1024, num_hidden_layers=3)
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split("[")[1].split("]")[0]
    runs = {}
    for flag in ("1", "0"):
        r = subprocess.run([sys.executable, "-c", ARENA_CODE, str(tmp_path), dtype, weights], capture_output=True,
                           text=True, env=dict(os.environ, GEMMALENS_HUGE_PAGES=flag), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["1"]["logits"] == runs["0"]["logits"]
    assert runs["1"]["loaded"] >= 1 and runs["1"]["after"] == 0, runs["1"]
    assert runs["0"]["loaded"] == runs["0"]["after"] == 0, runs["0"]
    if mode in ("madvise", "always"):
        assert runs["1"]["huge"] >= 2 << 20, (mode, runs["1"]["huge"])
    if mode == "madvise":
        assert runs["0"]["huge"] == 0, runs["0"]


ARENA_OOM_CODE = r"""
import resource, numpy as np, gemmalens as gl
ops = gl._core._testing
ops.linear(np.ones((2, 64), np.float32), np.ones((64, 64), np.float32), "bfloat16")  # threads and oneDNN set up
w, x = np.ones((1024, 1024), np.float32), np.ones((2, 1024), np.float32)
vmdata = int([l for l in open("/proc/self/status") if l.startswith("VmData")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (vmdata + (8 << 20), resource.RLIM_INFINITY))  # no room for a 32 MB chunk
try:
    ops.linear(x, w, "bfloat16")
    print("no error")
except MemoryError as e:
    print("MemoryError:", e)
print("chunks", ops.weight_arena_chunks())
resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("after", float(ops.linear(x, w, "bfloat16")[0, 0]), ops.weight_arena_chunks())
"""


def test_weight_arena_out_of_memory_is_a_memory_error_and_recovers():
    """A 2 MB bf16 weight needs a new 32 MB arena chunk; where the process may not map one (RLIMIT_DATA in a child),
    the call is a MemoryError naming the bytes, no chunk is left half made, and once memory is there again the same
    call works."""
    r = subprocess.run([sys.executable, "-c", ARENA_OOM_CODE], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, GEMMALENS_HUGE_PAGES="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert f"MemoryError: could not allocate {32 << 20} bytes for a weight: out of memory" in out, out
    assert "chunks 0" in out and "after 1024.0 0" in out, out


KV_OOM_CODE = r"""
import resource, gemmalens as gl
cfg = gl.Gemma3Config.preset("270m")
gl.KVCache(cfg, 1, 64, "float32")  # set up
vmdata = int([l for l in open("/proc/self/status") if l.startswith("VmData")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_DATA, (vmdata + (32 << 20), resource.RLIM_INFINITY))  # no room for 96 MiB more
try:
    gl.KVCache(cfg, 1, 16384, "float32")
    print("no error")
except MemoryError as e:
    print("MemoryError:", e)
resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("after", gl.KVCache(cfg, 1, 16384, "float32").max_seq_len)
"""


def test_kv_cache_out_of_memory_is_a_memory_error_naming_the_fix():
    """A KV cache the process may not map (RLIMIT_DATA in a child; its fresh mappings fail) is a MemoryError naming
    the cache's size and what to change, not a crash; with memory there again the same cache is made."""
    r = subprocess.run([sys.executable, "-c", KV_OOM_CODE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "MemoryError: KV cache for batch 1 and max_seq_len 16384: could not allocate its" in out, out
    assert "use a smaller batch or max_seq_len" in out and "after 16384" in out, out


def test_bad_huge_pages_value_fails_the_import_naming_the_choices():
    """GEMMALENS_HUGE_PAGES takes 0 or 1 (unset: 1); anything else fails the import instead of being read as on."""
    for bad in ("off", "no", "2"):
        r = subprocess.run([sys.executable, "-c", "import gemmalens"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, GEMMALENS_HUGE_PAGES=bad))
        assert r.returncode != 0
        assert "GEMMALENS_HUGE_PAGES must be 0" in r.stderr and f"got '{bad}'" in r.stderr, r.stderr[-2000:]
    for ok in ("0", "1", ""):
        r = subprocess.run([sys.executable, "-c", "import gemmalens"], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, GEMMALENS_HUGE_PAGES=ok))
        assert r.returncode == 0, r.stderr[-2000:]
