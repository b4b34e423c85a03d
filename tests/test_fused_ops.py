"""The fused RMSNorm (kernels/norm.py) and GLU (kernels/glu.py) ops against the reference ops
they replace on the Numba backend, forward and backward, and against finite differences."""

import numba
import numpy as np
import pytest
from gradcheck import gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse import functions
from minisparse.kernels import norm
from minisparse.kernels.glu import glu
from minisparse.linear import glu_activation
from minisparse.tensor import Tensor


def outputs(op, arrays, cotangent):
    """(y, grad of each input) of op(*Tensors) with the given cotangent."""
    ts = [Tensor(a.copy(), requires_grad=True) for a in arrays]
    y = op(*ts)
    y.backward(cotangent)
    return [y.data] + [t.grad for t in ts]


def assert_close(fused, ref, rtol, names):
    for a, b, name in zip(fused, ref, names, strict=True):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * (np.abs(b).max() + 1),
                                   err_msg=name)


@st.composite
def rows(draw, extra=0):
    """Arrays [lead..., d] (1-3 leading axes, rows past one dg block) at scales that need the
    overflow guard (1e30) and scales that do not."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lead = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    if draw(st.booleans()):
        lead = (draw(st.integers(60, 140)),)  # spans several of norm's ROWS_PER_BLOCK
    d = draw(st.integers(1, 40))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e30]))
    return [rng.standard_normal(lead + (d,)) * scale for _ in range(2 + extra)], rng


@settings(max_examples=60)
@given(rows(), st.sampled_from([np.float32, np.float64]))
def test_fused_rmsnorm_equals_the_reference(case, dtype):
    (x, dy), rng = case
    g = rng.standard_normal(x.shape[-1])
    arrays = [x.astype(dtype), g.astype(dtype)]
    if dtype == np.float32 and np.abs(x).max() > 1e30:
        arrays[0] = arrays[0] * np.float32(1e7)  # near float32's top: the guard's case
    eps = 1e-6
    fused = outputs(lambda x, g: norm.rmsnorm(x, g, eps), arrays, dy.astype(dtype))
    ref = outputs(lambda x, g: functions.rmsnorm(x, g, eps), arrays, dy.astype(dtype))
    assert np.isfinite(fused[0]).all()
    assert_close(fused, ref, 1e-12 if dtype == np.float64 else 2e-5, ("y", "dx", "dg"))


def test_fused_rmsnorm_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    gradcheck(lambda x, g: norm.rmsnorm(x, g, 1e-6), rng.standard_normal((3, 2, 5)),
              rng.standard_normal(5))


def test_fused_rmsnorm_dg_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    x, dy = (rng.standard_normal((3 * norm.ROWS_PER_BLOCK + 5, 24)).astype(np.float32)
             for _ in range(2))
    g = rng.standard_normal(24).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = outputs(lambda x, g: norm.rmsnorm(x, g), [x, g], dy)
    finally:
        numba.set_num_threads(before)
    many = outputs(lambda x, g: norm.rmsnorm(x, g), [x, g], dy)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_rmsnorm_names_bad_operands():
    with pytest.raises(ValueError, match=r"rmsnorm: g \(3,\) must be the last axis of x"):
        norm.rmsnorm(Tensor(np.ones((2, 4))), Tensor(np.ones(3)))
    with pytest.raises(TypeError, match="rmsnorm: dtype mismatch"):
        norm.rmsnorm(Tensor(np.ones((2, 4))), Tensor(np.ones(4, np.float32)))


@pytest.mark.parametrize("act", ["relu2", "silu"])
@settings(max_examples=40)
@given(case=rows(extra=1), dtype=st.sampled_from([np.float32, np.float64]))
def test_fused_glu_equals_the_reference(act, case, dtype):
    (u, z, dy), _ = case
    u, dy = u / max(1.0, np.abs(u).max()), dy / max(1.0, np.abs(dy).max())
    z = np.clip(z, -50, 50)  # finite products in float32
    arrays = [u.astype(dtype), z.astype(dtype)]
    activation = glu_activation(act)
    fused = outputs(lambda u, z: glu(u, z, act), arrays, dy.astype(dtype))
    ref = outputs(lambda u, z: u * activation(z), arrays, dy.astype(dtype))
    assert_close(fused, ref, 1e-12 if dtype == np.float64 else 2e-6, ("y", "du", "dz"))


@pytest.mark.parametrize("act", ["relu2", "silu"])
def test_fused_glu_gradient_matches_finite_differences(act):
    rng = np.random.default_rng(2)
    z = rng.standard_normal((4, 6))
    z[np.abs(z) < 1e-3] = 0.5  # away from relu's kink
    gradcheck(lambda u, z: glu(u, z, act), rng.standard_normal((4, 6)), z)


def test_fused_glu_keeps_nan_and_names_bad_operands():
    y = glu(Tensor(np.ones(3)), Tensor(np.array([np.nan, -np.inf, 2.0])), "relu2")
    assert np.isnan(y.data[0]) and y.data[1] == 0 and y.data[2] == 4
    with pytest.raises(ValueError, match="glu: act must be one of"):
        glu(Tensor(np.ones(3)), Tensor(np.ones(3)), "gelu")
    with pytest.raises(ValueError, match="glu: u and z must be float arrays of one shape"):
        glu(Tensor(np.ones(3)), Tensor(np.ones(4)), "silu")
