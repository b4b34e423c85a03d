"""Differentiable functions on Tensors: forward and backward of each op side by side.

Softmax, log-softmax, cross-entropy and rmsnorm are single fused ops (not compositions of the
elementwise ones): one pass each way, and the max-shift keeps them stable in float32.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from minisparse.tensor import Tensor, _axes, _pair


def _tensor(x):
    return x if isinstance(x, Tensor) else Tensor(x)


def _float(op, name, x):
    """``x`` as a float Tensor, or a TypeError naming op and argument."""
    x = _tensor(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{op}: {name} must be a float tensor, got {x.dtype} {x.shape}")
    return x


def _bool_mask(op, name, mask, shape):
    """A bool array that broadcasts to ``shape``, or a TypeError/ValueError naming it."""
    mask = np.asarray(mask.data if isinstance(mask, Tensor) else mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{op}: {name} must be a bool array, got {mask.dtype} {mask.shape}")
    try:
        np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        raise ValueError(f"{op}: {name} {mask.shape} does not broadcast with {shape}") from None
    return mask


# ---- elementwise -----------------------------------------------------------------------------
def exp(x):
    """e^x; d/dx = e^x (the output, captured)."""
    x = _float("exp", "x", x)
    out = np.exp(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g * out,), "exp")


def log(x):
    """Natural log; d/dx = 1/x."""
    x = _float("log", "x", x)
    return Tensor.from_op(np.log(x.data), (x,), lambda g: (g / x.data,), "log")


def sqrt(x):
    """sqrt(x); d/dx = 1 / (2 sqrt(x))."""
    x = _float("sqrt", "x", x)
    out = np.sqrt(x.data)
    return Tensor.from_op(out, (x,), lambda g: (g / (2 * out),), "sqrt")


def relu(x):
    """max(x, 0); d/dx = [x > 0]."""
    x = _float("relu", "x", x)
    return Tensor.from_op(np.maximum(x.data, 0), (x,), lambda g: (g * (x.data > 0),), "relu")


def sigmoid(a):
    """1 / (1 + exp(-a)) of an array, as (1 + tanh(a / 2)) / 2: no overflow for large |a|."""
    return 0.5 * (1 + np.tanh(0.5 * a))


def silu(x):
    """x * sigmoid(x); d/dx = s * (1 + x * (1 - s))."""
    x = _float("silu", "x", x)
    s = sigmoid(x.data)
    return Tensor.from_op(x.data * s, (x,), lambda g: (g * s * (1 + x.data * (1 - s)),), "silu")


def where(cond, a, b):
    """cond ? a : b elementwise (all broadcast); g flows to a where cond, to b elsewhere."""
    if isinstance(b, Tensor) and not isinstance(a, Tensor):  # a constant adopts b's dtype
        b, a = _pair(b, a, "where")
    else:
        a, b = _pair(_tensor(a), b, "where")
    cond = _bool_mask("where", "cond", cond, np.broadcast_shapes(a.shape, b.shape))
    out = np.where(cond, a.data, b.data)
    return Tensor.from_op(out, (a, b), lambda g: (np.where(cond, g, 0), np.where(cond, 0, g)),
                          "where")


def masked_fill(x, mask, value):
    """x with ``value`` (a scalar, e.g. -inf) where ``mask`` (bool, broadcasts to x); g is zeroed
    there."""
    x = _float("masked_fill", "x", x)
    mask = _bool_mask("masked_fill", "mask", mask, x.shape)
    if np.broadcast_shapes(mask.shape, x.shape) != x.shape:
        raise ValueError(f"masked_fill: mask {mask.shape} would grow x {x.shape}")
    out = np.where(mask, x.dtype.type(value), x.data)
    return Tensor.from_op(out, (x,), lambda g: (np.where(mask, 0, g),), "masked_fill")


# ---- joining and splitting -----------------------------------------------------------------
def concat(tensors, axis=0):
    """Join along ``axis``: shapes equal except there; backward splits g at the same offsets."""
    tensors = [_tensor(t) for t in tensors]
    if not tensors:
        raise ValueError("concat: tensors must be a non-empty sequence")
    shapes = [t.shape for t in tensors]
    ax = _axes("concat", axis, shapes[0])[0]
    if any(len(s) != len(shapes[0]) or s[:ax] + s[ax + 1:] != shapes[0][:ax] + shapes[0][ax + 1:]
           for s in shapes):
        raise ValueError(f"concat: tensors must match except on axis {axis}, got shapes {shapes}")
    if len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"concat: tensors must share one dtype, got "
                        f"{[str(t.dtype) for t in tensors]}")
    offsets = np.cumsum([s[ax] for s in shapes])[:-1]
    out = np.concatenate([t.data for t in tensors], axis=ax)
    return Tensor.from_op(out, tuple(tensors), lambda g: tuple(np.split(g, offsets, axis=ax)),
                          "concat")


def split(x, sizes_or_sections, axis=0):
    """Split along ``axis`` into ``n`` equal parts (an int) or parts of the given sizes (a
    list); each part is a slice of x, so its backward is getitem's."""
    x = _tensor(x)
    ax = _axes("split", axis, x.shape)[0]
    n = x.shape[ax]
    if isinstance(sizes_or_sections, (int, np.integer)):
        sections = int(sizes_or_sections)
        if sections <= 0 or n % sections:
            raise ValueError(f"split: axis {axis} of size {n} (shape {x.shape}) does not split "
                             f"into {sections} equal parts")
        sizes = [n // sections] * sections
    else:
        sizes = [int(s) for s in sizes_or_sections]
        if sum(sizes) != n or min(sizes, default=-1) < 0:
            raise ValueError(f"split: sizes {sizes} do not sum to axis {axis} of size {n} "
                             f"(shape {x.shape})")
    lead = (slice(None),) * ax
    return [x[lead + (slice(s, e),)] for s, e in pairwise(np.cumsum([0] + sizes).tolist())]


# ---- fused normalisations and losses -----------------------------------------------------------
def softmax(x, axis=-1):
    """s = exp(x - max) / sum(exp(x - max)) along ``axis``; dx = s * (g - sum(g * s))."""
    x = _float("softmax", "x", x)
    ax = _axes("softmax", axis, x.shape)
    e = np.exp(x.data - x.data.max(axis=ax, keepdims=True))
    s = e / e.sum(axis=ax, keepdims=True)
    return Tensor.from_op(s, (x,), lambda g: (s * (g - (g * s).sum(axis=ax, keepdims=True)),),
                          "softmax")


def log_softmax(x, axis=-1):
    """y = x - max - log(sum(exp(x - max))) along ``axis``; dx = g - exp(y) * sum(g)."""
    x = _float("log_softmax", "x", x)
    ax = _axes("log_softmax", axis, x.shape)
    z = x.data - x.data.max(axis=ax, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=ax, keepdims=True)
    out = z - np.log(total)
    return Tensor.from_op(out, (x,), lambda g: (g - e / total * g.sum(axis=ax, keepdims=True),),
                          "log_softmax")


def cross_entropy(logits, targets):
    """Mean over positions of -log softmax(logits)[target]: logits [..., V], targets int [...]
    in [0, V) -> scalar. dlogits = (softmax - onehot) * g / N."""
    logits = _float("cross_entropy", "logits", logits)
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if logits.ndim < 1 or logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: targets {t.shape} must match logits {logits.shape} "
                         f"without its last (class) axis")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integers, got {t.dtype} {t.shape}")
    V = logits.shape[-1]
    if t.size and (t.min() < 0 or t.max() >= V):
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) for logits "
                         f"{logits.shape}, got range [{t.min()}, {t.max()}]")
    z = logits.data.reshape(-1, V)
    rows, cols = np.arange(z.shape[0]), t.reshape(-1)
    z = z - z.max(axis=1, keepdims=True)  # shift by the row max: exp never overflows
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    n = z.shape[0]
    loss = (np.log(total[:, 0]) - z[rows, cols]).mean()

    def backward(g):
        grad = e / total
        grad[rows, cols] -= 1
        grad *= g / n
        return (grad.reshape(logits.shape),)

    return Tensor.from_op(np.asarray(loss, dtype=logits.dtype), (logits,), backward,
                          "cross_entropy")


