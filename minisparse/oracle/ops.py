"""Pure NumPy reference of SPEC section 5 and the GLU feed-forward: forward, STE backward, and
the integer-code inference form. Backward passes are written out by hand (no autograd), so the
engine's ops can be checked against them.
"""

from __future__ import annotations

import numpy as np

from ..linear import resolve_linear
from ..quant import absmax_quantize, absmean_ternarize, dequantize
from ..sparsity import check_finite, check_float_array, topk_backward, topk_forward


def _check(op, **arrays):
    """Finite float arrays of one dtype (SPEC 1: non-finite input is a ValueError)."""
    for name, a in arrays.items():
        check_finite(op, name, check_float_array(op, name, a))
    dtypes = {name: a.dtype.name for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"{op}: arrays must share one float dtype, got {dtypes}")


def threshold_forward(x, tau):
    """SPEC 11: (Y = X ⊙ M, M = |X| > tau) for x [..., D] and a scalar tau >= 0 (strict: entries
    equal to tau are dropped); the backward is ``topk_backward`` with r = 1."""
    check_finite("threshold_forward", "x", check_float_array("threshold_forward", "x", x))
    tau = _tau("threshold_forward", tau)
    mask = np.abs(x) > tau
    return np.where(mask, x, 0), mask


def _tau(op, tau):
    tau = np.asarray(tau)
    if tau.shape != () or tau.dtype.kind != "f" or not np.isfinite(tau) or tau < 0:
        raise ValueError(f"{op}: tau must be a finite float scalar >= 0 (SPEC 11), got {tau!r}")
    return tau


def linear_parts(op, x, w, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                 ste=True, tau=None, x_codes=None, w_codes=None):
    """The pieces of SPEC 5 -> (z = sparsify(A(x)) [..., D_in], mask, r, Qw(w) [D_out, D_in]);
    mask and r are None when nothing is sparsified. ``tau`` (SPEC 11) replaces top-K by the
    threshold mask |A(x)| > tau with r = 1 (then sparsity, k and block must be unset).
    ``x_codes`` / ``w_codes`` (bits=1.58) replace the int8 / ternary codes of x / w, keeping
    their scales: the reference applied to another implementation's codes (SPEC 3, 10)."""
    _check(op, x=x, w=w)
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: expected x [..., D_in] and w [D_out, D_in], got x {x.shape} and "
                         f"w {w.shape}")
    k, block = resolve_linear(w.shape[1], sparsity=sparsity, k=k, block=block, rescale=rescale,
                              bits=bits, ste=ste, op=op)
    if tau is not None and (k is not None or block is not None or rescale != "none"):
        raise ValueError(f'{op}: tau (threshold sparsity) excludes sparsity, k, block and '
                         f'rescale="l2" (SPEC 11)')
    a = _codes(absmax_quantize(x), x_codes) if bits else x
    z, mask, r = a, None, None
    if tau is not None:
        mask = np.abs(a) > _tau(op, tau)
        z, r = np.where(mask, a, 0), np.ones((*a.shape[:-1], 1), a.dtype)
    elif k is not None or block is not None:  # the mask is computed on A(x), what it masks
        z, mask, r = topk_forward(a, k=k, block=block, rescale=rescale)
    return z, mask, r, _codes(absmean_ternarize(w), w_codes) if bits else w


def _codes(quantized, codes):
    """dequantize(q, s), with q replaced by ``codes`` when given (same shape)."""
    q, s = quantized
    if codes is not None:
        if np.shape(codes) != q.shape:
            raise ValueError(f"codes of shape {np.shape(codes)} must have the shape {q.shape}")
        q = np.asarray(codes)
    return dequantize(q, s)



def sparse_linear_forward(x, w, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                          tau=None):
    """Y [..., D_out] = sparsify(A(X)) @ Qw(W).T, X [..., D_in], W [D_out, D_in] (SPEC 5, eq. 8);
    sparsify is top-K / N:M, or SPEC 11's |A(X)| > tau when tau is given."""
    z, _, _, w_hat = linear_parts("sparse_linear_forward", x, w, sparsity=sparsity, k=k,
                                  block=block, rescale=rescale, bits=bits, tau=tau)
    return z @ w_hat.T


def sparse_linear_backward(grad_y, x, w, *, sparsity=0.0, k=None, block=None, rescale="none",
                           bits=None, ste=True, tau=None):
    """(dL/dX, dL/dW) under SPEC's STE rules: dX = topk_backward(g @ Qw(W)), dW = g^T z with
    z = sparsify(A(X)); quantizers pass g straight through, top-K gives r g or r M ⊙ g."""
    op = "sparse_linear_backward"
    z, mask, r, w_hat = linear_parts(op, x, w, sparsity=sparsity, k=k, block=block,
                                     rescale=rescale, bits=bits, ste=ste, tau=tau)
    _check(op, grad_y=grad_y, x=x)
    if grad_y.shape != (*x.shape[:-1], w.shape[0]):
        raise ValueError(f"{op}: grad_y must have shape {(*x.shape[:-1], w.shape[0])}, got "
                         f"{grad_y.shape}")
    grad_z = grad_y @ w_hat  # [..., D_out] @ [D_out, D_in]
    grad_x = grad_z if mask is None else topk_backward(grad_z, mask, r, ste)
    grad_w = grad_y.reshape(-1, w.shape[0]).T @ z.reshape(-1, w.shape[1])  # sum over tokens
    return grad_x, grad_w


