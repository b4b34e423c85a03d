"""Causal self-attention with RoPE as one fused autograd op: the training twin of the
reference's composition in ``model.Attention`` (SPEC 6), one parallel region per pass.

For each batch row b and head h (columns c0 = h·dh of q, k, v [B, T, d]), with Q, K the RoPE'd
heads (half-split, ``model.rope``) and s = 1/sqrt(dh):

    P = softmax(s · Q K^T + causal -inf),    O = P V                    (forward)
    dV = P^T dO,   dP = dO V^T,   dS = P ⊙ (dP - rowsum(dP ⊙ P)),
    dQ = rope^T(s · dS K),   dK = rope^T(s · dS^T Q)                     (backward)

Every product is an axpy over a contiguous row (LLVM vectorises it without reassociation);
a row's softmax may reassociate its max and its sum (``_softmax_row``: float rounding only);
masked entries of P are exactly 0, as exp(-inf) makes them in the reference.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..tensor import Tensor
from .exp import exp32
from .sparse_matmul import FMA


@njit(cache=True, inline="always")
def _padded(n):
    """n rounded up to a multiple of 8: whole vectors, no scalar loop tails."""
    return (n + 7) // 8 * 8


@njit(cache=True, inline="always")
def _head(x, b, c0, out):
    """out [T, dh] = x[b, :, c0:c0 + dh], contiguous."""
    for t in range(out.shape[0]):
        for c in range(out.shape[1]):
            out[t, c] = x[b, t, c0 + c]


@njit(cache=True, inline="always")
def _transposed(x):
    """x [T, dh] -> x^T [dh, T8], zero past T: products over positions run in whole vectors."""
    T, dh = x.shape
    out = np.zeros((dh, _padded(T)), x.dtype)
    for t in range(T):
        for c in range(dh):
            out[c, t] = x[t, c]
    return out


@njit(cache=True, inline="always")
def _rope(x, cos, sin):
    """x [T, dh] <- rope(x) = x·cos θ + [-x2, x1]·sin θ, in place."""
    half = x.shape[1] // 2
    for t in range(x.shape[0]):
        for c in range(half):
            x1, x2 = x[t, c], x[t, half + c]
            x[t, c] = x1 * cos[t, c] - x2 * sin[t, c]
            x[t, half + c] = x2 * cos[t, half + c] + x1 * sin[t, half + c]


@njit(cache=True, inline="always")
def _rope_transposed(g, cos, sin):
    """g [T, dh] <- rope^T(g) = g·cos θ + [g2, -g1]·sin θ, in place."""
    half = g.shape[1] // 2
    for t in range(g.shape[0]):
        for c in range(half):
            g1, g2 = g[t, c], g[t, half + c]
            g[t, c] = g1 * cos[t, c] + g2 * sin[t, half + c]
            g[t, half + c] = g2 * cos[t, half + c] - g1 * sin[t, c]


@njit(cache=True, inline="always")
def _put_head(x, out, b, c0):
    """out[b, :, c0:c0 + dh] = x [T, dh]."""
    for t in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[b, t, c0 + c] = x[t, c]


# Compiled on its own, not inlined, to keep its own flags: the max and the sum may
# reassociate (float rounding only), which lets them vectorise, and exp32 is plain arithmetic
# where np.exp was a libm call per entry (with both, the forward pass of SPEC 9's attention,
# B 12: 1.05-1.30x faster in five paired runs here).
@njit(cache=True, fastmath={"reassoc", "nsz", "contract"}, error_model="numpy")
def _softmax_row(s, n, scale):
    """s[:n] <- softmax(scale s[:n]), s[n:] <- 0: one causal row of P."""
    m = s[0] * scale
    for j in range(n):
        s[j] *= scale
        m = max(m, s[j])
    for j in range(n):
        s[j] = exp32(s[j] - m) if s.itemsize == 4 else np.exp(s[j] - m)
    total = s.dtype.type(0)
    for j in range(n):
        total += s[j]
    for j in range(n):
        s[j] /= total
    s[n:] = 0


@njit(parallel=True, cache=True, fastmath=FMA)
def _forward(q, k, v, cos, sin, n_heads, qr, kr, p, out):
    """out [B, T, d] = attention; keeps RoPE'd heads qr, kr [B, H, T, dh] and P [B, H, T, T8]."""
    B, T, d = q.shape
    dh = d // n_heads
    scale = q.dtype.type(1 / math.sqrt(dh))
    for bh in prange(B * n_heads):
        b, h = bh // n_heads, bh % n_heads
        c0 = h * dh
        Q, K, P = qr[b, h], kr[b, h], p[b, h]
        _head(q, b, c0, Q)
        _head(k, b, c0, K)
        _rope(Q, cos, sin)
        _rope(K, cos, sin)
        kt = _transposed(K)  # the scores become axpys over keys
        V = np.empty((T, dh), q.dtype)
        _head(v, b, c0, V)
        O = np.zeros((T, dh), q.dtype)
        for i in range(T):
            s = P[i]
            s[:] = 0
            n = _padded(i + 1)
            for c in range(dh):
                qc = Q[i, c]
                for j in range(n):
                    s[j] += qc * kt[c, j]
            _softmax_row(s, i + 1, scale)
            for j in range(i + 1):
                pj = s[j]
                for c in range(dh):
                    O[i, c] += pj * V[j, c]
        _put_head(O, out, b, c0)


