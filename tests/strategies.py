"""Hypothesis strategies shared by every test file (append your own at the end)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

seeds = st.integers(0, 2**32 - 1)


def shapes(min_dims=0, max_dims=4, min_side=1, max_side=4):
    """Small array shapes (kept small: gradient checks cost one forward pass per element)."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                            max_side=max_side)


def float_arrays(shape, bound=3.0, dtype=np.float64):
    """Hypothesis-chosen values in [-bound, bound] (shrinkable; may repeat values or hit 0)."""
    return hnp.arrays(dtype, shape, elements=st.floats(-bound, bound, allow_subnormal=False,
                                                      width=np.dtype(dtype).itemsize * 8))


def random_arrays(shape, low=-2.0, high=2.0, dtype=np.float64):
    """Uniform values from a drawn seed: no ties and no exact zeros, so kinks (relu at 0, ties
    in max/top-K) are hit with probability zero."""
    return seeds.map(lambda s: np.random.default_rng(s).uniform(low, high, shape).astype(dtype))


@st.composite
def broadcastable_arrays(draw, num=2, max_dims=4, max_side=4):
    """``num`` random float64 arrays whose shapes broadcast together (incl. rank differences)."""
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=num, min_dims=0, max_dims=max_dims,
                                                max_side=max_side))
    return [draw(random_arrays(shape)) for shape in bs.input_shapes]


@st.composite
def matmul_arrays(draw, max_batch_dims=2):
    """(a [..., m, k], b [..., k, n]) with broadcastable batch dims, incl. 2-D @ 2-D."""
    bs = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0,
                                                max_dims=max_batch_dims, max_side=3))
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    a_batch, b_batch = bs.input_shapes
    return draw(random_arrays(a_batch + (m, k))), draw(random_arrays(b_batch + (k, n)))


@st.composite
def axes(draw, ndim):
    """A valid ``axis`` argument for an array of ``ndim`` dims: None, an int (maybe negative) or a
    tuple of distinct ints."""
    if ndim == 0:
        return None
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1))
    chosen = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    return tuple(a - ndim if draw(st.booleans()) else a for a in chosen)


# --- sparsity / quant strategies ---
from minisparse.oracle.harness import feature_arrays  # noqa: E402  (shared with the harness)


@st.composite
def rows_and_k(draw, **kwargs):
    """(x [..., D], K) with K = 1, K = D or anything between; x from ``feature_arrays``."""
    x = draw(feature_arrays(**kwargs))
    d = x.shape[-1]
    return x, draw(st.one_of(st.just(1), st.just(d), st.integers(1, d)))


@st.composite
def rows_and_block(draw, **kwargs):
    """(x [..., D], (N, M)) with M dividing D and 1 <= N <= M."""
    m = draw(st.integers(1, 8))
    n = draw(st.one_of(st.just(1), st.just(m), st.integers(1, m)))
    x = draw(feature_arrays(d=m * draw(st.integers(1, 4)), **kwargs))
    return x, (n, m)
