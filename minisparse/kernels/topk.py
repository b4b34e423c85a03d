"""Exact top-K masks (SPEC sections 1-2) compiled with Numba, parallel over rows.

Per row: find the K-th largest |x| (a selection, O(D)) as a threshold, keep everything above it,
then the first (lowest-index) entries equal to it until K are kept. That is exactly the order of
``np.argsort(-abs(x), kind="stable")`` -- the SPEC tie rule -- without sorting the row.
N:M blocks are the same kernel on rows of length M (a [..., D] array viewed as [..., D/M, M]).
Like the training path of the reference, these kernels do not check for NaN/inf.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _row_mask(x, k, keep):
    """keep[:] = top-k mask of |x| for one row x [D] (ties at the K-th magnitude: lower index)."""
    d = x.shape[0]
    a = np.abs(x)
    thr = np.partition(a, d - k)[d - k]  # the k-th largest |x|
    above = 0
    for j in range(d):
        above += a[j] > thr
    ties = k - above  # how many entries equal to thr still get in, lowest index first
    for j in range(d):
        if a[j] > thr:
            keep[j] = True
        elif a[j] == thr and ties > 0:
            keep[j] = True
            ties -= 1
        else:
            keep[j] = False


@njit(parallel=True, cache=True)
def _topk_rows(x, k):
    """x [N, D] -> bool mask [N, D], k ones per row."""
    n, d = x.shape
    mask = np.empty((n, d), np.bool_)
    for i in prange(n):
        _row_mask(x[i], k, mask[i])
    return mask


@njit(cache=True)
def _topk_row_indices(x, k):
    """x [D] -> int64 [k]: ascending indices of the top-k |x| (the kept inputs of one token)."""
    keep = np.empty(x.shape[0], np.bool_)
    _row_mask(x, k, keep)
    return np.flatnonzero(keep)


def _rows(x, d):
    """[..., D] float array as a C-contiguous [N, d] view (d = D, or M for N:M blocks)."""
    return np.ascontiguousarray(x).reshape(-1, d)


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Bool mask [..., D]: 1 at the k largest |x| per row, ties to the lower index (SPEC 1)."""
    d = x.shape[-1]
    if not 1 <= k <= d:
        raise ValueError(f"topk_mask: k must be in [1, {d}] for rows of size D={d}, got {k}")
    return _topk_rows(_rows(x, d), k).reshape(x.shape)


def block_topk_mask(x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Bool mask [..., D]: the n largest |x| in each block of m consecutive features (SPEC 2)."""
    if not 1 <= n <= m or x.shape[-1] % m:
        raise ValueError(f"block_topk_mask: need 1 <= N <= M and M | D, got N={n}, M={m}, "
                         f"D={x.shape[-1]}")
    return _topk_rows(_rows(x, m), n).reshape(x.shape)


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """x [D] (one token) -> int64 [k]: the kept positions of topk_mask(x, k), ascending."""
    if x.ndim != 1 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"topk_indices: need a 1-d row and 1 <= k <= D, got shape {x.shape}, "
                         f"k={k}")
    return _topk_row_indices(np.ascontiguousarray(x), k)