@njit(parallel=True, cache=True, fastmath=FMA)
def _backward(g, v, cos, sin, qr, kr, p, dq, dk, dv):
    """dq, dk, dv [B, T, d] from dO = g [B, T, d] and the forward's qr, kr, P."""
    B, n_heads, T, dh = qr.shape
    scale = g.dtype.type(1 / math.sqrt(dh))
    for bh in prange(B * n_heads):
        b, h = bh // n_heads, bh % n_heads
        c0 = h * dh
        Q, K, P = qr[b, h], kr[b, h], p[b, h]
        V, G = np.empty((T, dh), g.dtype), np.empty((T, dh), g.dtype)
        _head(v, b, c0, V)
        _head(g, b, c0, G)
        vt = _transposed(V)  # dP = dO V^T as axpys over keys
        gq = np.zeros((T, dh), g.dtype)
        gk = np.zeros((T, dh), g.dtype)
        gv = np.zeros((T, dh), g.dtype)
        ds = np.empty(P.shape[1], g.dtype)
        for i in range(T):
            n = _padded(i + 1)
            ds[:n] = 0
            for c in range(dh):
                gc = G[i, c]
                for j in range(n):
                    ds[j] += gc * vt[c, j]
            dot = g.dtype.type(0)
            for j in range(n):
                dot += ds[j] * P[i, j]
            for j in range(i + 1):
                pj = P[i, j]
                dsj = pj * (ds[j] - dot) * scale
                for c in range(dh):
                    gv[j, c] += pj * G[i, c]
                    gq[i, c] += dsj * K[j, c]
                    gk[j, c] += dsj * Q[i, c]
        _rope_transposed(gq, cos, sin)
        _rope_transposed(gk, cos, sin)
        _put_head(gq, dq, b, c0)
        _put_head(gk, dk, b, c0)
        _put_head(gv, dv, b, c0)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, cos: np.ndarray, sin: np.ndarray,
                     n_heads: int) -> Tensor:
    """O [B, T, d] = causal softmax attention of q, k, v [B, T, d] (n_heads heads of d / n_heads
    columns), RoPE'd by cos, sin [T, dh] (positions 0..T-1): ``model.Attention``'s math."""
    if q.ndim != 3 or q.shape[2] % (2 * n_heads):
        raise ValueError(f"causal_attention: q must be [B, T, d] with d a multiple of "
                         f"2 * n_heads = {2 * n_heads}, got {q.shape}")
    B, T, d = q.shape
    dh = d // n_heads
    if k.shape != q.shape or v.shape != q.shape or cos.shape != (T, dh) or sin.shape != (T, dh):
        raise ValueError(f"causal_attention: q, k, v must be [B, T, d] alike and cos, sin "
                         f"[T, d / n_heads] = {(T, dh)}; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}, cos {cos.shape}, sin {sin.shape}")
    dtype = q.dtype
    qd, kd, vd = (np.ascontiguousarray(t.data) for t in (q, k, v))
    cos, sin = (np.ascontiguousarray(a, dtype) for a in (cos, sin))
    qr, kr = np.empty((B, n_heads, T, dh), dtype), np.empty((B, n_heads, T, dh), dtype)
    p = np.empty((B, n_heads, T, _padded(T)), dtype)  # rows padded to whole vectors
    out = np.empty((B, T, d), dtype)
    _forward(qd, kd, vd, cos, sin, n_heads, qr, kr, p, out)

    def backward(g):
        grads = [np.empty((B, T, d), dtype) for _ in range(3)]
        _backward(np.ascontiguousarray(g, dtype), vd, cos, sin, qr, kr, p, *grads)
        return tuple(grads)

    return Tensor.from_op(out, (q, k, v), backward, "causal_attention")
