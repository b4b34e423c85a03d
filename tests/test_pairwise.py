"""kernels/pairwise.py: a compiled sum in NumPy's pairwise order, so a compiled RMSNorm (the
decode step's) equals functions.rmsnorm bit for bit."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import seeds

from minisparse.functions import rmsnorm
from minisparse.kernels.decode import _rmsnorm
from minisparse.kernels.pairwise import pairwise_sum
from minisparse.tensor import Tensor


def _values(seed, n, dtype):
    """n values spread over six decades (so the order of the adds changes the rounding)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 127, 128, 129, 136, 255, 256, 257, 512, 1280, 4099])
def test_pairwise_sum_equals_numpys_sum_bit_for_bit(n, dtype):
    for seed in range(20):
        a = _values(seed, n, dtype)
        assert dtype(pairwise_sum(a)) == np.add.reduce(a), (n, seed)


def test_a_sequential_sum_would_differ():
    """The test above can fail: in order, the float32 adds round differently on these rows."""
    rows = [_values(seed, 1280, np.float32) for seed in range(20)]
    sequential = [np.float32(np.cumsum(a, dtype=np.float32)[-1]) for a in rows]
    assert any(s != np.add.reduce(a) for s, a in zip(sequential, rows, strict=True))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 700), seeds, st.sampled_from([1e-3, 1.0, 1e3, 1e30]))
def test_decode_rmsnorm_equals_the_reference_bit_for_bit(d, seed, scale):
    """Including rows far above 1 (the overflow-safe division by max|x|, SPEC 1)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(d) * scale).astype(np.float32)
    g = rng.uniform(0.5, 1.5, d).astype(np.float32)
    want = rmsnorm(Tensor(x[None]), Tensor(g), eps=1e-6).data[0]
    out = np.full(d, np.nan, np.float32)
    got = _rmsnorm(x, g, 1e-6, out)
    assert got is out and np.isfinite(got).all()
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
