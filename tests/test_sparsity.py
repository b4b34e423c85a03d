"""SPEC sections 1-2: top-K and N:M block top-K, the reference functions and the autograd op."""

import math

import numpy as np
import pytest
from gradcheck import gradcheck
from hypothesis import given
from hypothesis import strategies as st
from strategies import random_arrays, rows_and_block, rows_and_k

from minisparse.sparsity import (
    block_topk_mask,
    k_for,
    sparsify,
    topk_backward,
    topk_forward,
    topk_mask,
)
from minisparse.tensor import Tensor, no_grad


def assert_topk_rule(x, mask, k):
    """Exactly k kept per row; kept are the k largest |x|; among equal |x| the lower index wins."""
    a = np.abs(x).reshape(-1, x.shape[-1])
    for row, kept in zip(a, mask.reshape(a.shape), strict=True):
        assert kept.sum() == k
        if k < len(row):
            assert row[kept].min() >= row[~kept].max()
            t = row[kept].min()  # the K-th magnitude: tied entries kept before dropped ones
            tied = np.flatnonzero(row == t)
            assert kept[tied].tolist() == sorted(kept[tied].tolist(), reverse=True)


# ---- k_for --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, sparsity, k", [(128, 0.5, 64), (10, 0.0, 10), (3, 0.99, 1),
                                            (7, 0.5, 4), (10, 0.7, 4), (1, 0.9, 1)])
def test_k_for_from_sparsity(d, sparsity, k):
    # (10, 0.7): (1 - 0.7) * 10 = 3.0000000000000004 in float64, so K = 4 (SPEC formula as is)
    assert k_for(d, sparsity=sparsity) == k


