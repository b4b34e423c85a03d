"""RMSNorm (SPEC 6, overflow-safe as SPEC 1 asks) as one fused autograd op: the training twin
of ``functions.rmsnorm``, one parallel region over rows each way.

Per row x [d], with m = max(max|x|, 1) (rows with max|x| <= 1 divide by exactly 1):

    r = 1 / (m · sqrt(mean((x/m)^2) + eps/m^2)),   xhat = x · r,   y = xhat ⊙ g
    dx = r · (dxhat - xhat · mean(dxhat ⊙ xhat)),  dxhat = dy ⊙ g,   dg = Σ_rows dy ⊙ xhat

dg sums fixed blocks of rows, then the blocks in order: the same bits on any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..functions import rmsnorm_operands
from ..tensor import Tensor
from .sparse_matmul import FMA

ROWS_PER_BLOCK = 64  # dg's partial sums: one per block of rows, whatever the thread count


@njit(parallel=True, cache=True, fastmath=FMA)
def _forward(x, g, eps, xhat, r, y):
    n, d = x.shape
    for i in prange(n):
        m = x.dtype.type(1)
        for c in range(d):
            m = max(m, abs(x[i, c]))
        ss = 0.0  # float64 sum of squares
        for c in range(d):
            s = x[i, c] / m
            ss += s * s
        inv = x.dtype.type(1 / np.sqrt(ss / d + eps / m / m))
        for c in range(d):
            xhat[i, c] = x[i, c] / m * inv
            y[i, c] = xhat[i, c] * g[c]
        r[i] = inv / m


@njit(parallel=True, cache=True, fastmath=FMA)
def _backward(dy, g, xhat, r, dx, dg_blocks):
    n, d = dy.shape
    for b in prange(dg_blocks.shape[0]):
        part = dg_blocks[b]
        part[:] = 0
        for i in range(b * ROWS_PER_BLOCK, min(n, (b + 1) * ROWS_PER_BLOCK)):
            dot = 0.0
            for c in range(d):
                dot += dy[i, c] * g[c] * xhat[i, c]
                part[c] += dy[i, c] * xhat[i, c]
            mean = dx.dtype.type(dot / d)
            for c in range(d):
                dx[i, c] = r[i] * (dy[i, c] * g[c] - xhat[i, c] * mean)


def rmsnorm(x, g, eps=1e-6):
    """y [..., d] = RMSNorm(x) ⊙ g for x [..., d], g [d]: ``functions.rmsnorm``'s math."""
    x, g = rmsnorm_operands(x, g)
    d = x.shape[-1]
    rows = np.ascontiguousarray(x.data).reshape(-1, d)
    xhat, y = np.empty_like(rows), np.empty_like(rows)
    r = np.empty(rows.shape[0], rows.dtype)
    _forward(rows, g.data, float(eps), xhat, r, y)

    def backward(dy):
        dy = np.ascontiguousarray(dy, rows.dtype).reshape(rows.shape)
        dx = np.empty_like(rows)
        blocks = np.empty((-(-rows.shape[0] // ROWS_PER_BLOCK), d), rows.dtype)
        _backward(dy, g.data, xhat, r, dx, blocks)
        return dx.reshape(x.shape), blocks.sum(axis=0)

    return Tensor.from_op(y.reshape(x.shape), (x, g), backward, "rmsnorm")
