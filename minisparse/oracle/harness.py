"""Conformance harness: check an outside implementation against the reference (needs hypothesis).

Hypothesis strategies for the inputs that break sparsity and quantization kernels live here too,
so the package's own tests and the harness draw from the same cases.
"""

from __future__ import annotations

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as e:  # hypothesis is a dev dependency, not a core one
    raise ImportError("minisparse.oracle.harness needs hypothesis: pip install hypothesis "
                      "(or minisparse[dev])") from e

FLOAT_DTYPES = (np.float32, np.float64)

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


@st.composite
def feature_arrays(draw, dtype=None, d=None, kinds=KINDS, max_rows=4, max_d=24,
                   magnitudes=None):
    """Float arrays [*lead, D] (0-2 leading axes) of one of KINDS, each row at its own magnitude."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if dtype is None else np.dtype(dtype).type
    lead = draw(st.lists(st.integers(1, max_rows), max_size=2))
    shape = (*lead, draw(st.integers(1, max_d)) if d is None else d)
    kind = draw(st.sampled_from(kinds))
    if kind == "floats":
        width = 8 * np.dtype(dtype).itemsize
        x = draw(hnp.arrays(dtype, shape, elements=st.floats(-1, 1, width=width,
                                                            allow_subnormal=False)))
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
    row_scale = draw(hnp.arrays(dtype, (*shape[:-1], 1), elements=scales))
    return x * row_scale
