"""Element-wise hypothesis strategies for the package's own property tests (tests/strategies.py
re-exports them): rows with ties, all-equal rows, x * s exactly on .5, and per-row magnitudes,
each entry drawn by hypothesis. The conformance harness draws whole arrays from seeds instead
(``cases.py``)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = (np.float32, np.float64)

# ---- strategies -------------------------------------------------------------------------------

# Row magnitudes: tiny (below the 1e-5 floor of SPEC 3-4), ordinary and huge. Squares stay
# finite (SPEC 1's l2 rescale squares the entries), so float32 stops at 1e15.
MAGNITUDES = {
    np.float32: (1e-30, 1e-6, 1e-3, 1.0, 7.0, 1e3, 1e15),
    np.float64: (1e-150, 1e-30, 1e-6, 1e-3, 1.0, 7.0, 1e3, 1e15, 1e150),
}
# Kinds of rows: hypothesis floats; a few values with many (sign-blind) ties; all entries of
# equal magnitude; and x * s landing exactly on .5 (SPEC 3: row max 127 * 2^j, entries n/2 * 2^j).
KINDS = ("floats", "ties", "equal", "half")
_TIES = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0)


def _width(dtype):
    return 8 * np.dtype(dtype).itemsize


@st.composite
def feature_arrays(draw, dtype=None, d=None, lead=None, kinds=KINDS, max_d=24, magnitudes=None):
    """Float arrays [*lead, D] (lead: 0-2 axes of 1-4 if not given) of one of KINDS, each row at
    its own magnitude."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if dtype is None else np.dtype(dtype).type
    if lead is None:
        lead = draw(st.lists(st.integers(1, 4), max_size=2))
    shape = (*lead, draw(st.integers(1, max_d)) if d is None else d)
    kind = draw(st.sampled_from(kinds))
    if kind == "floats":
        elements = st.floats(-1, 1, width=_width(dtype), allow_subnormal=False)
        x = draw(hnp.arrays(dtype, shape, elements=elements))
    elif kind == "ties":
        x = draw(hnp.arrays(dtype, shape, elements=st.sampled_from(_TIES)))
    elif kind == "equal":
        signs = draw(hnp.arrays(bool, shape))
        x = np.where(signs, 1.0, -1.0).astype(dtype) * dtype(draw(st.sampled_from((0.5, 1, 3))))
    else:  # "half": with the row max 127, s = 127 / 127 = 1 exactly, so x * s = n + 1/2
        x = draw(hnp.arrays(dtype, shape, elements=st.integers(-253, 253).map(lambda n: n / 2)))
        x[..., draw(st.integers(0, shape[-1] - 1))] = 127.0
    if kind == "half":  # powers of two keep x * s exact
        scales = st.integers(-20, 20).map(lambda j: 2.0**j)
    else:
        scales = st.sampled_from([float(dtype(m)) for m in magnitudes or MAGNITUDES[dtype]])
    return x * draw(hnp.arrays(dtype, (*shape[:-1], 1), elements=scales))


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
