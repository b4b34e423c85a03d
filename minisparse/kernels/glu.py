"""The GLU product u ⊙ act(z) (SPEC 6) as one fused autograd op: the training twin of
``FeedForward``'s ``up(h) * activation(gate(h))``, one parallel pass over rows each way.

    relu2: a = max(z, 0)^2,  a' = 2 max(z, 0)           (Q-Sparse eq. 11)
    silu:  a = z s,  s = (1 + tanh(z/2)) / 2,  a' = s (1 + z (1 - s))   (s from NumPy)
    y = u ⊙ a(z),   du = dy ⊙ a(z),   dz = dy ⊙ u ⊙ a'(z)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..functions import sigmoid
from ..tensor import Tensor
from .sparse_matmul import FMA

RELU2, SILU = 0, 1
ACTIVATIONS = {"relu2": RELU2, "silu": SILU}


@njit(cache=True, inline="always")
def _act(z, s, act, one):
    """(a(z), a'(z)) in z's dtype (one is 1 in it, so float32 stays float32); s = sigmoid(z)
    for silu."""
    if act == RELU2:
        r = z if not z < 0 else one - one  # max(z, 0); NaN stays NaN
        return r * r, (one + one) * r
    return z * s, s * (one + z * (one - s))


@njit(parallel=True, cache=True, fastmath=FMA)
def _forward(u, z, s, act, y):
    one = y.dtype.type(1)
    for i in prange(u.shape[0]):
        for c in range(u.shape[1]):
            y[i, c] = u[i, c] * _act(z[i, c], s[i, c], act, one)[0]


@njit(parallel=True, cache=True, fastmath=FMA)
def _backward(dy, u, z, s, act, du, dz):
    one = du.dtype.type(1)
    for i in prange(u.shape[0]):
        for c in range(u.shape[1]):
            a, da = _act(z[i, c], s[i, c], act, one)
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
    # silu's sigmoid by NumPy's vectorised tanh (functions.silu's): compiled code would call
    # libm once per element, 40x slower. relu2 reads no s (z stands in).
    s = sigmoid(zd) if code == SILU else zd
    y = np.empty_like(ud)
    _forward(ud, zd, s, code, y)

    def backward(dy):
        du, dz = np.empty_like(ud), np.empty_like(ud)
        _backward(np.ascontiguousarray(dy, ud.dtype).reshape(ud.shape), ud, zd, s, code, du, dz)
        return du.reshape(u.shape), dz.reshape(z.shape)

    return Tensor.from_op(y.reshape(u.shape), (u, z), backward, "glu")
