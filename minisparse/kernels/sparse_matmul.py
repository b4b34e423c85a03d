"""Sparse-activation products that read only the weights of the kept inputs.

Layout: a projection W [D_out, D_in] (nn.Linear) is packed once as Wt = W.T, C-contiguous
[D_in, D_out]. Then y = W (x ⊙ M) = Σ_{i kept} x_i Wt[i, :] reads one contiguous row per kept
input -- (1 - S) of the weight bytes, streamed in order -- and the inner loop over outputs is an
axpy that LLVM vectorises to AVX2 FMAs. Eight kept rows are added per pass: the accumulator is
loaded and stored once per eight weight rows, and eight rows stream from memory side by side
(the loop is limited by memory traffic; eight measured 1.1x faster than four on weights that
come from DRAM, sixteen no faster than eight).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

# Below this many weights read (K * D_out) a GEMV runs on one thread: waking a thread pool costs
# more than it saves on a few MB of weights.
PARALLEL_MIN_WEIGHTS = 1 << 21


def pack_sparse_weights(w: np.ndarray) -> np.ndarray:
    """W [D_out, D_in] -> Wt [D_in, D_out], C-contiguous: row i = the weights input i feeds."""
    return np.ascontiguousarray(w.T)


# fastmath "contract" (a*b + c -> one FMA) must be on the compiled callers: an inlined body
# takes its caller's flags.
FMA = {"contract"}


@njit(cache=True, inline="always")
def _axpy_rows(x, idx, lo, hi, wt, acc):
    """acc[:] += Σ_{p in [lo, hi)} x[idx[p]] * wt[idx[p], :]  (eight rows per pass)."""
    n = acc.shape[0]
    p = lo
    while p + 8 <= hi:
        i0, i1, i2, i3, i4, i5, i6, i7 = idx[p:p + 8]
        x0, x1, x2, x3, x4, x5, x6, x7 = x[i0], x[i1], x[i2], x[i3], x[i4], x[i5], x[i6], x[i7]
        w0, w1, w2, w3 = wt[i0], wt[i1], wt[i2], wt[i3]
        w4, w5, w6, w7 = wt[i4], wt[i5], wt[i6], wt[i7]
        for o in range(n):  # 8 FMAs
            acc[o] = (acc[o] + x0 * w0[o] + x1 * w1[o] + x2 * w2[o] + x3 * w3[o]
                      + x4 * w4[o] + x5 * w5[o] + x6 * w6[o] + x7 * w7[o])
        p += 8
    while p < hi:
        x0, w0 = x[idx[p]], wt[idx[p]]
        for o in range(n):
            acc[o] += x0 * w0[o]
        p += 1


@njit(cache=True, fastmath=FMA)
def _gemv_serial(x, idx, wt):
    acc = np.zeros(wt.shape[1], wt.dtype)
    _axpy_rows(x, idx, 0, idx.shape[0], wt, acc)
    return acc


@njit(parallel=True, cache=True, fastmath=FMA)
def _gemv_parallel(x, idx, wt, parts):
    # Split the kept rows (not the outputs) between threads: each streams whole contiguous rows
    # into its own accumulator, and the partial sums are added at the end. One parallel region
    # only: np.zeros or an array expression here would each become a parfor of its own, and
    # every region pays a thread wake-up (tens of microseconds on a sleeping pool).
    k, n = idx.shape[0], wt.shape[1]
    acc = np.empty((parts, n), wt.dtype)
    for t in prange(parts):
        a = acc[t]
        for o in range(n):
            a[o] = 0
        _axpy_rows(x, idx, t * k // parts, (t + 1) * k // parts, wt, a)
    y = np.empty(n, wt.dtype)
    for o in range(n):
        s = acc[0, o]
        for t in range(1, parts):
            s += acc[t, o]
        y[o] = s
    return y


def sparse_gemv(x: np.ndarray, idx: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """y [D_out] = Σ_{i in idx} x[i] Wt[i, :] = W (x ⊙ M); x [D_in], idx [K], Wt [D_in, D_out]."""
    if idx.shape[0] * wt.shape[1] < PARALLEL_MIN_WEIGHTS:
        return _gemv_serial(x, idx, wt)
    return _gemv_parallel(x, idx, wt, get_num_threads())


@njit(parallel=True, cache=True, fastmath=FMA)
def _gemm_rows(x, mask, wt):
    n = x.shape[0]
    y = np.empty((n, wt.shape[1]), wt.dtype)  # zeroed inside the loop: np.zeros here would be
    for r in prange(n):                       # a parallel region (a thread wake-up) of its own
        y[r, :] = 0
        idx = np.flatnonzero(mask[r])
        _axpy_rows(x[r], idx, 0, idx.shape[0], wt, y[r])
    return y


def sparse_gemm(x: np.ndarray, mask: np.ndarray, wt: np.ndarray) -> np.ndarray:
    """Y [N, D_out] = (X ⊙ M) W^T; X, M [N, D_in] (each row its own kept set), Wt [D_in, D_out]."""
    return _gemm_rows(np.ascontiguousarray(x), np.ascontiguousarray(mask), wt)


@njit(parallel=True, cache=True, fastmath=FMA)
def _weight_grad_t(xt, mask_t, gy):
    # Row i of dWt only gathers the tokens that kept input i: (1 - S) of the dense work.
    d_in = xt.shape[0]
    gwt = np.empty((d_in, gy.shape[1]), gy.dtype)
    for i in prange(d_in):
        gwt[i, :] = 0
        rows = np.flatnonzero(mask_t[i])
        _axpy_rows(xt[i], rows, 0, rows.shape[0], gy, gwt[i])
    return gwt


def sparse_weight_grad(x: np.ndarray, mask: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """dW [D_out, D_in] = dY^T (X ⊙ M); X, M [N, D_in], dY [N, D_out] (a transposed view)."""
    gwt = _weight_grad_t(np.ascontiguousarray(x.T), np.ascontiguousarray(mask.T),
                         np.ascontiguousarray(gy))
    return gwt.T
