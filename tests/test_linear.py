"""SPEC section 5: sparse_linear (top-K / N:M, rescale, bits 1.58, STE) and the GLU FFN."""

import numpy as np
import pytest
from gradcheck import gradcheck, numerical_grad
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import linear_kwargs, random_arrays

from minisparse import oracle
from minisparse.linear import feed_forward, sparse_linear
from minisparse.quant import absmax_quantize, absmean_ternarize, dequantize
from minisparse.sparsity import topk_forward
from minisparse.tensor import Tensor


def ste_surrogate(x0, w0, sparsity=0.0, k=None, block=None, rescale="none", bits=None, ste=True):
    """SPEC's STE surrogate of sparse_linear at (x0, w0): each quantizer is the identity plus a
    frozen offset, M and r are frozen, and with ste the mask leaves the derivative too. It equals
    the layer at (x0, w0), and its true gradient there is the STE gradient."""
    a0 = dequantize(*absmax_quantize(x0)) if bits else x0
    w_hat0 = dequantize(*absmean_ternarize(w0)) if bits else w0
    if k is None and block is None and not sparsity:
        z0, mask, r = a0, np.ones(a0.shape, bool), 1.0
    else:
        z0, mask, r = topk_forward(a0, k=k, sparsity=sparsity or None, block=block,
                                   rescale=rescale)
    linear = (lambda a: r * a) if ste else (lambda a: r * mask * a)

    def surrogate(x, w):
        z = linear(x + (a0 - x0)) + (z0 - linear(a0))
        return z @ (w + (w_hat0 - w0)).T

    return surrogate


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@given(random_arrays((3, 8)), random_arrays((5, 8)), linear_kwargs())
def test_gradient_is_the_ste_surrogate_gradient(backend, x0, w0, kwargs):
    x, w = Tensor(x0, requires_grad=True), Tensor(w0, requires_grad=True)
    y = sparse_linear(x, w, backend=backend, **kwargs)
    surrogate = ste_surrogate(x0, w0, **kwargs)
    np.testing.assert_allclose(surrogate(x0, w0), y.data, rtol=1e-12, atol=1e-12)
    cot = np.random.default_rng(0).standard_normal(y.shape)
    y.backward(cot)
    np.testing.assert_allclose(
        x.grad, numerical_grad(lambda a: (surrogate(a, w0) * cot).sum(), x0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        w.grad, numerical_grad(lambda b: (surrogate(x0, b) * cot).sum(), w0), rtol=1e-6, atol=1e-7)


@settings(max_examples=10)  # each example runs ~100 forward passes
@given(random_arrays((2, 2, 6)), random_arrays((3, 6)),
       st.sampled_from([{}, dict(sparsity=0.5), dict(k=2), dict(block=(1, 2))]))
def test_masked_full_precision_gradient_is_the_true_gradient(x, w, kwargs):
    # No ties, no quantizers, no rescale: the layer is linear near x, with derivative M.
    gradcheck(lambda a, b: sparse_linear(a, b, ste=False, backend="numpy", **kwargs), x, w)


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_feed_forward_gradient_and_oracle(act):
    rng = np.random.default_rng(1)
    h, up, gate, down = (rng.standard_normal(s) for s in [(2, 3, 8), (6, 8), (6, 8), (8, 6)])
    gradcheck(lambda *a: feed_forward(*a, act=act, backend="numpy"), h, up, gate, down)
    kwargs = dict(sparsity=0.5, bits=1.58, rescale="l2")
    ts = [Tensor(a, requires_grad=True) for a in (h, up, gate, down)]
    y = feed_forward(*ts, act=act, backend="numpy", **kwargs)
    np.testing.assert_allclose(y.data, oracle.ffn_forward(h, up, gate, down, act=act, **kwargs),
                               rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    y.backward(g)
    for t, ref in zip(ts, oracle.ffn_backward(g, h, up, gate, down, act=act, **kwargs),
                      strict=True):
        np.testing.assert_allclose(t.grad, ref, rtol=1e-10, atol=1e-12)


def test_relu2_is_q_sparse_eq_11():
    h, up, gate, down = (Tensor(np.eye(2)) for _ in range(4))
    gate = Tensor(np.array([[-2.0, 0.0], [0.0, 3.0]]))
    # u = h, g = h @ gate.T; f = u * relu(g)^2 = diag(0, 9); down = I
    np.testing.assert_array_equal(feed_forward(h, up, gate, down, backend="numpy").data,
                                  [[0, 0], [0, 9]])


@pytest.mark.parametrize("kwargs", [dict(k=3), dict(sparsity=0.5, bits=1.58, rescale="l2"),
                                    dict(block=(2, 4), ste=False)])
def test_numba_backend_agrees_with_numpy(kwargs):
    rng = np.random.default_rng(2)
    x0, w0 = rng.standard_normal((4, 8)), rng.standard_normal((3, 8))
    outs = []
    for backend in ("numpy", "numba"):
        x, w = Tensor(x0, requires_grad=True), Tensor(w0, requires_grad=True)
        y = sparse_linear(x, w, backend=backend, **kwargs)
        y.backward(np.ones(y.shape))
        outs.append((y.data, x.grad, w.grad))
    for ref, got in zip(*outs, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


X, W = Tensor(np.ones((2, 4), np.float32)), Tensor(np.ones((3, 4), np.float32))


@pytest.mark.parametrize("call, error, words", [
    (lambda: sparse_linear(X, W, bits=1), ValueError, ["bits", "1.58", "1"]),
    (lambda: sparse_linear(X, W, bits=True), ValueError, ["bits", "True"]),
    (lambda: sparse_linear(X, W, rescale="L2"), ValueError, ["rescale", "L2"]),
    (lambda: sparse_linear(X, W, ste="yes"), TypeError, ["ste", "yes"]),
    (lambda: sparse_linear(X, W, sparsity=1.0), ValueError, ["sparse_linear", "sparsity", "1.0"]),
    (lambda: sparse_linear(X, W, k=5), ValueError, ["sparse_linear", "k", "[1, 4]", "5"]),
    (lambda: sparse_linear(X, W, k=2, sparsity=0.5), ValueError, ["k", "sparsity"]),
    (lambda: sparse_linear(X, W, block=(2, 3)), ValueError, ["M=3", "D=4"]),
    (lambda: sparse_linear(X, W, block=(2, 4), sparsity=0.75), ValueError, ["2:4", "0.75"]),
    (lambda: sparse_linear(X, W, block=16), ValueError, ["block", "(N, M)", "16"]),
    (lambda: sparse_linear(X, W, backend="cuda"), ValueError, ["backend", "cuda"]),
    (lambda: sparse_linear(X, Tensor(np.ones((3, 5), np.float32))), ValueError,
     ["x", "(2, 4)", "(3, 5)"]),
    (lambda: sparse_linear(X.data, W), TypeError, ["x", "Tensor", "ndarray"]),
    (lambda: sparse_linear(X, W.data), TypeError, ["w", "Tensor", "ndarray"]),
    (lambda: feed_forward(X, W, W, W, act="gelu"), ValueError, ["act", "relu2", "gelu"]),
])
def test_invalid_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