def sparse_linear_magnitudes(grad_y, x, w, **kwargs):
    """(|Y|, |dX|, |dW|) bounds: each product of the layer over absolute values, e.g. |z| @ |Qw|.T;
    the ``scale`` to compare a layer's outputs with (``compare``): the size of the terms summed.

    Every step of SPEC 5 commutes with |.| (rint is odd, M and r depend on |x| only), so this is
    the layer itself at |x|, |w|, |g|."""
    x, w, grad_y = np.abs(x), np.abs(w), np.abs(grad_y)
    forward_kwargs = {k: v for k, v in kwargs.items() if k != "ste"}
    return (sparse_linear_forward(x, w, **forward_kwargs),
            *sparse_linear_backward(grad_y, x, w, **kwargs))


def sparse_linear_int(x, w, *, sparsity=0.0, k=None, block=None, rescale="none", tau=None):
    """Integer-code inference form of SPEC 5 with bits=1.58: Y = r (q ⊙ M) @ t.T / (s_x s_w).

    q int8 [..., D_in] and t int8 [D_out, D_in] multiply with int32 accumulation (exact while
    128 * D_in < 2^31); equals ``sparse_linear_forward(..., bits=1.58)`` to float rounding."""
    _, mask, r, _ = linear_parts("sparse_linear_int", x, w, sparsity=sparsity, k=k, block=block,
                                 rescale=rescale, bits=1.58, tau=tau)
    q, s_x = absmax_quantize(x)
    t, s_w = absmean_ternarize(w)
    if mask is not None:
        q = np.where(mask, q, 0)
    acc = q.astype(np.int32) @ t.T.astype(np.int32)  # [..., D_out], exact integers
    y = acc.astype(x.dtype) / (s_x * s_w)
    return y if r is None else r * y


# ---- the GLU feed-forward (SPEC 6): forward and hand-written backward ---------------------------


def _act(act, g):
    """(act(g), act'(g)): relu(g)^2 (Q-Sparse eq. 11) or silu(g) = g sigmoid(g)."""
    if act == "relu2":
        rg = np.maximum(g, 0)
        return rg * rg, 2 * rg
    if act == "silu":
        s = 0.5 * (1 + np.tanh(0.5 * g))  # sigmoid without overflow
        return g * s, s * (1 + g * (1 - s))
    raise ValueError(f'ffn: act must be "relu2" or "silu", got {act!r}')


def _check_ffn(op, h, up, gate, down):
    """up, gate [H, d] and down [d, H] for h [..., d]: a wrong shape is an error, never a
    broadcast (e.g. a gate of shape (1, d) against an up of (H, d))."""
    shapes = {name: np.shape(a) for name, a in (("up", up), ("gate", gate), ("down", down))}
    d = np.shape(h)[-1] if np.ndim(h) else None
    hidden = shapes["up"][0] if len(shapes["up"]) == 2 else None
    if (hidden is None or shapes["up"] != (hidden, d) or shapes["gate"] != (hidden, d)
            or shapes["down"] != (d, hidden)):
        raise ValueError(f"{op}: expected h [..., d], up and gate [H, d], down [d, H]; got h "
                         f"{np.shape(h)}, " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def ffn_forward(h, up, gate, down, *, act="relu2", **linear_kwargs):
    """y [..., d] = down(up(h) * act(gate(h))), each projection a sparse_linear_forward."""
    _check_ffn("ffn_forward", h, up, gate, down)
    u = sparse_linear_forward(h, up, **linear_kwargs)
    f = u * _act(act, sparse_linear_forward(h, gate, **linear_kwargs))[0]
    return sparse_linear_forward(f, down, **linear_kwargs)


def ffn_backward(grad_y, h, up, gate, down, *, act="relu2", ste=True, **linear_kwargs):
    """(dh, d_up, d_gate, d_down) of ``ffn_forward`` under the STE rules of each projection."""
    _check_ffn("ffn_backward", h, up, gate, down)
    u = sparse_linear_forward(h, up, **linear_kwargs)  # recompute the forward: pure function
    g = sparse_linear_forward(h, gate, **linear_kwargs)
    a, da = _act(act, g)
    grad_f, grad_down = sparse_linear_backward(grad_y, u * a, down, ste=ste, **linear_kwargs)
    grad_h_up, grad_up = sparse_linear_backward(grad_f * a, h, up, ste=ste, **linear_kwargs)
    grad_h_gate, grad_gate = sparse_linear_backward(grad_f * u * da, h, gate, ste=ste,
                                                    **linear_kwargs)
    return grad_h_up + grad_h_gate, grad_up, grad_gate, grad_down
