"""Kernels against naive numpy references."""
import numpy as np
import pytest

import gemmalens
from gemmalens import _core

ops = _core._testing
rng = np.random.default_rng(0)


def bf16(x):
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def test_rmsnorm():
    x = rng.standard_normal((7, 48)).astype(np.float32) * 30
    w = rng.standard_normal(48).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + w)
    np.testing.assert_allclose(ops.rmsnorm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-5)


def test_rmsnorm_eps_counts():
    """Rows near zero, where eps dominates the mean square: dropping or misplacing eps changes the output by O(1)."""
    x = rng.standard_normal((5, 48)).astype(np.float32) * np.array([1e-3, 1e-2, 0.1, 1.0, 0.0], np.float32)[:, None]
    w = rng.standard_normal(48).astype(np.float32)
    for eps in (1e-2, 1e-6):
        ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * (1 + w)
        np.testing.assert_allclose(ops.rmsnorm(x, w, eps), ref, rtol=2e-6, atol=1e-7, equal_nan=False)
    no_eps = x[:3] / np.sqrt((x[:3].astype(np.float64) ** 2).mean(-1, keepdims=True)) * (1 + w)
    assert np.abs(ops.rmsnorm(x, w, 1e-2)[:3] - no_eps).max() > 0.5  # the check above can tell


def test_gelu_tanh_mul():
    g = np.linspace(-12, 12, 4001, dtype=np.float32).reshape(1, -1)
    u = rng.standard_normal(g.shape).astype(np.float32)
    gd = g.astype(np.float64)
    ref = 0.5 * gd * (1 + np.tanh(np.sqrt(2 / np.pi) * (gd + 0.044715 * gd ** 3))) * u
    np.testing.assert_allclose(ops.gelu_tanh_mul(g, u), ref, rtol=0, atol=3e-6 * np.abs(u).max() * 12)


@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (1e6, 8.0)])
def test_rope(base, scale):
    M, nh, Hd = 9, 3, 32
    x = rng.standard_normal((M, nh, Hd)).astype(np.float32)
    pos = np.array([0, 1, 2, 5, 17, 100, 511, 1000, 4095], np.int32)
    inv = 1.0 / (base ** (np.arange(0, Hd, 2) / Hd)) / scale
    ang = pos[:, None] * inv[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : Hd // 2], x[..., Hd // 2:]
    ref = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    # f32 angle (as HF computes it) vs float64 reference: error grows with position * inv_freq.
    np.testing.assert_allclose(ops.rope(x, pos, base, scale), ref, atol=5e-4)


@pytest.mark.parametrize("M", [1, 3, 64, 130])
def test_linear_f32_and_bf16(M):
    x = rng.standard_normal((M, 80)).astype(np.float32)
    w = rng.standard_normal((48, 80)).astype(np.float32)
    np.testing.assert_allclose(ops.linear(x, w, "float32"), x @ w.T, rtol=1e-5, atol=1e-4)
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T  # bf16 products, f32 accumulation
    np.testing.assert_allclose(ops.linear(x, w, "bfloat16"), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 16, 17, 96, 97, 300])
