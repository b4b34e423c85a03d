"""The Numba kernels against the NumPy reference (the judge): masks bit for bit, integer
products exactly, float products and the fused op to float rounding."""

import os
import platform
import re
import subprocess
import sys

import llvmlite.binding as llvm
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit
from strategies import rows_and_block, rows_and_k

from minisparse import kernels
from minisparse import linear as reference
from minisparse.kernels import i2s, simd, sparse_matmul, ternary, topk
from minisparse.quant import absmax_quantize, absmean_ternarize
from minisparse.sparsity import block_topk_mask, topk_mask
from minisparse.tensor import Tensor, no_grad


@st.composite
def problems(draw, max_rows=9, max_in=70, max_out=40):
    """(x [N, D_in] with ties, W [D_out, D_in], K): odd sizes, one row or many, K = 1 .. D_in."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, d_in, d_out = (draw(st.integers(1, m)) for m in (max_rows, max_in, max_out))
    x = rng.standard_normal((n, d_in))
    if draw(st.booleans()):  # many equal magnitudes: the tie rule decides
        x = np.round(x * 2) / 2
    w = rng.standard_normal((d_out, d_in))
    k = draw(st.one_of(st.just(1), st.just(d_in), st.integers(1, d_in)))
    return x, w, k


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Run the kernels on both code paths (the size switches moved to 0 for "parallel")."""
    if request.param == "parallel":
        monkeypatch.setattr(sparse_matmul, "PARALLEL_MIN_WEIGHTS", 0)
        monkeypatch.setattr(ternary, "PARALLEL_MIN_CODES", 0)
        monkeypatch.setattr(ternary, "PARALLEL_MIN_SIZE", 0)
        monkeypatch.setattr(topk, "PARALLEL_MIN_SIZE", 0)
    return request.param


# the `threads` switch holds for every example of a test, so the fixture need not be reset
same_threads = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- masks: equal to the reference bit for bit ---


@same_threads
@given(st.one_of(rows_and_k(), rows_and_k(max_d=200)))  # rows <= SMALL_ROW and longer ones
def test_topk_mask_equals_reference(threads, case):
    x, k = case
    np.testing.assert_array_equal(kernels.topk_mask(x, k), topk_mask(x, k))


@given(st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]),
       st.integers(1, 200), st.data())
def test_topk_mask_on_magnitudes_that_share_a_radix_bucket(seed, dtype, d, data):
    # |x| bit patterns a few units apart around one bucket edge of the kernel's first pass: the
    # K-th largest is then decided by the binary search among many bucket members.
    rng = np.random.default_rng(seed)
    ints = np.int32 if dtype == np.float32 else np.int64
    nbits = 31 if dtype == np.float32 else 63
    shift = ints(nbits - topk.RADIX_BITS)
    finite = int(np.array(np.finfo(dtype).max, dtype).view(ints) >> shift)  # its bucket
    edge = ints(rng.integers(1, finite)) << shift
    bits = edge + rng.integers(-8, 8, d).astype(ints)
    x = bits.view(dtype) * np.where(rng.random(d) < 0.5, -1, 1).astype(dtype)
    k = data.draw(st.integers(1, d))
    np.testing.assert_array_equal(kernels.topk_mask(x[None], k), topk_mask(x[None], k))


@same_threads
@given(rows_and_block())
def test_block_topk_mask_equals_reference(threads, case):
    x, (n, m) = case
    np.testing.assert_array_equal(kernels.block_topk_mask(x, n, m), block_topk_mask(x, n, m))


@given(rows_and_k())
def test_topk_indices_are_the_kept_positions(case):
    x, k = case
    row = x.reshape(-1, x.shape[-1])[0]
    np.testing.assert_array_equal(kernels.topk_indices(row, k), np.flatnonzero(topk_mask(row, k)))


def test_topk_mask_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        kernels.topk_mask(np.ones((2, 3), np.float32), 4)
    with pytest.raises(ValueError, match="M | D"):
        kernels.block_topk_mask(np.ones((2, 6), np.float32), 2, 4)


# --- float products: equal to the dense product of the masked input ---


@same_threads
@given(problems())
def test_sparse_gemv_equals_masked_dense(threads, case):
    x, w, k = case
    row = x[0]
    idx = kernels.topk_indices(row, k)
    y = kernels.sparse_gemv(row, idx, kernels.pack_sparse_weights(w))
    np.testing.assert_allclose(y, w @ np.where(topk_mask(row, k), row, 0), rtol=1e-12, atol=1e-12)


