"""SPEC sections 3-4: int8 absmax activations and ternary absmean weights (reference + STE ops)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import feature_arrays

from minisparse.quant import (
    absmax_quantize,
    absmean_ternarize,
    dequantize,
    quantize_activations,
    ternarize_weights,
)
from minisparse.tensor import Tensor

ROUNDING = {np.float32: 1e-4, np.float64: 1e-12}  # relative slack for x * s and q / s


@given(feature_arrays())
def test_absmax_codes_in_range_and_error_at_most_half_a_step(x):
    q, s = absmax_quantize(x)
    assert q.dtype == np.int8 and q.shape == x.shape
    assert s.dtype == x.dtype and s.shape == (*x.shape[:-1], 1)
    assert q.min(initial=0) >= -128 and q.max(initial=0) <= 127
    gamma = np.abs(x).max(axis=-1, keepdims=True)
    np.testing.assert_array_equal(s, 127 / np.maximum(gamma, x.dtype.type(1e-5)))
    half_step = 0.5 / s.astype(np.float64)
    err = np.abs(dequantize(q, s).astype(np.float64) - x)
    assert (err <= half_step * (1 + ROUNDING[x.dtype.type])).all()


@given(feature_arrays(kinds=("half",)))
def test_absmax_rounds_half_to_even(x):
    q, s = absmax_quantize(x)
    halves = x * s  # exact here: s is a power of two
    np.testing.assert_array_equal(q, np.rint(halves))
    assert np.all(np.abs(q - halves) <= 0.5)


def test_absmax_examples():
    x = np.array([[127.0, 2.5, -2.5, 3.5, 0.5, -0.5], [1e-7, 0, 0, 0, 0, 0]], np.float32)
    q, s = absmax_quantize(x)
    assert q.tolist() == [[127, 2, -2, 4, 0, 0], [1, 0, 0, 0, 0, 0]]  # ties to even; floor 1e-5
    assert s[1, 0] == np.float32(127) / np.float32(1e-5)


@given(feature_arrays(), st.integers(0, 3))
def test_absmax_scale_is_per_token(x, row):
    rows = x.reshape(-1, x.shape[-1])
    row = row % len(rows)
    q, s = absmax_quantize(rows)
    q1, s1 = absmax_quantize(rows[row:row + 1])
    np.testing.assert_array_equal(q[row:row + 1], q1)
    np.testing.assert_array_equal(s[row:row + 1], s1)


@given(feature_arrays())
def test_ternary_codes_and_scale_mean_abs(w):
    t, s = absmean_ternarize(w)
    assert t.dtype == np.int8 and set(np.unique(t)) <= {-1, 0, 1}
    assert np.ndim(s) == 0 and s.dtype == w.dtype
    alpha = np.abs(w).mean()
    assert s == 1 / max(alpha, w.dtype.type(1e-5))
    np.testing.assert_array_equal(t, np.clip(np.rint(w * s), -1, 1))
    np.testing.assert_array_equal(dequantize(t, s), t / s)
    assert dequantize(t, s).dtype == w.dtype


def test_ternary_example():
    w = np.array([[0.25, -0.5, 0.25], [0.0, 0.5, -1.5]])  # mean|w| = 0.5, so w * s = 2 w
    t, s = absmean_ternarize(w)
    assert s == 2.0 and t.tolist() == [[0, -1, 0], [0, 1, -1]]  # rint(0.5) = 0; -3 clips to -1


@given(feature_arrays(magnitudes=(1e-3, 1.0, 1e3)))
def test_autograd_ops_match_reference_with_identity_backward(x):
    g = np.random.default_rng(0).standard_normal(x.shape).astype(x.dtype)
    ops = ((quantize_activations, absmax_quantize), (ternarize_weights, absmean_ternarize))
    for op, ref in ops:
        t = Tensor(x, requires_grad=True)
        out = op(t)
        np.testing.assert_array_equal(out.data, dequantize(*ref(x)))
        assert out.dtype == x.dtype
        out.backward(g)
        np.testing.assert_array_equal(t.grad, g)  # STE: dQ/dx = identity (SPEC 3-4)


@pytest.mark.parametrize("call, error, words", [
    (lambda: absmax_quantize(np.array([1, 2])), TypeError, ["absmax_quantize", "x", "int64"]),
    (lambda: absmax_quantize(np.array([[1.0, np.nan]])), ValueError, ["x", "finite", "nan"]),
    (lambda: absmean_ternarize(np.array([1.0, -np.inf])), ValueError, ["w", "finite", "inf"]),
    (lambda: absmean_ternarize(np.float64(1.0)), TypeError, ["w", "NumPy array"]),
    (lambda: absmean_ternarize(np.array(1.0)), ValueError, ["w", "0-d"]),
    (lambda: quantize_activations(np.ones(3)), TypeError, ["quantize_activations", "Tensor"]),
    (lambda: ternarize_weights(Tensor(np.ones(3, np.int32))), TypeError, ["w", "int32"]),
])
def test_invalid_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"
