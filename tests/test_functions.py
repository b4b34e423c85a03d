"""Differentiable functions: gradients vs central differences, forward vs plain NumPy, numerical
stability of the fused ops, and errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minisparse.functions as F
from minisparse.tensor import Tensor
from tests.gradcheck import gradcheck
from tests.strategies import broadcastable_arrays, random_arrays, seeds, shapes


@pytest.mark.parametrize("fn, low", [
    (F.exp, -2.0), (F.log, 0.2), (F.sqrt, 0.2), (F.relu, -2.0), (F.silu, -4.0),
])
@given(data=st.data())
def test_elementwise_grad(fn, low, data):
    x = data.draw(random_arrays(data.draw(shapes()), low, 4.0))
    gradcheck(fn, x)


def test_elementwise_forward():
    x = np.array([-30.0, -1.0, 0.0, 2.0, 40.0])
    np.testing.assert_allclose(F.relu(x).data, [0, 0, 0, 2, 40])
    np.testing.assert_allclose(F.silu(x).data, x / (1 + np.exp(-x)), rtol=1e-12, atol=1e-15)
    with np.errstate(over="raise", invalid="raise"):  # the tanh form of the sigmoid never overflows
        assert np.isfinite(F.silu(np.array([-1e4, 1e4], np.float32)).data).all()


@given(broadcastable_arrays(num=3), seeds)
def test_where_grad_with_broadcasting(arrays, seed):
    cond_shape, a, b = arrays[0].shape, arrays[1], arrays[2]
    cond = np.random.default_rng(seed).random(cond_shape) > 0.5
    gradcheck(lambda a, b: F.where(cond, a, b), a, b)
    gradcheck(lambda a: F.where(cond, 2.0, a), a)


@given(random_arrays((3, 4)), seeds)
def test_masked_fill(x, seed):
    mask = np.random.default_rng(seed).random(4) > 0.5  # broadcast over rows
    out = F.masked_fill(x, mask, -np.inf)
    np.testing.assert_array_equal(out.data, np.where(mask, -np.inf, x))
    gradcheck(lambda a: F.masked_fill(a, mask, 7.0), x)


@given(st.integers(0, 2), st.lists(st.integers(0, 3), min_size=1, max_size=4), st.data())
def test_concat_and_split_grad(axis, sizes, data):
    parts = [data.draw(random_arrays(tuple(s if d == axis else 2 for d in range(3))))
             for s in sizes]
    gradcheck(lambda *ts: F.concat(ts, axis=axis), *parts)
    whole = np.concatenate(parts, axis=axis)
    pieces = F.split(Tensor(whole), sizes, axis=axis)
    for piece, part in zip(pieces, parts, strict=True):
        np.testing.assert_array_equal(piece.data, part)
    weights = np.arange(1.0, len(sizes) + 1)
    gradcheck(lambda a: F.concat([p * w for p, w in zip(F.split(a, sizes, axis=axis), weights,
                                                        strict=True)], axis=axis), whole)


def test_split_into_equal_sections():
    q, k, v = F.split(Tensor(np.arange(12.0).reshape(2, 6)), 3, axis=-1)
    np.testing.assert_array_equal(k.data, [[2, 3], [8, 9]])


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax])
@given(data=st.data())
def test_softmax_grad(fn, data):
    shape = data.draw(shapes(min_dims=1, max_dims=3))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = data.draw(random_arrays(shape, -3.0, 3.0))
    gradcheck(lambda a: fn(a, axis=axis), x)


@given(random_arrays((3, 5), -3.0, 3.0))
def test_softmax_forward_matches_naive(x):
    naive = np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(F.softmax(x).data, naive, rtol=1e-12)
    np.testing.assert_allclose(F.log_softmax(x).data, np.log(naive), rtol=1e-12, atol=1e-12)


@given(st.integers(1, 6), st.integers(1, 5), seeds)
def test_cross_entropy_grad_and_value(n, v, seed):
    rng = np.random.default_rng(seed)
    logits = rng.uniform(-3, 3, (n, v))
    targets = rng.integers(0, v, n)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = F.cross_entropy(Tensor(logits), targets)
    np.testing.assert_allclose(loss.item(), -np.log(p[np.arange(n), targets]).mean(), rtol=1e-12)
    gradcheck(lambda a: F.cross_entropy(a, targets), logits)


def test_cross_entropy_takes_leading_dims_and_is_stable_in_float32():
    logits = np.array([[[1e4, 0.0, -1e4], [-1e4, 3.0, 3.0]]], np.float32)  # [1, 2, 3]
    targets = np.array([[0, 2]])
    x = Tensor(logits, requires_grad=True)
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        loss = F.cross_entropy(x, targets)
        loss.backward()
    assert loss.dtype == np.float32 and loss.shape == ()
    np.testing.assert_allclose(loss.item(), np.log(2) / 2, rtol=1e-6)
    np.testing.assert_allclose(x.grad, [[[0, 0, 0], [0, 0.25, -0.25]]], atol=1e-7)
    assert np.isfinite(F.log_softmax(logits).data).all()
    assert np.isfinite(F.softmax(logits).data).all()


@given(shapes(min_dims=1, max_dims=3), seeds)
def test_rmsnorm_grad_and_value(shape, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal(shape), rng.uniform(0.5, 1.5, shape[-1:])
    expected = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + 1e-6) * g
    np.testing.assert_allclose(F.rmsnorm(x, g, 1e-6).data, expected, rtol=1e-12)
    gradcheck(lambda a, b: F.rmsnorm(a, b, 1e-6), x, g)


@given(random_arrays((5, 3)), st.lists(st.integers(0, 4), min_size=1, max_size=8))
def test_embedding_gathers_and_scatter_adds(w, tokens):
    idx = np.array(tokens).reshape(1, -1)  # [1, T] -> [1, T, 3]
    np.testing.assert_array_equal(F.embedding(w, idx).data, w[idx])
    gradcheck(lambda a: F.embedding(a, idx), w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functions_keep_the_dtype(dtype):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 4)).astype(dtype), requires_grad=True)
    g = Tensor(np.ones(4, dtype), requires_grad=True)
    h = F.rmsnorm(x, g) + F.exp(x) * F.silu(x) - F.relu(x) + F.sqrt(x * x + 1) + F.log(x * x + 1)
    h = F.masked_fill(F.where(x.data > 0, h, 0.5), x.data < -1, -1.0)
    h = F.concat(F.split(F.softmax(h) + F.log_softmax(h, axis=0), [1, 3], axis=-1), axis=-1)
    loss = F.cross_entropy(h, np.zeros((2, 3), np.int64)) + F.embedding(g.reshape(2, 2),
                                                                        np.array([1])).sum()
    assert h.dtype == loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == g.grad.dtype == dtype


def test_error_messages():
    x = Tensor(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match=r"exp: x must be a float tensor, got int64 \(2,\)"):
        F.exp(np.array([1, 2]))
    with pytest.raises(TypeError, match=r"where: cond must be a bool array, got float64 \(3,\)"):
        F.where(np.ones(3), x, x)
    with pytest.raises(ValueError, match=r"masked_fill: mask \(4,\) does not broadcast with "
                                         r"\(2, 3\)"):
        F.masked_fill(x, np.ones(4, bool), 0.0)
    with pytest.raises(ValueError, match=r"masked_fill: mask \(5, 2, 3\) would grow x \(2, 3\)"):
        F.masked_fill(x, np.ones((5, 2, 3), bool), 0.0)
    with pytest.raises(ValueError, match=r"concat: tensors must match except on axis 0, got "
                                         r"shapes \[\(2, 3\), \(2, 4\)\]"):
        F.concat([x, Tensor(np.ones((2, 4), np.float32))])
    with pytest.raises(TypeError, match=r"concat: tensors must share one dtype"):
        F.concat([x, Tensor(np.ones((2, 3)))])
    with pytest.raises(ValueError, match=r"split: axis 1 of size 3 \(shape \(2, 3\)\) does not "
                                         r"split into 2 equal parts"):
        F.split(x, 2, axis=1)
    with pytest.raises(ValueError, match=r"split: sizes \[1, 1\] do not sum to axis -1 of size 3"):
        F.split(x, [1, 1], axis=-1)
    with pytest.raises(ValueError, match=r"softmax: axis 2 is out of range for shape \(2, 3\)"):
        F.softmax(x, axis=2)
    with pytest.raises(ValueError, match=r"cross_entropy: targets \(3,\) must match logits "
                                         r"\(2, 3\)"):
        F.cross_entropy(x, np.zeros(3, np.int64))
    with pytest.raises(TypeError, match=r"cross_entropy: targets must be integers, got float64"):
        F.cross_entropy(x, np.zeros(2))
    with pytest.raises(ValueError, match=r"cross_entropy: targets must lie in \[0, 3\) for "
                                         r"logits \(2, 3\), got range \[0, 3\]"):
        F.cross_entropy(x, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"rmsnorm: g \(2,\) must be the last axis of x \(2, 3\)"):
        F.rmsnorm(x, Tensor(np.ones(2, np.float32)))
    with pytest.raises(TypeError, match=r"rmsnorm: dtype mismatch, x is float32 and g is float64"):
        F.rmsnorm(x, Tensor(np.ones(3)))
    with pytest.raises(ValueError, match=r"embedding: weight must be \[V, d\], got \(3,\)"):
        F.embedding(Tensor(np.ones(3, np.float32)), np.array([0]))
    with pytest.raises(TypeError, match=r"embedding: idx must be integers, got float64 \(1,\)"):
        F.embedding(x, np.array([0.0]))
    with pytest.raises(ValueError, match=r"embedding: idx must lie in \[0, 2\) for weight "
                                         r"\(2, 3\), got range \[-1, 0\]"):
        F.embedding(x, np.array([0, -1]))


def test_softmax_and_cross_entropy_match_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((2, 5, 7)), rng.integers(0, 7, (2, 5))
    x = Tensor(logits, requires_grad=True)
    F.cross_entropy(x, targets).backward()
    tx = torch.tensor(logits, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tx.reshape(-1, 7), torch.tensor(targets).reshape(-1))
    tl.backward()
    np.testing.assert_allclose(F.cross_entropy(x, targets).item(), tl.item(), rtol=1e-12)
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(F.softmax(logits, axis=1).data,
                               torch.softmax(torch.tensor(logits), dim=1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype, big", [(np.float32, 1e38), (np.float64, 1e300)])
def test_rmsnorm_does_not_overflow_on_huge_finite_rows(dtype, big):
    """SPEC section 1 asks for overflow-safe norms: mean(x^2) of 1e38 float32 overflows, and the
    plain formula then returns all zeros (the logits of a diverging run collapse silently)."""
    rng = np.random.default_rng(0)
    row = rng.standard_normal(8)
    x = Tensor(np.stack([row * big, row]).astype(dtype), requires_grad=True)
    g = Tensor(np.ones(8, dtype), requires_grad=True)
    y = F.rmsnorm(x, g, 1e-6)
    expected = row / np.sqrt(np.mean(row * row))
    np.testing.assert_allclose(y.data[0], expected, rtol=1e-5)
    np.testing.assert_allclose(y.data[1], expected, rtol=1e-5)
    y.backward(np.ones_like(y.data))
    assert np.all(np.isfinite(x.grad)) and np.all(np.isfinite(g.grad))