def rmsnorm_operands(x, g):
    """(x, g) as float Tensors with g [d] the last axis of x [..., d], one dtype; or an error
    naming the problem (shared with the Numba twin, kernels/norm.py)."""
    x = _float("rmsnorm", "x", x)
    g = _float("rmsnorm", "g", g)
    if x.ndim < 1 or g.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm: g {g.shape} must be the last axis of x {x.shape}")
    if x.dtype != g.dtype:
        raise TypeError(f"rmsnorm: dtype mismatch, x is {x.dtype} and g is {g.dtype}")
    return x, g


def rmsnorm(x, g, eps=1e-6):
    """SPEC section 6: y = x / sqrt(mean(x^2, -1) + eps) * g; x [..., d], g [d].
    With xhat = x * r: dx = r * (dxhat - xhat * mean(dxhat * xhat, -1)), dxhat = dy * g."""
    x, g = rmsnorm_operands(x, g)
    # Overflow-safe (SPEC section 1): rows whose largest |x| exceeds 1 are divided by it first,
    # so mean(x^2) cannot overflow (1e38 in float32 would give r = 0 and all-zero logits).
    # Rows with max |x| <= 1 divide by exactly 1: bit-identical to the plain formula.
    m = np.maximum(np.abs(x.data).max(axis=-1, keepdims=True, initial=0), 1).astype(x.dtype)
    s = x.data / m
    inv = 1 / np.sqrt((s * s).mean(axis=-1, keepdims=True) + eps / m / m)
    xhat = s * inv
    r = inv / m  # = 1 / sqrt(mean(x^2) + eps), the factor of the backward

    def backward(dy):
        dxhat = dy * g.data
        dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, dy * xhat  # the engine sums dg over the leading axes

    return Tensor.from_op(xhat * g.data, (x, g), backward, "rmsnorm")


def embedding(weight, idx):
    """weight [V, d], idx int [...] in [0, V) -> weight[idx] [..., d]; backward scatter-adds g
    into the rows (np.add.at: repeated tokens add up)."""
    weight = _float("embedding", "weight", weight)
    idx = np.asarray(idx.data if isinstance(idx, Tensor) else idx)
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be [V, d], got {weight.shape}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: idx must be integers, got {idx.dtype} {idx.shape}")
    V = weight.shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= V):
        raise ValueError(f"embedding: idx must lie in [0, {V}) for weight {weight.shape}, got "
                         f"range [{idx.min()}, {idx.max()}]")
    return weight[idx]