@given(problems())
def test_sparse_gemm_and_weight_grad_equal_masked_dense(case):
    x, w, k = case
    mask = topk_mask(x, k)
    xm = np.where(mask, x, 0)
    gy = np.random.default_rng(1).standard_normal((x.shape[0], w.shape[0]))
    y = kernels.sparse_gemm(x, mask, kernels.pack_sparse_weights(w))
    np.testing.assert_allclose(y, xm @ w.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(kernels.sparse_weight_grad(x, mask, gy), gy.T @ xm,
                               rtol=1e-12, atol=1e-12)


# --- ternary: packing round trip, integer-exact products, int8 codes equal the reference ---


LAYOUTS = pytest.mark.parametrize("layout", ternary.LAYOUTS)


@LAYOUTS
@given(problems(max_in=300, max_out=300))
def test_pack_ternary_round_trip(layout, case):
    _, w, _ = case
    packed = kernels.pack_ternary(w, layout)
    t, s = absmean_ternarize(w)
    d_out, d_in = w.shape
    # 2 bits per weight, each row padded to whole 128-code blocks
    rows, row_bytes = (d_in, 32 * -(-d_out // 128)) if layout == "inputs" \
        else (d_out, 32 * -(-d_in // 128))
    assert packed.codes.dtype == np.uint8 and packed.codes.shape == (rows, row_bytes)
    assert packed.layout == layout and packed.shape == w.shape
    np.testing.assert_array_equal(kernels.unpack_ternary(packed), t)
    assert packed.scale == s


def test_pack_ternary_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        kernels.pack_ternary(np.ones((2, 3)), "columns")


@LAYOUTS
@settings(same_threads, max_examples=40)
@given(problems(max_in=300, max_out=600))
def test_ternary_product_is_integer_exact(threads, level, layout, case):
    x, w, k = case
    q, _ = absmax_quantize(x[:1] * 50)
    q = q[0]
    t, _ = absmean_ternarize(w)
    idx = kernels.topk_indices(q.astype(np.float64), k)
    exact = t[:, idx].astype(np.int64) @ q[idx].astype(np.int64)
    got = kernels.ternary_gemv_int(q, idx, kernels.pack_ternary(w, layout))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, exact)


@pytest.mark.parametrize("q_value", [-128, 127])
@pytest.mark.parametrize("sign", [1, -1])
def test_output_major_int16_sums_hold_the_extremes(threads, level, sign, q_value):
    # 2 blocks of 16 * 128 inputs and a partial one, every q at an extreme: with t = +1 (c = 2)
    # each int16 lane sums 16 blocks * 4 planes of 2 c q, i.e. exactly -32768 (q = -128) or
    # 32512 (q = 127) before its flush to int32; with t = -1 (c = 0) it stays 0.
    d_in = 2 * 16 * 128 + 70
    w = sign * np.ones((13, d_in))
    w[5] *= -1
    q = np.full(d_in, q_value, np.int8)
    idx = np.arange(d_in)
    t, _ = absmean_ternarize(w)
    got = kernels.ternary_gemv_int(q, idx, kernels.pack_ternary(w, "outputs"))
    np.testing.assert_array_equal(got, t.astype(np.int64) @ q.astype(np.int64))


@pytest.mark.parametrize("d_out", [130, 4100])  # code rows of 64 and 1056 bytes (SHORT_ROW)
@pytest.mark.parametrize("sign", [1, -1])
def test_ternary_int16_partial_sums_hold_the_extremes(threads, level, sign, d_out):
    # 300 rows of q = -128 against t = +1 and -1: |partial sums| reach 128 * 256 per flush;
    # on the SIMD paths every pair lane reaches -512 (c = 2) or 0 (c = 0), 16 pairs per flush
    # in short code rows and 32 in long ones (simd.LONG_ROWS_PER_PASS).
    w = sign * np.where(np.arange(300)[None, :] % 2 == 0, 1.0, -1.0) * np.ones((d_out, 1))
    q = np.full(300, -128, np.int8)
    idx = np.arange(300)
    t, _ = absmean_ternarize(w)
    got = kernels.ternary_gemv_int(q, idx, kernels.pack_ternary(w))
    np.testing.assert_array_equal(got, t.astype(np.int64) @ q.astype(np.int64))


@same_threads
@given(rows_and_k())
def test_quantize_rows_equals_reference(threads, case):
    x, _ = case
    q, s = kernels.quantize_rows(x)
    q_ref, s_ref = absmax_quantize(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert s.dtype == x.dtype


# --- the fused op: forward and gradients equal the reference composition ---

LINEAR_CASES = [
    dict(),
    dict(sparsity=0.5),
    dict(k=1),
    dict(sparsity=0.95),  # keep <= 1/10: the sparse product kernels
    dict(block=(2, 4)),
    dict(sparsity=0.5, rescale="l2"),
    dict(sparsity=0.5, ste=False),
    dict(sparsity=0.95, ste=False, rescale="l2"),
]


def _run(backend, x, w, g, **kwargs):
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    y = reference.sparse_linear(xt, wt, backend=backend, **kwargs)
    y.backward(g)
    return y.data, xt.grad, wt.grad


@pytest.mark.parametrize("bits", [None, 1.58])
@pytest.mark.parametrize("kwargs", LINEAR_CASES, ids=lambda kw: ",".join(map(str, kw.items())))
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), ties=st.booleans())
def test_fused_sparse_linear_equals_reference(kwargs, bits, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2
    w = rng.standard_normal((9, 40)).astype(np.float32)
    g = rng.standard_normal((2, 3, 9)).astype(np.float32)
    fast = _run("numba", x, w, g, bits=bits, **kwargs)
    slow = _run("numpy", x, w, g, bits=bits, **kwargs)
    for name, a, b in zip(("y", "dx", "dw"), fast, slow, strict=True):
        assert a.dtype == b.dtype == np.float32, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("sparse_inputs", [True, False])
@pytest.mark.parametrize("sparsity", [None, 0.5])
@pytest.mark.parametrize("bits", [None, 1.58])
@pytest.mark.parametrize("rescale", ["none", "l2"])
def test_packed_decode_equals_reference(bits, rescale, sparsity, sparse_inputs):
    # either ternary layout gives the product for any kept set (dense or top-K inputs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 48)).astype(np.float32)
    w = Tensor(rng.standard_normal((20, 48)).astype(np.float32), requires_grad=True)
    kw = dict(sparsity=sparsity, bits=bits, rescale=rescale)
    want = reference.sparse_linear(Tensor(x), w, backend="numpy", **kw).data
    w.packed = kernels.pack_linear(w.data, bits, sparse_inputs)
    with no_grad():
        got = reference.sparse_linear(Tensor(x), w, backend="numba", **kw).data
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.sampled_from([np.float32, np.float64]),
       st.sampled_from(["all", "topk", "threshold"]), st.sampled_from(["none", "l2"]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_packed_ternary_gemv_equals_the_oracle(d_in, dtype, rule, rescale, sparse_inputs, seed):
    # one token through PackedLinear.gemv: float32 takes the compiled token path (token.py),
    # other dtypes the NumPy one; both equal SPEC 5 on any width, either layout, any rule
    from minisparse import oracle

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d_in).astype(dtype)
    w = rng.standard_normal((int(rng.integers(1, 40)), d_in)).astype(dtype)
    k = int(rng.integers(1, d_in + 1)) if rule == "topk" else None
    tau = np.array(0.5, dtype) if rule == "threshold" else None
    rescale = "none" if tau is not None else rescale  # SPEC 11: a threshold keeps r = 1
    got = kernels.pack_linear(w, 1.58, sparse_inputs).gemv(x, k, rescale, tau)
    kw = dict(k=k, tau=tau, rescale=rescale)
    want = oracle.sparse_linear_forward(x[None], w, bits=1.58, **kw)[0]
    assert got.dtype == dtype
    # exact integer sums vs the oracle's float matmul: the harness's reduction tolerance,
    # relative to the size of the terms summed (|A(x)| @ |Qw(W)|.T), as for any kernel author
    # (an absolute 1e-6 failed on cancelling sums of 137 terms: 2.2e-6, before and after)
    scale = oracle.sparse_linear_magnitudes(np.ones((1, w.shape[0]), dtype), x[None], w,
                                            bits=1.58, **kw)[0][0]
    assert oracle.compare("PackedLinear.gemv", got, want, "reduction", scale) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_ternary_gemv_names_a_bad_rescale(dtype):
    packed = kernels.pack_linear(np.ones((3, 8), np.float32), 1.58)
    with pytest.raises(ValueError, match='rescale must be "none" or "l2", got \'L2\''):
        packed.gemv(np.ones(8, dtype), 4, "L2")


def test_pack_model_decodes_like_the_reference():
    model_mod = pytest.importorskip("minisparse.model")
    config = model_mod.GPTConfig(vocab_size=11, context=8, d_model=16, n_layers=1, n_heads=2,
                                 sparsity=0.5, bits=1.58)
    ref = model_mod.GPT(config, np.random.default_rng(0), backend="numpy")
    fast = model_mod.GPT(config, np.random.default_rng(0), backend="numba")
    assert kernels.pack_model(fast) == 7
    idx = np.array([[3, 1, 4, 1, 5]])
    cache_r, cache_f = model_mod.KVCache(config), model_mod.KVCache(config)
    for t in range(idx.shape[1]):  # one token at a time: the packed single-row path
        want, _ = ref(idx[:, t:t + 1], kv_cache=cache_r)
        got, _ = fast(idx[:, t:t + 1], kv_cache=cache_f)
        np.testing.assert_allclose(got.data, want.data, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="read-only"):
        fast.blocks[0].attn.q.weight.data *= 2  # a packed weight cannot silently go stale
    kernels.unpack_model(fast)
    fast.blocks[0].attn.q.weight.data *= 1


# --- the inner loops vectorise (a scalar fallback runs at a fraction of the speed) ---


def _fresh_asm(kernel, *args):
    """x86 assembly of a kernel compiled afresh (code loaded from the cache has none)."""
    fresh = njit(fastmath=kernel.targetoptions.get("fastmath", False))(kernel.py_func)
    fresh(*args)
    return "".join(fresh.inspect_asm().values())


_HOST = llvm.get_host_cpu_features().flatten()
# What "vectorised" looks like on this host: 256-bit ymm registers with AVX2, or 512-bit zmm
# where LLVM picks AVX-512 for the loop; any width counts, a scalar loop does not.
_WIDE = r"%[yz]mm"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64")
                    or "+avx2" not in _HOST or "+fma" not in _HOST,
                    reason="checks x86 assembly: needs an x86-64 CPU with AVX2 and FMA")
def test_inner_loops_use_vector_multiply_adds():
    x, idx = np.ones(8, np.float32), np.arange(8)
    asm = _fresh_asm(sparse_matmul._gemv_serial, x, idx, np.ones((8, 64), np.float32))
    assert re.search(r"vfmadd\w+ps\s[^\n]*" + _WIDE, asm), "sparse GEMV: no vector FMA"
    asm = _fresh_asm(ternary._ternary_serial, np.ones(8, np.int16), idx,
                     np.ones((8, 32), np.uint16), 128)  # code rows as uint16 words; D_out
    assert re.search(r"vpmullw\s[^\n]*" + _WIDE, asm), "ternary GEMV: no vector 16-bit multiply"


def test_simd_level_is_forced_by_the_environment(monkeypatch):
    monkeypatch.setenv("MINISPARSE_SIMD", "portable")
    assert simd.simd_level() == "portable"
    monkeypatch.setenv("MINISPARSE_SIMD", "sse9")
    with pytest.raises(ValueError, match="MINISPARSE_SIMD must be one of"):
        simd.simd_level()
    monkeypatch.delenv("MINISPARSE_SIMD")
    assert simd.simd_level() == simd.host_levels()[-1]


def test_simd_lanes_cover_each_tile_byte_once():
    for width in (32, 64):
        for group in (2, 4):
            lanes = simd.lane_bytes(width, group)
            assert lanes.shape == (group, width // group)
            assert sorted(lanes.ravel()) == list(range(width))


@pytest.mark.skipif("avx512vnni" not in simd.host_levels(),
                    reason="needs an x86-64 CPU with AVX-512 VNNI")
def test_vnni_kernel_issues_vpdpbusd():
    def tiles(codes, rows, xquads, scratch, sums):
        simd._tiles(64, codes, rows, xquads, 0, 1, scratch, sums)  # compiled here

    asm = _fresh_asm(njit(tiles), np.ones((8, 64), np.uint8), np.arange(8), np.ones(2, np.int32),
                     np.empty(256, np.int16), np.empty((1, 256), np.int32))
    assert re.search(r"vpdpbusd\s[^\n]*%zmm", asm), "VNNI ternary GEMV: no vpdpbusd"
    assert "vpmaddubsw" not in asm  # int32 quads, not the int16 pairs

    def rows(q, idx, codes):
        return i2s._rows_serial(64, True, q, idx, codes)  # inlined: compiled here

    asm = _fresh_asm(njit(rows), np.ones(256, np.int8), np.arange(256), np.ones((8, 64), np.uint8))
    assert re.search(r"vpdpbusd\s[^\n]*%zmm", asm), "VNNI I2_S GEMV: no vpdpbusd"
    assert "vpmaddubsw" not in asm


@pytest.mark.skipif("avx2" not in simd.host_levels(), reason="needs an x86-64 CPU with AVX2")
def test_simd_kernel_issues_vpmaddubsw():
    def tiles(codes, rows, xpairs, scratch, sums):
        simd._tiles(32, codes, rows, xpairs, 0, 1, scratch, sums)  # compiled here

    asm = _fresh_asm(njit(tiles), np.ones((8, 32), np.uint8), np.arange(8), np.ones(4, np.int16),
                     np.empty(128, np.int16), np.empty((1, 128), np.int32))
    assert re.search(r"vpmaddubsw\s[^\n]*%ymm", asm), "AVX2 ternary GEMV: no vpmaddubsw"

    def rows(q, idx, codes):
        return i2s._rows_serial(32, False, q, idx, codes)  # inlined: compiled here

    asm = _fresh_asm(njit(rows), np.ones(256, np.int8), np.arange(256), np.ones((8, 64), np.uint8))
    assert re.search(r"vpmaddubsw\s[^\n]*%ymm", asm), "AVX2 I2_S GEMV: no vpmaddubsw"


# --- the backend switch ---


def test_backend_switch(monkeypatch):
    monkeypatch.delenv("MINISPARSE_BACKEND", raising=False)
    monkeypatch.delenv("NUMBA_DISABLE_JIT", raising=False)
    assert kernels.default_backend() == "numba"
    with kernels.use_backend("numpy"):
        assert kernels.default_backend() == "numpy"
        with kernels.use_backend("numba"):
            assert kernels.default_backend() == "numba"
        assert kernels.default_backend() == "numpy"
    monkeypatch.setenv("MINISPARSE_BACKEND", "numpy")
    assert kernels.default_backend() == "numpy"
    monkeypatch.setenv("MINISPARSE_BACKEND", "numba")
    monkeypatch.setenv("NUMBA_DISABLE_JIT", "1")
    assert kernels.default_backend() == "numpy"
    with pytest.raises(ValueError, match="use_backend"):
        with kernels.use_backend("torch"):
            pass


def test_numba_disabled_runs_the_reference_and_the_python_kernels():
    script = """
import numpy as np
from minisparse import kernels, linear
from minisparse.sparsity import topk_mask
from minisparse.tensor import Tensor
assert kernels.default_backend() == "numpy"
x = np.round(np.random.default_rng(0).standard_normal((3, 10)), 1).astype(np.float32)
w = Tensor(np.ones((4, 10), np.float32))
y = linear.sparse_linear(Tensor(x), w, sparsity=0.5)      # reference composition
assert np.allclose(y.data, np.where(topk_mask(x, 5), x, 0) @ w.data.T)
assert (kernels.topk_mask(x, 5) == topk_mask(x, 5)).all()  # kernels as plain Python
from minisparse.kernels import simd
assert simd.simd_level() == "portable"  # no intrinsics when interpreted
q = np.array([-128, 127, 3, 0, -7], np.int8)
for layout in ("inputs", "outputs"):
    p = kernels.pack_ternary(np.array([[1.0, -1, 0, 1, 1], [0, 1, 1, -1, 0]]), layout)
    exact = kernels.unpack_ternary(p).astype(np.int64) @ q
    assert (kernels.ternary_gemv_int(q, np.arange(5), p) == exact).all(), layout
from minisparse.kernels.attention import causal_attention
v = Tensor(np.arange(8.0).reshape(1, 1, 8))
out = causal_attention(v, v, v, np.ones((1, 4)), np.zeros((1, 4)), 2)
assert (out.data == v.data).all()  # one position attends to itself only
from minisparse.kernels import pack_model
from minisparse.kernels.decode import decoder_for
from minisparse.model import GPT, GPTConfig, KVCache
for extra in (dict(sparsity=0.5, bits=1.58), dict(sparsity=0.5)):  # the decode step as Python
    config = GPTConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, context=12,
                       ffn_hidden=80, **extra)
    model = GPT(config, np.random.default_rng(3), backend="numba")
    pack_model(model)
    decoder, cache = decoder_for(model), KVCache(config)
    for token in [3, 0, 22, 7]:
        want = model(np.array([[token]]), kv_cache=cache)[0].data[0, -1]
        np.testing.assert_allclose(decoder.step(token), want, rtol=1e-4, atol=1e-5)
print("ok")
"""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