def test_linear_f32_across_row_counts(M, plain):
    """f32 weights by the rows M of a call (gl.cpu_info()["f32_matmul"]): oneDNN's f32 matmul (brgemm from AVX-512
    on), or on the AVX2 classes gemmalens's own 64-column panels -- up to 4 rows streamed once, register tiles of 6
    past that (K in slices of 128, rows in blocks of 96), a last panel of 1000 - 960 columns through a scratch. Either
    way a row's outputs are the same bits alone as beside other rows (continuous batching: oneDNN 3.2's AVX2 gemm
    broke this for every M > 1). An odd K takes oneDNN on every class."""
    K, N = 1024, 1000
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    out = ops.linear(x, w, "float32", plain=plain)
    np.testing.assert_allclose(out, x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=2e-4)
    for m in sorted({0, M // 2, M - 1}):
        np.testing.assert_array_equal(out[m], ops.linear(x[m:m + 1], w, "float32", plain=plain)[0])
    xo, wo = x[:, :65], w[:70, :65]
    np.testing.assert_allclose(ops.linear(xo, wo, "float32", plain=plain), xo.astype(np.float64) @ wo.T, rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("plain", [False, True])
def test_linear_without_rows(plain):
    """An empty batch (M = 0) gives an empty [0, N] result on every path of every class -- f32 (oneDNN or the AVX2
    panels), bf16, int8, int4 -- as numpy does (the own kernels once refused it as an internal error;
    tests/test_sae.py's empty batch checks a layer that computes again afterwards)."""
    w = rng.standard_normal((128, 64)).astype(np.float32)
    for kw in (dict(dtype="float32"), dict(dtype="bfloat16"), dict(int8=True), dict(int4=True)):
        out = ops.linear(np.zeros((0, 64), np.float32), w, plain=plain, **kw)
        assert out.shape == (0, 128) and out.dtype == np.float32, kw


@pytest.mark.parametrize("M", [1, 5, 17, 70])
def test_bf16_activations_round_to_nearest_even(M):
    """A bf16 matmul rounds its activations to bf16 first, to nearest with ties to even, on every path (vcvtneps2bf16,
    or the integer rounding of the classes without it). Against an identity weight each output is one activation as
    rounded: half of them sit exactly on a tie here (1 + odd multiples of 2^-8, times powers of two)."""
    K = N = 64
    ties = (1 + (2 * rng.integers(0, 64, (M, K)) + 1) / 256.0) * 2.0 ** rng.integers(-20, 20, (M, K))
    x = np.where(rng.random((M, K)) < 0.5, ties, rng.standard_normal((M, K)) * 100).astype(np.float32)
    x *= np.where(rng.random((M, K)) < 0.5, -1, 1).astype(np.float32)
    out = ops.linear(x, np.eye(N, K, dtype=np.float32), "bfloat16")
    np.testing.assert_array_equal(out, bf16(x))
    assert (bf16(x) != x).mean() > 0.4  # the rounding is exercised, ties among them


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8])
def test_linear_bf16_decode_kernel(M, plain):
    """M <= 4 takes the vdpbf16ps kernels (ops/gemv_bf16.cpp: oneDNN's blocked layout, which a plain (tied) table
    of 192 rows takes too, or row-major for a plain one of 131 rows), larger M oneDNN; every one is bf16 products
    summed in f32."""
    x = rng.standard_normal((M, 320)).astype(np.float32)
    w = rng.standard_normal((192, 320)).astype(np.float32)
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T
    out = ops.linear(x, w, "bfloat16", plain=plain)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    # a row count that is not a multiple of the kernels' 4 / 64 (row tail, or oneDNN's own layout)
    np.testing.assert_allclose(ops.linear(x, w[:131], "bfloat16", plain=plain), ref[:, :131], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("from_rows", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("N", [192, 131])
def test_tied_embedding_table(N, dtype, from_rows):
    """The tied embedding / LM head (a plain Linear): bf16 tables with N % 64 == 0 are kept in the decode kernels'
    64-row panels (N = 192), others row-major (N = 131, f32). Each layout gives the LM head (M = 1, 3: the decode
    kernels; 70: the prefill path), the embedding rows, the table back, and dy W, as the stored values do; built at
    once or, as a model load builds it, from blocks of rows."""
    K = 320
    w = rng.standard_normal((N, K)).astype(np.float32)
    stored = (bf16(w) if dtype == "bfloat16" else w).astype(np.float64)
    ids = np.array([0, 1, 63, 64, N - 1, 77])
    dy = rng.standard_normal((5, N)).astype(np.float32)
    for M in (1, 3, 70):
        x = rng.standard_normal((M, K)).astype(np.float32)
        y, rows, table, dx = ops.tied_table(w, dtype, x, ids, dy, from_rows)
        xs = bf16(x).astype(np.float64) if dtype == "bfloat16" else x.astype(np.float64)
        np.testing.assert_allclose(y, xs @ stored.T, rtol=1e-5, atol=2e-4 * np.abs(xs @ stored.T).max())
        np.testing.assert_array_equal(rows, stored[ids])
        np.testing.assert_array_equal(table, stored)
        np.testing.assert_allclose(dx, dy.astype(np.float64) @ stored, rtol=1e-5, atol=1e-4 * np.abs(dy @ stored).max())


def test_tied_table_refuses_bad_shapes_and_ids():
    w = rng.standard_normal((64, 32)).astype(np.float32)
    x, dy = np.zeros((1, 32), np.float32), np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match=r"w \[N, K\], x \[M, K\]"):
        ops.tied_table(w, "bfloat16", np.zeros((1, 31), np.float32), np.array([0]), dy)
    with pytest.raises(ValueError, match=r"dy \[M2, N\]"):
        ops.tied_table(w, "bfloat16", x, np.array([0]), np.zeros((1, 63), np.float32))
    for bad in (-1, 64):
        with pytest.raises(ValueError, match=r"ids in \[0, N\)"):
            ops.tied_table(w, "bfloat16", x, np.array([0, bad]), dy)


def test_read_bandwidth_refuses_sizes_that_measure_no_memory():
    """The decode bound's denominator: a positive rate for a real buffer; a buffer under 1 MiB (it would sit in cache,
    or under 256 bytes read nothing and return 0) or no repetition is a ValueError naming the limits."""
    assert ops.read_bandwidth(1 << 22, 1) > 0
    for nbytes, reps in ((0, 1), (100, 1), (-5, 1), (1 << 22, 0)):
        with pytest.raises(ValueError, match=r"at least 1 MiB .* reps at least 1"):
            ops.read_bandwidth(nbytes, reps)


def test_tied_embedding_table_packed_block_by_block():
    """A load fills the table 16 MB of f32 rows at a time (Linear::plain_from_rows), rounded to whole 64-row panels:
    at K = 40960 that is 128 rows, so 192 rows arrive as two blocks, the second one packed into panel 2."""
    N, K = 192, 40960
    w = rng.standard_normal((N, K)).astype(np.float32)
    ids = np.array([0, 127, 128, 191])
    x = rng.standard_normal((1, K)).astype(np.float32)
    y, rows, table, _ = ops.tied_table(w, "bfloat16", x, ids, np.zeros((1, N), np.float32), True)
    np.testing.assert_array_equal(table, bf16(w))
    np.testing.assert_array_equal(rows, bf16(w)[ids])
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def attention_ref(q, k, v, window, scale, softcap):
    """A prefill's attention (no cache): attention_past_ref with past 0."""
    return attention_past_ref(q, k, v, 0, window, scale, softcap)


@pytest.mark.parametrize("H,KV,Hd", [(4, 1, 32), (4, 2, 16), (8, 2, 24), (2, 2, 64)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (5, 0.0), (70, 2.0)])
def test_attention(H, KV, Hd, window, softcap):
    B, T = 2, 150  # several 64-key tiles and query blocks
    q = rng.standard_normal((B, T, H, Hd)).astype(np.float32)
    k = rng.standard_normal((B, T, KV, Hd)).astype(np.float32)
    v = rng.standard_normal((B, T, KV, Hd)).astype(np.float32)
    ref = attention_ref(q, k, v, window, 0.3, softcap)
    np.testing.assert_allclose(ops.attention(q, k, v, window, 0.3, softcap), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("H,KV,Hd", [(4, 1, 32), (8, 2, 24), (2, 2, 64)])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (37, 0.0), (300, 2.0)])
def test_attention_bf16_model(H, KV, Hd, window, softcap):
    """A bf16 model's prefill attention (on AMX and AMD's AVX512_BF16: two oneDNN bf16 matmuls with the probabilities
    rounded to bf16; elsewhere the f32 tiled kernel): the reference on bf16-rounded q, k, v, within bf16's rounding of
    the probabilities. T = 600 spans three 256-query blocks, B = 2 rows."""
    B, T = 2, 600
    q = rng.standard_normal((B, T, H, Hd)).astype(np.float32)
    k = rng.standard_normal((B, T, KV, Hd)).astype(np.float32)
    v = rng.standard_normal((B, T, KV, Hd)).astype(np.float32)
    out = ops.attention(q, k, v, window, 0.3, softcap, bf16=True)
    if ops.bf16_attention_matmul():  # measured: max 0.2%, mean 0.16% of the scale (the bf16 probabilities)
        ref = attention_ref(bf16(q), bf16(k), bf16(v), window, 0.3, softcap)
        assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()
        assert np.abs(out - ref).mean() <= 3e-3 * np.abs(ref).mean()
    else:  # the f32 tiled kernel
        np.testing.assert_allclose(out, attention_ref(q, k, v, window, 0.3, softcap), rtol=0, atol=2e-5)


def attention_past_ref(q, k, v, past, window, scale, softcap, round_p=False):
    """q [B, T, H, Hd] at positions past .. past + T - 1 over k / v [B, past + T, KV, Hd], in float64; round_p: the
    normalised probabilities rounded to bf16 before P V (a bf16 model's attention)."""
    B, T, H, Hd = q.shape
    KV, S = k.shape[2], k.shape[1]
    z = np.zeros(q.shape)
    i, j = past + np.arange(T)[:, None], np.arange(S)[None, :]
    vis = (j <= i) & ((i - j < window) if window else True)
    for b in range(B):
        for h in range(H):
            kh = h // (H // KV)
            s = q[b, :, h].astype(np.float64) @ k[b, :, kh].astype(np.float64).T * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(vis, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            if round_p:
                p = bf16(p.astype(np.float32)).astype(np.float64)
            z[b, :, h] = p @ v[b, :, kh].astype(np.float64)
    return z


@pytest.mark.parametrize("H,KV,Hd", [(4, 1, 256), (8, 2, 64), (4, 4, 128), (6, 2, 96), (16, 2, 32), (4, 2, 20)])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("past,window,softcap", [(900, 0, 0.0), (700, 129, 0.0), (333, 0, 2.0), (64, 0, 0.0)])
@pytest.mark.parametrize("cache", ["float32", "bfloat16", "int8", "int8 bf16"])
def test_attention_decode_against_numpy(H, KV, Hd, T, past, window, softcap, cache):
    """A decode step (csrc/ops/attention_decode.cpp): T <= 4 new positions over a KV cache of `past` (f32, or bf16 as
    a bf16 model keeps it; a ring of `window` slots that has wrapped on a sliding layer), keys split in chunks across
    the threads and merged. Head dims 256 / 128 / 64 take the AVX-512 kernels where the class has them (f32 FMAs, or
    vdpbf16ps for the bf16 model where the CPU chooses it; 4 query rows per KV head at once, then the rest), 96 and 32
    (and every head dim on an AVX2 class) the AVX2 kernels, 20 (not a multiple of 32) the portable loops. Where the
    class has AVX512_BF16 but the CPU chooses the f32 kernels (Intel: cpu.h, attention_decode_vdpbf16ps), the bf16
    model's step also runs forced to the vdpbf16ps kernels, so they are tested on every CPU that has them.
    "int8" (a float32 model's) and "int8 bf16" (a bf16 model's): an int8 KV cache (kv_dtype="int8"), whose rows the
    same f32 kernels (AVX-512, AVX2, portable) read, never vdpbf16ps; the reference reads the past as numpy's
    quantise-dequantise of it (kv_int8_ref) and the step's own rows exactly."""
    B = 2
    q = rng.standard_normal((B, T, H, Hd)).astype(np.float32)
    k = rng.standard_normal((B, past + T, KV, Hd)).astype(np.float32)
    v = rng.standard_normal((B, past + T, KV, Hd)).astype(np.float32)
    if cache in ("bfloat16", "int8 bf16"):  # a bf16 model's k and v are bf16 values (the cache's rows and the step's own alike)
        k, v = bf16(k), bf16(v)
    if cache.startswith("int8") and Hd % 32:  # refused: the cache's blocks are 32 values
        with pytest.raises(ValueError, match="kv_int8 needs Hd % 32 == 0"):
            ops.attention(q, k, v, window, 0.2, softcap, bf16=cache == "int8 bf16", past=past, kv_int8=True)
        return
    if cache.startswith("int8"):
        out = ops.attention(q, k, v, window, 0.2, softcap, bf16=cache == "int8 bf16", past=past, kv_int8=True)
        kq, vq = k.copy(), v.copy()
        kq[:, :past], vq[:, :past] = kv_int8_ref(k[:, :past]), kv_int8_ref(v[:, :past])
        np.testing.assert_allclose(out, attention_past_ref(q, kq, vq, past, window, 0.2, softcap), rtol=0, atol=2e-5)
        return
    out = ops.attention(q, k, v, window, 0.2, softcap, bf16=cache == "bfloat16", past=past)
    info = gemmalens.cpu_info()
    dp = cache == "bfloat16" and Hd % 64 == 0 and info["attention_decode_bf16"] == "vdpbf16ps"
    if not dp:  # f32 products of the rows as stored: the reference to summation order
        np.testing.assert_allclose(out, attention_past_ref(q, k, v, past, window, 0.2, softcap), rtol=0, atol=2e-5)
        if cache == "float32" or Hd % 64 != 0 or info["class"] not in ("avx512_bf16", "amx"):
            return
        out = ops.attention(q, k, v, window, 0.2, softcap, bf16=True, past=past, decode_kernel="vdpbf16ps")
    # vdpbf16ps: q and the probabilities rounded to bf16, as HF's bf16 attention rounds them. Against the reference
    # with that rounding (q in bf16, the normalised probabilities in bf16) the kernel differs only in where it
    # rounds the probabilities (unnormalised, against the running max of its block of keys: the same relative step,
    # other values). Measured on a Zen 5 over these cases: at most 0.34% of the output's scale, and a mean error
    # 0.25% of the mean output; f32 q and p move the output up to 0.6% of its scale. A kernel that pairs the wrong
    # keys or dims, or loses a key, is off by tens of percent.
    ref_bf = attention_past_ref(bf16(q), k, v, past, window, 0.2, softcap, round_p=True)
    assert np.abs(out - ref_bf).max() <= 6e-3 * np.abs(ref_bf).max()
    assert np.abs(out - ref_bf).mean() <= 4e-3 * np.abs(ref_bf).mean()


def kv_int8_ref(x):
    """An int8 KV cache's rows as numpy computes them: per block of 32 values d = max|x| / 127 (float32), q = x / d
    rounded to nearest (even on ties), read back as q * d."""
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // 32, 32)).astype(np.float32)
    d = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
    q = np.clip(np.round(np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0)), -127, 127)
    return (q * d).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("H,KV,Hd", [(4, 1, 256), (8, 2, 64), (6, 2, 96)])
@pytest.mark.parametrize("bf16_model", [False, True])
@pytest.mark.parametrize("past,window", [(300, 0), (200, 129)])
def test_attention_over_an_int8_cache_against_numpy(H, KV, Hd, bf16_model, past, window):
    """A chunk of 70 positions after an int8 KV cache (a prefill continued, or a prompt after a system prompt's
    cache): the tiled kernel, or for a bf16 model on AMX / AMD's AVX512_BF16 the two bf16 matmuls (the cache's
    values rounded to bf16 there, as the chunk's are), against numpy on the dequantised past; and the materialised
    path the attn_scores / pattern hooks take reads the same values (tests/test_hooks.py runs it through a model)."""
    B, T = 2, 70
    q = rng.standard_normal((B, T, H, Hd)).astype(np.float32)
    k = rng.standard_normal((B, past + T, KV, Hd)).astype(np.float32)
    v = rng.standard_normal((B, past + T, KV, Hd)).astype(np.float32)
    if bf16_model:
        k, v = bf16(k), bf16(v)
    out = ops.attention(q, k, v, window, 0.2, 0.0, bf16=bf16_model, past=past, kv_int8=True)
    kq, vq = k.copy(), v.copy()
    kq[:, :past], vq[:, :past] = kv_int8_ref(k[:, :past]), kv_int8_ref(v[:, :past])
    if bf16_model and ops.bf16_attention_matmul():  # q, the dequantised past and the probabilities in bf16
        ref = attention_past_ref(bf16(q), bf16(kq), vq, past, window, 0.2, 0.0, round_p=True)
        assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max()
        assert np.abs(out - ref).mean() <= 3e-3 * np.abs(ref).mean()
    else:
        np.testing.assert_allclose(out, attention_past_ref(q, kq, vq, past, window, 0.2, 0.0), rtol=0, atol=2e-5)
    # an int8 cache differs from the exact past by the quantisation's error: visibly, but little
    exact = attention_past_ref(q, k, v, past, window, 0.2, 0.0)
    assert 1e-4 < np.abs(out - exact).max() / np.abs(exact).max() < 0.05


def test_attention_decode_kernel_choice():
    """_testing.attention's decode_kernel: "vdpbf16ps" takes those kernels where the class has AVX512_BF16 (and
    refuses where it has not), "auto" the CPU's choice; a float32 model's step is the same either way."""
    q = rng.standard_normal((1, 1, 4, 256)).astype(np.float32)
    kv = bf16(rng.standard_normal((1, 300, 1, 256)).astype(np.float32))
    with pytest.raises(ValueError, match="decode_kernel is 'auto' or 'vdpbf16ps'"):
        ops.attention(q, kv, kv, 0, 0.1, 0.0, bf16=True, past=299, decode_kernel="amx")
    info = gemmalens.cpu_info()
    f32_auto = ops.attention(q, kv, kv, 0, 0.1, 0.0, past=299)
    if info["class"] not in ("avx512_bf16", "amx"):
        with pytest.raises(ValueError, match="needs the avx512_bf16 or amx class.*pass decode_kernel='auto'"):
            ops.attention(q, kv, kv, 0, 0.1, 0.0, bf16=True, past=299, decode_kernel="vdpbf16ps")
        return
    forced = ops.attention(q, kv, kv, 0, 0.1, 0.0, bf16=True, past=299, decode_kernel="vdpbf16ps")
    auto = ops.attention(q, kv, kv, 0, 0.1, 0.0, bf16=True, past=299)
    # The f32 kernels differ from the f32 model's step by summation order only (~4e-7 of the scale: the bf16 cache's
    # rows are widened in another order); vdpbf16ps rounds q and the probabilities to bf16 (~2.5e-3).
    err = lambda out: np.abs(out - f32_auto).max() / np.abs(f32_auto).max()  # noqa: E731
    assert 3e-4 < err(forced) < 1e-2
    assert (err(auto) < 1e-5) == (info["attention_decode_bf16"] != "vdpbf16ps")
    np.testing.assert_array_equal(ops.attention(q, kv, kv, 0, 0.1, 0.0, past=299, decode_kernel="vdpbf16ps"), f32_auto)


def test_attention_with_a_past_refuses_bad_shapes():
    """_testing.attention(past=): k and v must hold the past and the new positions, past >= 0."""
    q = np.zeros((1, 2, 4, 64), np.float32)
    kv = np.zeros((1, 10, 1, 64), np.float32)
    with pytest.raises(ValueError, match="past >= 0"):
        ops.attention(q, kv, kv, 0, 1.0, 0.0, past=-1)
    with pytest.raises(ValueError, match="shape mismatch"):  # 10 positions: past 7 + 2 new would be 9
        ops.attention(q, kv, kv, 0, 1.0, 0.0, past=7)
    with pytest.raises(ValueError, match="shape mismatch"):  # v shorter than k
        ops.attention(q, kv, kv[:, :9], 0, 1.0, 0.0, past=8)
    assert ops.attention(q, kv, kv, 0, 1.0, 0.0, past=8).shape == q.shape


def q8_blocks(a):
    """ggml Q8_0-style: blocks of 32 along the last axis, d = max|a| / 127, q = round(a * (1 / d)), in float32 as the
    C++ computes it (a float64 division rounds a value near a half step the other way now and then)."""
    b = a.reshape(*a.shape[:-1], -1, 32).astype(np.float32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.rint(b * inv), -127, 127)
    return q.astype(np.float64), d.astype(np.float64)


@pytest.mark.parametrize("M", [1, 3, 4, 9, 37])
def test_linear_int4_against_numpy(M):
    x = rng.standard_normal((M, 192)).astype(np.float32)
    w = rng.standard_normal((70, 192)).astype(np.float32)
    # the stored 4-bit blocks: at most 16 levels per block of 32, and never a worse fit than d = max|w| / 7
    wq = ops.quantize(w, 4).reshape(70, 6, 32).astype(np.float64)
    assert max(len(np.unique(b)) for b in wq.reshape(-1, 32)) <= 16
    wb = w.reshape(70, 6, 32).astype(np.float64)
    naive_d = np.abs(wb).max(-1, keepdims=True) / 7
    naive = np.clip(np.rint(wb / naive_d), -8, 7) * naive_d
    assert (((wb - wq) ** 2).sum(-1) <= ((wb - naive) ** 2).sum(-1) * (1 + 1e-5)).all()
    qx, dx = q8_blocks(x)
    # integer block dot products scaled by both block scales = the int8 activations against the stored weights
    ref = np.einsum("mbk,nbk,mb->mn", qx, wq, dx[..., 0])
    out = ops.linear(x, w, "float32", int4=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    # against the exact product: 4-bit weights cost up to ~10% of the output scale on Gaussian weights
    assert np.abs(out - x @ w.T).max() <= 0.15 * np.abs(x @ w.T).max()
    with pytest.raises(ValueError, match="K % 64"):
        ops.linear(x[:, :96], w[:, :96], "float32", int4=True)


def test_quantize_and_matmul_rate_arguments():
    w = rng.standard_normal((8, 128)).astype(np.float32)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        ops.quantize(w, 3)
    with pytest.raises(ValueError, match="K % 64"):
        ops.quantize(w[:, :96], 4)
    with pytest.raises(ValueError, match="must be positive"):
        ops.matmul_rate(0, 64, 64, "bfloat16", 1)
    with pytest.raises(ValueError, match="dtype"):
        ops.matmul_rate(4, 64, 64, "float16", 1)


@pytest.mark.parametrize("M", [1, 3, 4, 9, 37])
def test_linear_int8_against_numpy(M):
    x = rng.standard_normal((M, 192)).astype(np.float32)
    w = rng.standard_normal((70, 192)).astype(np.float32)
    qx, dx = q8_blocks(x)
    # the stored weight blocks, dequantised (d * q): their scales come from a search and need not be max|w| / 127, so
    # a plain Q8_0 re-quantisation of w is not the reference (it failed 9 of 630 outputs by 2e-3 for some draws of w)
    wq = ops.quantize(w, 8).astype(np.float64).reshape(70, 6, 32)
    # integer block dot products scaled by both block scales: what the VNNI kernel computes
    ref = np.einsum("mbk,nbk,mb->mn", qx, wq, dx[..., 0])
    out = ops.linear(x, w, "float32", True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
    # and against the exact product: int8 weights and activations cost ~1% here
    assert np.abs(out - x @ w.T).max() <= 0.02 * np.abs(x @ w.T).max()
    with pytest.raises(ValueError, match="K % 64"):
        ops.linear(x[:, :96], w[:, :96], "float32", True)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [2, 3, 5, 8, 13])
def test_linear_quant_batched_rows(M, bits):
    """The int8 / int4 kernels with several activation rows at once (a decode step of M requests; csrc/ops/quant.cpp:
    tiles of 16 weight rows, each weight vector used by every row of a group of 8 or 4 and the rest), under whichever
    CPU class runs (tests/test_isa.py runs this file under each). Against numpy: the int8 activation blocks times the
    stored weight blocks. N = 50 ends in a partial tile (2 rows: one half-tile of the ymm kernels unused); K = 256 has
    both nibbles of 4 int4 pairs. Rows at the integer extremes: constant activation blocks (q = +-127 everywhere)
    against constant weight rows (int8 q = +-127; int4 q = 7 or -8), the largest sums the AVX2 kernels' 16-bit
    steps see (int8 |q| x pairs: 2 x 127 x 127; int4 8 vectors of pairs (q + 8) x x: 8 x 2 x 15 x 127)."""
    K, N = 256, 50
    x = rng.standard_normal((M, K)).astype(np.float32) * rng.uniform(0.01, 100, (M, 1)).astype(np.float32)
    x[0, 32:64] = 0  # an all-zero activation block
    x[1] = 1.0  # q = 127 in every block
    if M > 2:
        x[2] = -3.0
    w = rng.standard_normal((N, K)).astype(np.float32)
    w[0], w[1], w[2] = 0.5, -0.5, np.where(np.arange(K) % 64 < 32, 2.0, -2.0)
    w[3, :64] = 0  # an all-zero weight pair
    wq = ops.quantize(w, bits).astype(np.float64)  # the stored blocks, dequantised (d * q)
    if bits == 4:
        assert np.all(np.abs(wq[0] / wq[0, 0] - 1) < 1e-6)
    qx, dx = q8_blocks(x)
    ref = np.einsum("mbk,nbk,mb->mn", qx, wq.reshape(N, -1, 32), dx[..., 0])
    kw = dict(int4=True) if bits == 4 else dict(int8=True)
    out = ops.linear(x, w, "float32", **kw)
    # f32 products of the two scales and an f32 sum over 8 blocks against float64: ~1e-6 of the terms
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # each row as if it ran alone: the rows of a step do not mix, to the bit
    for m in range(M):
        np.testing.assert_array_equal(out[m], ops.linear(x[m:m + 1], w, "float32", **kw)[0])


def test_int8_quantisation_rounds_the_f32_product():
    """q = round_half_even(x * (1 / d)) with the product rounded to f32 first, as q8_blocks (and ggml's
    quantize_row_q8_0) compute it: a value whose f32 product is a tie lands on the even level even where the exact
    product is not a tie (a fused multiply-add rounds the exact one: a Gaussian row's -65.4999989 became -65, not -66,
    and one output row of test_linear_paths_across_row_counts[4] a level off)."""
    d = np.float32(1) / np.float32(127)  # a block whose largest magnitude is 1
    inv = np.float32(1) / d
    ties = []
    for k in range(-126, 126):
        t = np.float32(k + 0.5)
        c = t / inv
        for cand in (c, np.nextafter(c, np.float32(-2)), np.nextafter(c, np.float32(2))):
            if np.float32(cand) * inv == t and float(cand) * float(inv) != float(t):
                ties.append(np.float32(cand))
    assert len(ties) >= 62, len(ties)
    row = np.zeros((1, 64 * ((len(ties) + 62) // 63)), np.float32)
    for i, v in enumerate(ties):  # each block: 1.0 first (its scale), then up to 31 ties
        row[0, (i // 31) * 32 + 1 + i % 31] = v
    row[0, ::32] = 1.0
    q, dd = q8_blocks(row)
    stored = ops.quantize(row, 8).reshape(1, -1, 32) / dd
    np.testing.assert_array_equal(np.rint(stored), q)


@pytest.mark.parametrize("M", [1, 4, 5, 8, 16, 17, 20, 64, 65, 300])
def test_linear_paths_across_row_counts(M):
    """Each matmul path a CPU class takes, by the rows M of a call (gl.cpu_info(): bf16_own_max_rows,
    int8_prefill_min_rows): decode kernels, gemmalens's own bf16 kernels (registers: AVX-512 in groups of 12, 8 and 4
    rows, so 8, 20 and 300 take each; or f32 panels past 16 rows on AVX2), oneDNN (bf16, or f32 on blocks widened
    from bf16 when the class has no bf16 hardware: the row-major LM head's layout past 4 rows, 1000 columns here, and
    int8 weights dequantised to bf16 on AMX), the int8 kernels.
    1088 x 1024: more than one widened block (~4 MB of f32), 17 panels of 64 columns, K in 8 slices of 128."""
    info = gemmalens.cpu_info()
    K, N = 1024, 1088
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    ref = bf16(x).astype(np.float64) @ bf16(w).astype(np.float64).T  # bf16 products, f32 accumulation
    tol = dict(rtol=1e-5, atol=2e-4 * np.abs(ref).max())
    out = ops.linear(x, w, "bfloat16")
    np.testing.assert_allclose(out, ref, **tol)
    if info["bf16_matmul"].endswith("_widen"):
        # gemmalens's own kernels sum every row in one order, whatever M and whichever kernel M picks (registers,
        # f32 panels, vdpbf16ps at decode sizes): a row's outputs are the same bits alone (continuous batching)
        for m in sorted({0, M // 2, M - 1}):
            np.testing.assert_array_equal(out[m], ops.linear(x[m:m + 1], w, "bfloat16")[0])
    np.testing.assert_allclose(ops.linear(x, w[:1000], "bfloat16", plain=True), ref[:, :1000], **tol)
    # int8: the kernels multiply int8 activation blocks; the dequantised path (AMX) the dequantised weights with bf16
    # activations
    wq = ops.quantize(w, 8).astype(np.float64)
    dequant = info["int8_prefill_min_rows"] is not None and M >= info["int8_prefill_min_rows"]
    # an activation right at a rounding tie may land on the other int8 level in C++ than in numpy (~1 in 10^4 here):
    # one level of one activation moves an output by at most dx * max|w|
    atol = 2e-4
    if not dequant:
        qx, dx = q8_blocks(x)
        ref8 = np.einsum("mbk,nbk,mb->mn", qx, wq.reshape(N, -1, 32), dx[..., 0])  # against the stored blocks
        atol = max(atol, 1.01 * dx.max() * np.abs(wq).max() / np.abs(ref8).max())
    else:
        assert info["int8_prefill"] == "dequant_bf16_onednn_amx"
        ref8 = bf16(x).astype(np.float64) @ bf16(wq.astype(np.float32)).astype(np.float64).T
    out8 = ops.linear(x, w, "float32", True)
    np.testing.assert_allclose(out8, ref8, rtol=1e-5, atol=atol * np.abs(ref8).max())
    assert np.mean(np.abs(out8 - ref8) <= 1e-5 * np.abs(ref8) + 2e-4 * np.abs(ref8).max()) >= 0.995
    assert np.abs(out8 - x @ w.T).max() <= 0.02 * np.abs(x @ w.T).max()
    # int4 the same way, against its stored 4-bit blocks
    w4 = ops.quantize(w, 4).astype(np.float64)
    if not dequant:
        ref4 = np.einsum("mbk,nbk,mb->mn", qx, w4.reshape(N, -1, 32), dx[..., 0])
    else:
        ref4 = bf16(x).astype(np.float64) @ bf16(w4.astype(np.float32)).astype(np.float64).T
    out4 = ops.linear(x, w, "float32", int4=True)
    np.testing.assert_allclose(out4, ref4, rtol=1e-5, atol=atol * np.abs(ref8).max())  # |w4| <= max|w| as for int8


def test_attention_seconds():
    """The bench's attention timer (bench/longctx_bench.py): a positive time for prefill and decode shapes, sliding
    and global, f32 and bf16 caches; bad arguments refused."""
    for T, past, window, dtype in ((64, 0, 16, "bfloat16"), (1, 300, 0, "bfloat16"), (2, 300, 64, "float32"),
                                   (1, 10, 64, "bfloat16")):
        for kv_int8 in (False, True):
            t = ops.attention_seconds(T, past, 4, 1, 64, window, dtype, 2, kv_int8)
            assert 0 < t < 1, (T, past, window, dtype, kv_int8, t)
    with pytest.raises(ValueError, match="H % KV"):
        ops.attention_seconds(1, 10, 3, 2, 64)
    with pytest.raises(ValueError, match="T, H, KV, Hd, reps >= 1"):
        ops.attention_seconds(0, 10, 4, 1, 64)
    with pytest.raises(ValueError, match="dtype"):
        ops.attention_seconds(1, 10, 4, 1, 64, 0, "float16")
    with pytest.raises(ValueError, match="kv_int8 needs Hd % 32 == 0"):
        ops.attention_seconds(1, 10, 4, 1, 48, 0, "bfloat16", 2, True)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 100, 4097])
def test_parallel_steal_runs_every_task_once(n):
    """ops/steal.h (the int8 / int4 kernels' split of their weight tiles): every task runs exactly once, whatever
    the count against the threads and the grain of 4."""
    runs, _ = ops.parallel_steal(n)
    assert runs.shape == (n,) and (runs == 1).all()


def test_parallel_steal_takes_a_slow_threads_share():
    """A thread that runs slow keeps few of its own tasks: the others take the back halves of its share. The
    caller's share (the first half with 2 threads) spins 200 microseconds per task when the caller runs it."""
    threads = ops.omp_max_threads()
    runs, by = ops.parallel_steal(400, 200.0)
    assert (runs == 1).all()
    if threads < 2:  # one thread runs them all
        assert (by == 0).all()
        return
    share = 400 // threads
    # static shares would leave all of them to the caller (0); the others take all but a few grains of 4
    assert (by[:share] == 1).sum() >= share // 2


def test_parallel_steal_refuses_a_bad_task_count():
    with pytest.raises(ValueError, match=r"n must be in \[0, 2\^24\]"):
        ops.parallel_steal(-1)
    with pytest.raises(ValueError, match=r"n must be in \[0, 2\^24\]"):
        ops.parallel_steal((1 << 24) + 1)
