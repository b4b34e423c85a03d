"""Lesson 5 exercise: a sparse GEMV in Numba that reads only the kept inputs' weight rows."""

import numpy as np
from numba import njit


@njit(cache=False)
def sparse_gemv(x, idx, wt):
    """y [D_out] = Σ_p x[idx[p]] wt[idx[p], :]; x [D_in], idx [K], wt = W.T [D_in, D_out]."""
    y = np.zeros(wt.shape[1], wt.dtype)
    for p in range(idx.shape[0]):
        i = idx[p]
        xi = x[i]
        for o in range(wt.shape[1]):  # one contiguous row of wt: streamed, vectorised
            y[o] += xi * wt[i, o]
    return y
