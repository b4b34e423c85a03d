"""The GLU product u ⊙ act(z) (SPEC 6) as one fused autograd op: the training twin of
``FeedForward``'s ``up(h) * activation(gate(h))``, one parallel pass over rows each way.

    relu2: a = max(z, 0)^2,  a' = 2 max(z, 0)           (Q-Sparse eq. 11)
    silu:  a = z s,  s = (1 + tanh(z/2)) / 2,  a' = s (1 + z (1 - s))
    y = u ⊙ a(z),   du = dy ⊙ a(z),   dz = dy ⊙ u ⊙ a'(z)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..tensor import Tensor
from .sparse_matmul import FMA

RELU2, SILU = 0, 1
ACTIVATIONS = {"relu2": RELU2, "silu": SILU}


@njit(cache=True, inline="always")
def _act(z, act, zero):
    """(a(z), a'(z)); zero is 0 in z's dtype."""
    if act == RELU2:
        r = zero if z < zero else z  # max(z, 0), NaN stays NaN
        return r * r, 2 * r
    s = (1 + np.tanh(z / 2)) / 2
    return z * s, s * (1 + z * (1 - s))


@njit(parallel=True, cache=True, fastmath=FMA)
def _forward(u, z, act, y):
    for i in prange(u.shape[0]):
        for c in range(u.shape[1]):
            y[i, c] = u[i, c] * _act(z[i, c], act, y.dtype.type(0))[0]


@njit(parallel=True, cache=True, fastmath=FMA)
def _backward(dy, u, z, act, du, dz):
    for i in prange(u.shape[0]):
        for c in range(u.shape[1]):
            a, da = _act(z[i, c], act, du.dtype.type(0))
            du[i, c] = dy[i, c] * a
            dz[i, c] = dy[i, c] * u[i, c] * da


def glu(u: Tensor, z: Tensor, act: str) -> Tensor:
    """y [..., f] = u ⊙ act(z) for u, z [..., f] of one float dtype; act "relu2" or "silu"."""
    if act not in ACTIVATIONS:
        raise ValueError(f"glu: act must be one of {list(ACTIVATIONS)}, got {act!r}")
    if u.shape != z.shape or u.dtype != z.dtype or u.dtype.kind != "f" or u.ndim < 1:
        raise ValueError(f"glu: u and z must be float arrays of one shape and dtype, got u "
                         f"{u.dtype} {u.shape} and z {z.dtype} {z.shape}")
    f = u.shape[-1]
    ud, zd = (np.ascontiguousarray(t.data).reshape(-1, f) for t in (u, z))
    code = ACTIVATIONS[act]
    y = np.empty_like(ud)
    _forward(ud, zd, code, y)

    def backward(dy):
        du, dz = np.empty_like(ud), np.empty_like(ud)
        _backward(np.ascontiguousarray(dy, ud.dtype).reshape(ud.shape), ud, zd, code, du, dz)
        return du.reshape(u.shape), dz.reshape(z.shape)

    return Tensor.from_op(y.reshape(u.shape), (u, z), backward, "glu")
