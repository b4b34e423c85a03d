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
# Defined next to the conformance harness, which draws its cases from the same strategies.
from minisparse.oracle.harness import (  # noqa: E402
    feature_arrays,  # noqa: F401
    rows_and_block,  # noqa: F401
    rows_and_k,  # noqa: F401
)


def linear_kwargs():
    """Keyword arguments of sparse_linear for inputs of 4 or more features (a multiple of 4):
    every mix of (sparsity | k | block), rescale, bits and ste."""
    sparse = st.sampled_from([dict(sparsity=0.0), dict(sparsity=0.5), dict(k=3), dict(k=1),
                              dict(block=(2, 4), sparsity=0.5), dict(block=(1, 4))])
    return st.builds(lambda s, rescale, bits, ste: dict(s, rescale=rescale, bits=bits, ste=ste),
                     sparse, st.sampled_from(["none", "l2"]), st.sampled_from([None, 1.58]),
                     st.booleans())
