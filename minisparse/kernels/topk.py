"""Exact top-K masks (SPEC sections 1-2) compiled with Numba, parallel over rows.

Per row, the K-th largest |x| is found without sorting: for floats >= 0 the IEEE bit pattern,
read as an integer, orders like the value. One pass counts the |x| bit patterns by their top 11
bits (sign dropped: the exponent and the first mantissa bits) and walks the counts down to the
bucket holding the K-th largest; a bitwise binary search over the remaining bits, run on that
bucket's members only (each step a vectorised count of #{|x| >= t}), gives the largest t with
at least K entries >= t -- the K-th largest magnitude. Everything above t is kept, then the
first (lowest-index) entries equal to t until K are kept: exactly the order of
``np.argsort(-abs(x), kind="stable")``, the SPEC tie rule (-0.0 and 0.0 tie, as in np.abs).
Rows of up to 16 entries (N:M blocks, typically) skip all that: each entry is kept if fewer
than K entries come before it in that order, counted directly with D^2 comparisons.
N:M blocks are the same kernel on rows of length M (a [..., D] array viewed as [..., D/M, M]).
Like the training path of the reference, these kernels do not check for NaN/inf.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

# Below this many entries one thread does all rows: waking the thread pool costs ~0.1 ms.
PARALLEL_MIN_SIZE = 1 << 16


RADIX_BITS = 11  # the first pass sorts |x| into 2^11 buckets by its top bits
SMALL_ROW = 16  # rows up to this long (N:M blocks): every entry's rank counted, D^2 compares


@njit(cache=True, inline="always")
def _kth_largest(xb, low, nbits, k, counts, bucket):
    """The k-th largest of a_j = xb[j] & low (|x|'s bits, nbits of them) over one row;
    counts [2^RADIX_BITS] int32 and bucket [D] (xb's dtype) are scratch."""
    d, shift = xb.shape[0], nbits - RADIX_BITS
    counts[:] = 0
    top = 0
    for j in range(d):
        b = (xb[j] & low) >> shift
        counts[b] += 1
        top = max(top, b)
    above = 0  # entries in buckets above b
    b = top
    while above + counts[b] < k:
        above += counts[b]
        b -= 1
    m = 0  # the members of bucket b
    for j in range(d):
        a = xb[j] & low
        if a >> shift == b:
            bucket[m] = a
            m += 1
    t = b << shift
    for bit in range(shift - 1, -1, -1):  # the largest t with #{bucket >= t} >= k - above
        cand = t | (1 << bit)
        c = 0
        for j in range(m):
            c += bucket[j] >= cand
        if c >= k - above:
            t = cand
    return t


@njit(cache=True, inline="always")
def _scratch(xb):
    """``_kth_largest``'s buffers for rows like xb [..., D], allocated once per thread rather
    than per row (768 rows of 128: 511 -> 406 us on one thread)."""
    return np.empty(1 << RADIX_BITS, np.int32), np.empty(xb.shape[-1], xb.dtype)


@njit(cache=True, inline="always")
def _row_topk(x, xb, nbits, k, keep, y, scratch):
    """keep[:] = top-k mask of |x| for one row, y[:] = x ⊙ keep; xb = x's bits as signed ints;
    scratch = ``_scratch(xb)``."""
    d = x.shape[0]
    low = (1 << nbits) - 1  # clears the sign bit: |x|'s bits
    if d <= SMALL_ROW:  # keep j if fewer than k entries come before it in (-|x|, index) order
        for j in range(d):
            a, before = xb[j] & low, 0
            for i in range(d):
                b = xb[i] & low
                before += b > a or (b == a and i < j)
            keep[j] = before < k
    else:
        counts, bucket = scratch
        t = _kth_largest(xb, low, nbits, k, counts, bucket)
        above = 0
        for j in range(d):
            keep[j] = (xb[j] & low) > t
            above += keep[j]
        ties = k - above  # entries equal to the k-th largest that get in, lowest index first
        j = 0
        while ties > 0:
            if (xb[j] & low) == t:
                keep[j] = True
                ties -= 1
            j += 1
    for j in range(d):
        y[j] = x[j] if keep[j] else 0


@njit(parallel=True, cache=True)
def _topk_rows_parallel(x, xb, nbits, k, mask, y, parts):
    n = x.shape[0]
    for p in prange(parts):  # a block of rows per thread, one scratch per block
        scratch = _scratch(xb)
        for i in range(p * n // parts, (p + 1) * n // parts):
            _row_topk(x[i], xb[i], nbits, k, mask[i], y[i], scratch)


@njit(cache=True)
def _topk_rows_serial(x, xb, nbits, k, mask, y):
    scratch = _scratch(xb)
    for i in range(x.shape[0]):
        _row_topk(x[i], xb[i], nbits, k, mask[i], y[i], scratch)


@njit(cache=True)
def _row_indices(x, xb, nbits, k):
    """One row x [D] -> ascending int64 indices of its top k (serial: a decode step's token)."""
    keep = np.empty(x.shape[0], np.bool_)
    _row_topk(x, xb, nbits, k, keep, np.empty_like(x), _scratch(xb))
    return np.flatnonzero(keep)


def _bits(rows):
    """rows as signed ints of the float's width, and how many bits |x| has."""
    return (rows.view(np.int32), 31) if rows.dtype == np.float32 else (rows.view(np.int64), 63)


def _select(x, d, k):
    """(mask, x ⊙ mask) of [..., D] x, top-k within consecutive groups of d (d = D or M)."""
    rows = np.ascontiguousarray(x).reshape(-1, d)
    mask, y = np.empty(rows.shape, np.bool_), np.empty_like(rows)
    if rows.size < PARALLEL_MIN_SIZE:
        _topk_rows_serial(rows, *_bits(rows), k, mask, y)
    else:
        _topk_rows_parallel(rows, *_bits(rows), k, mask, y, get_num_threads())
    return mask.reshape(x.shape), y.reshape(x.shape)


def topk_select(x: np.ndarray, k=None, block=None):
    """(M, X ⊙ M) for X [..., D] float32/64: top-k per row (SPEC 1) or N:M blocks (SPEC 2)."""
    if block is None:
        d = x.shape[-1]
        if not 1 <= k <= d:
            raise ValueError(f"topk_mask: k must be in [1, {d}] for rows of size D={d}, got {k}")
        return _select(x, d, k)
    n, m = block
    if not 1 <= n <= m or x.shape[-1] % m:
        raise ValueError(f"block_topk_mask: need 1 <= N <= M and M | D, got N={n}, M={m}, "
                         f"D={x.shape[-1]}")
    return _select(x, m, n)


def topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Bool mask [..., D]: 1 at the k largest |x| per row, ties to the lower index (SPEC 1)."""
    return topk_select(x, k=k)[0]


def block_topk_mask(x: np.ndarray, n: int, m: int) -> np.ndarray:
    """Bool mask [..., D]: the n largest |x| in each block of m consecutive features (SPEC 2)."""
    return topk_select(x, block=(n, m))[0]


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """x [D] (one token) -> int64 [k]: the kept positions of topk_mask(x, k), ascending."""
    if x.ndim != 1 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"topk_indices: need a 1-d row and 1 <= k <= D, got shape {x.shape}, "
                         f"k={k}")
    x = np.ascontiguousarray(x)
    return _row_indices(x, *_bits(x), k)