@given(st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_k_for_range(d, sparsity):
    k = k_for(d, sparsity=sparsity)
    assert 1 <= k <= d and k == max(1, math.ceil((1 - sparsity) * d))
    assert k_for(d, k=k) == k


# ---- the reference mask -------------------------------------------------------------------------


@given(rows_and_k())
def test_topk_keeps_exactly_k_largest_with_tie_rule(case):
    x, k = case
    y, mask, r = topk_forward(x, k=k)
    assert_topk_rule(x, mask, k)
    np.testing.assert_array_equal(mask, topk_mask(x, k))
    np.testing.assert_array_equal(y, np.where(mask, x, 0))
    assert y.dtype == x.dtype and r.shape == (*x.shape[:-1], 1) and (r == 1).all()


def test_tie_rule_examples():
    x = np.array([[1.0, -1.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert topk_mask(x, 3).tolist() == [[True, True, False, False, True],
                                        [True, True, True, False, False]]
    assert topk_mask(np.zeros((1, 4), np.float32), 2).tolist() == [[True, True, False, False]]


@given(rows_and_block())
def test_block_topk_keeps_n_per_block(case):
    x, (n, m) = case
    mask = block_topk_mask(x, n, m)
    blocks = x.reshape(-1, m)
    assert_topk_rule(blocks, mask.reshape(-1, m), n)
    y, mask2, _ = topk_forward(x, block=(n, m))
    np.testing.assert_array_equal(mask, mask2)
    np.testing.assert_array_equal(y, np.where(mask, x, 0))


@given(rows_and_k(), st.integers(-8, 8))
def test_topk_idempotent_and_commutes_with_positive_scaling(case, j):
    x, k = case
    y = topk_forward(x, k=k)[0]
    np.testing.assert_array_equal(topk_forward(y, k=k)[0], y)
    c = x.dtype.type(2.0**j)  # a power of two scales exactly, so it cannot make or break ties
    np.testing.assert_array_equal(topk_forward(c * x, k=k)[0], c * y)


# ---- re-scaling and backward --------------------------------------------------------------------


@given(rows_and_k(magnitudes=(1e-3, 1.0, 1e3)))
def test_l2_rescale_preserves_row_norm(case):
    x, k = case
    y, mask, r = topk_forward(x, k=k, rescale="l2")
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    norm, kept = (np.linalg.norm(a.astype(np.float64), axis=-1) for a in (x, np.where(mask, x, 0)))
    big = kept >= 1e-12  # below, SPEC's floor max(||X ⊙ M||, 1e-12) takes over
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1)[big], norm[big], rtol=tol, atol=0)
    np.testing.assert_allclose(r[~big, 0], norm[~big] / 1e-12, rtol=tol, atol=0)
    assert (r[big] >= 1 - tol).all() and r.dtype == x.dtype


@given(rows_and_k(), st.sampled_from(["none", "l2"]), st.data())
def test_backward_ste_is_identity_times_r_masked_is_m_g(case, rescale, data):
    x, k = case
    _, mask, r = topk_forward(x, k=k, rescale=rescale)
    g = data.draw(random_arrays(x.shape, dtype=x.dtype))
    np.testing.assert_array_equal(topk_backward(g, mask, r, ste=True), r * g)
    np.testing.assert_array_equal(topk_backward(g, mask, r, ste=False), mask * (r * g))


# ---- the autograd op ----------------------------------------------------------------------------


@given(rows_and_k(), st.sampled_from(["none", "l2"]), st.booleans())
def test_sparsify_matches_reference(case, rescale, ste):
    x, k = case
    g = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
    t = Tensor(x, requires_grad=True)
    out = sparsify(t, k=k, rescale=rescale, ste=ste)
    y, mask, r = topk_forward(x, k=k, rescale=rescale)
    np.testing.assert_array_equal(out.data, y)
    out.backward(g)
    np.testing.assert_array_equal(t.grad, topk_backward(g, mask, r, ste=ste))
    assert t.grad.dtype == x.dtype


@given(random_arrays((3, 6)), st.integers(1, 6))
def test_sparsify_masked_gradient_is_the_true_gradient(x, k):
    # Without ties and without rescale, X ⊙ M has derivative M: the masked backward is exact.
    gradcheck(lambda t: sparsify(t, k=k, ste=False), x)


@given(random_arrays((2, 8)), st.sampled_from(["none", "l2"]))
def test_sparsify_ste_is_the_gradient_of_its_surrogate(x, rescale):
    # SPEC 1 STE surrogate: Y ~ r * X with r held constant, so dL/dX = r * dL/dY.
    r = topk_forward(x, k=3, rescale=rescale)[2]
    t = Tensor(x, requires_grad=True)
    sparsify(t, k=3, rescale=rescale).sum().backward()
    np.testing.assert_array_equal(t.grad, np.broadcast_to(r, x.shape))


def test_sparsify_block_and_sparsity_and_no_grad():
    x = np.arange(-8, 8, dtype=np.float32).reshape(2, 8)
    t = Tensor(x, requires_grad=True)
    np.testing.assert_array_equal(sparsify(t, block=(2, 4)).data,
                                  topk_forward(x, block=(2, 4))[0])
    np.testing.assert_array_equal(sparsify(t, sparsity=0.5, block=(2, 4)).data,
                                  topk_forward(x, block=(2, 4))[0])
    np.testing.assert_array_equal(sparsify(t, sparsity=0.75).data, topk_forward(x, k=2)[0])
    with no_grad():
        assert not sparsify(t, k=2).requires_grad
    # a diverging run must reach the trainer's non-finite check: the autograd op doesn't raise
    assert sparsify(Tensor(np.array([np.nan, 1.0])), k=1).shape == (2,)


# ---- errors name the argument, the expectation and the value ------------------------------------

X = np.ones((2, 4), np.float32)


@pytest.mark.parametrize("call, error, words", [
    (lambda: k_for(4, k=5), ValueError, ["k", "[1, 4]", "5"]),
    (lambda: k_for(4, k=0), ValueError, ["k", "0"]),
    (lambda: k_for(4, k=2.0), TypeError, ["k", "integer", "2.0"]),
    (lambda: k_for(4, sparsity=1.0), ValueError, ["sparsity", "[0, 1)", "1.0"]),
    (lambda: k_for(4, sparsity=-0.1), ValueError, ["sparsity", "-0.1"]),
    (lambda: k_for(4, sparsity=float("nan")), ValueError, ["sparsity", "nan"]),
    (lambda: k_for(4), ValueError, ["exactly one of k or sparsity"]),
    (lambda: k_for(0, k=1), ValueError, ["d", "0"]),
    (lambda: topk_mask(X, 5), ValueError, ["topk_mask", "k", "[1, 4]", "5"]),
    (lambda: topk_mask(X.astype(np.int32), 1), TypeError, ["x", "float32 or float64", "int32"]),
    (lambda: topk_mask(X.astype(np.float16), 1), TypeError, ["x", "float16"]),
    (lambda: topk_mask(X.tolist(), 1), TypeError, ["x", "NumPy array", "list"]),
    (lambda: topk_mask(np.array([1.0, np.nan]), 1), ValueError, ["x", "finite", "nan", "(1,)"]),
    (lambda: topk_forward(np.array([[np.inf, 1.0]]), k=1), ValueError, ["x", "finite", "inf"]),
    (lambda: block_topk_mask(X, 1, 3), ValueError, ["M=3", "D=4", "D % M"]),
    (lambda: block_topk_mask(X, 3, 2), ValueError, ["block N", "[1, 2]", "3"]),
    (lambda: block_topk_mask(X, 1, 8), ValueError, ["block M", "8"]),
    (lambda: topk_forward(X, k=1, sparsity=0.5), ValueError, ["topk_forward", "k", "sparsity"]),
    (lambda: topk_forward(X, block=(1, 2), sparsity=0.25), ValueError, ["1:2", "0.5", "0.25"]),
    (lambda: topk_forward(X, block=(1, 2), k=1), ValueError, ["k or block"]),
    (lambda: topk_forward(X, block=(1, 2, 3)), ValueError, ["block", "(N, M)", "(1, 2, 3)"]),
    (lambda: topk_forward(X, k=1, rescale="l1"), ValueError, ["rescale", '"l2"', "l1"]),
    (lambda: topk_backward(X, np.ones((2, 3), bool), np.ones((2, 1))), ValueError,
     ["mask", "(2, 3)", "(2, 4)"]),
    (lambda: topk_backward(X, X > 0, np.ones((2, 4))), ValueError, ["r", "(2, 1)", "(2, 4)"]),
    (lambda: sparsify(X, k=1), TypeError, ["sparsify", "Tensor", "ndarray"]),
    (lambda: sparsify(Tensor(X), k=1, ste=1), TypeError, ["ste", "1"]),
    (lambda: sparsify(Tensor(X), k=9), ValueError, ["sparsify", "k", "9"]),
])
def test_invalid_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
