"""Top-K activation sparsity (SPEC sections 1-2; Q-Sparse eq. 2-3, 12-13).

The NumPy reference functions (``k_for``, ``topk_mask``, ``block_topk_mask``, ``topk_forward``,
``topk_backward``) are the source of truth for every faster implementation; ``sparsify`` is the
same math as an autograd op on the engine. All of them work on the last axis (features, size D),
keep the input's float dtype and touch no global state.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .tensor import Tensor

# ---- argument checks (shared with quant.py and the oracle) --------------------------------------


def check_float_array(op, name, x):
    """x if it is a float32/float64 ndarray with ndim >= 1, else a TypeError/ValueError."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a NumPy array, got {type(x).__name__}")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: {name} must have dtype float32 or float64, got {x.dtype} "
                        f"(shape {x.shape})")
    if x.ndim < 1:
        raise ValueError(f"{op}: {name} must have at least one axis (the feature axis), "
                         f"got a 0-d array")
    return x


def check_finite(op, name, x):
    """SPEC section 1: non-finite input to the functional reference is a ValueError."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{op}: {name} must be finite, got {x[first]} at index {first} "
                         f"(shape {x.shape})")
    return x


def _int(op, name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}], got {value}")
    return int(value)


def _check_block(op, block, d):
    """block = (N, M) with 1 <= N <= M and M dividing d (SPEC section 2)."""
    if isinstance(block, (str, bytes)) or not hasattr(block, "__len__") or len(block) != 2:
        raise ValueError(f"{op}: block must be a pair (N, M), got {block!r}")
    m = _int(op, "block M", block[1], 1, max(d, 1))
    n = _int(op, "block N", block[0], 1, m)
    if d % m:
        raise ValueError(f"{op}: block M={m} must divide the feature size D={d} (D % M == 0)")
    return n, m


# ---- SPEC section 1-2: the reference ------------------------------------------------------------


def k_for(d, k=None, sparsity=None):
    """K kept per row of size d: K = k (1 <= k <= d), or K = max(1, ceil((1 - S) d)), 0 <= S < 1.

    Evaluated in float64 exactly as written, so e.g. S = 0.7, d = 10 gives (1 - 0.7) * 10 =
    3.0000000000000004 and K = 4; every implementation must use this same expression."""
    return _k_for("k_for", d, k, sparsity)


def _k_for(op, d, k, sparsity):
    d = _int(op, "d", d, 1, math.inf)
    if (k is None) == (sparsity is None):
        raise ValueError(f"{op}: give exactly one of k or sparsity, got k={k!r}, "
                         f"sparsity={sparsity!r}")
    if k is not None:
        return _int(op, "k", k, 1, d)
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"{op}: sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:  # also rejects NaN
        raise ValueError(f"{op}: sparsity must be in [0, 1), got {sparsity!r}")
    return max(1, math.ceil((1.0 - float(sparsity)) * d))


def _topk_mask(x, k):
    # Tie rule (SPEC 1): rank by |x| descending, the lower index first among equals -- exactly
    # the order of a stable argsort of -|x|; keep the first k of that order.
    order = np.argsort(-np.abs(x), axis=-1, kind="stable")
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :k], True, axis=-1)
    return mask


def _block_topk_mask(x, n, m):
    # [..., D] -> [..., D/M, M]: N:M is top-N inside each block of M consecutive features.
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    return _topk_mask(blocks, n).reshape(x.shape)


def topk_mask(x, k):
    """Bool mask [..., D] with exactly k ones per row at the k largest |x|; ties: lower index."""
    check_finite("topk_mask", "x", check_float_array("topk_mask", "x", x))
    return _topk_mask(x, _int("topk_mask", "k", k, 1, x.shape[-1]))


def block_topk_mask(x, n, m):
    """Bool mask [..., D]: the n largest |x| in each block of m consecutive features (N:M)."""
    check_finite("block_topk_mask", "x", check_float_array("block_topk_mask", "x", x))
    n, m = _check_block("block_topk_mask", (n, m), x.shape[-1])
    return _block_topk_mask(x, n, m)


def resolve_topk(d, k=None, sparsity=None, block=None, op="resolve_topk"):
    """Validated (K, None) for top-K of rows of size d, or (None, (N, M)) for N:M block top-K.

    Give exactly one of k / sparsity (SPEC 1), or block (SPEC 2). N:M fixes the sparsity, so with
    a block k must be None and sparsity None, 0 or 1 - N/M (the model config's convention)."""
    if block is None:
        return _k_for(op, d, k, sparsity), None
    n, m = _check_block(op, block, d)
    if k is not None:
        raise ValueError(f"{op}: give k or block, not both (got k={k!r}, block={block!r})")
    implied = 1 - n / m
    if sparsity not in (None, 0) and not (isinstance(sparsity, numbers.Real)
                                          and math.isclose(sparsity, implied, abs_tol=1e-9)):
        raise ValueError(f"{op}: block {n}:{m} implies sparsity {implied:g}, "
                         f"got sparsity={sparsity!r}")
    return None, (n, m)


def _mask(op, x, k, sparsity, block):
    k, block = resolve_topk(x.shape[-1], k, sparsity, block, op)
    return _topk_mask(x, k) if block is None else _block_topk_mask(x, *block)


def _rescale_factor(op, x, mask, rescale):
    """r [..., 1]: ||x||_2 / max(||x * mask||_2, 1e-12) for "l2" (norm-preserving), 1 for "none"."""
    if rescale == "none":
        return np.ones((*x.shape[:-1], 1), dtype=x.dtype)
    if rescale != "l2":
        raise ValueError(f'{op}: rescale must be "none" or "l2", got {rescale!r}')
    # SPEC 1: norms without overflow or underflow for any finite row -- both are taken of the
    # row divided by its max|x| = m (as hypot does), so r = a / b with a = ||x / m||,
    # b = ||x * mask / m|| >= 1 (the max is always kept); the 1e-12 floor on m b only acts on
    # rows below 1e-12, where r = m a / 1e-12. An all-zero row gets r = 0.
    m = np.abs(x).max(axis=-1, keepdims=True)
    unit = x / np.where(m > 0, m, 1)
    kept = np.where(mask, unit, 0)
    a = np.sqrt(np.sum(unit * unit, axis=-1, keepdims=True))
    b = np.sqrt(np.sum(kept * kept, axis=-1, keepdims=True))
    small = m * b < 1e-12
    return np.where(small, np.where(small, m, 0) * a / x.dtype.type(1e-12),
                    a / np.where(small, 1, b))


def _topk_forward(op, x, k, sparsity, block, rescale):
    check_float_array(op, "x", x)
    mask = _mask(op, x, k, sparsity, block)
    r = _rescale_factor(op, x, mask, rescale)
    return np.where(mask, x, 0) * r, mask, r


def topk_forward(x, k=None, sparsity=None, block=None, rescale="none"):
    """Y = r * (X ⊙ M) [..., D] with M = Topk(|X|) (or N:M with block=(N, M)) -> (Y, M, r [..., 1]).

    Give exactly one of k / sparsity, or block (SPEC 1-2); r = 1 unless rescale="l2"."""
    check_finite("topk_forward", "x", check_float_array("topk_forward", "x", x))
    return _topk_forward("topk_forward", x, k, sparsity, block, rescale)


def topk_backward(grad_y, mask, r, ste=True):
    """dL/dX [..., D]: r * g with the straight-through estimator (eq. 13), r * M ⊙ g if not (12)."""
    check_finite("topk_backward", "grad_y", check_float_array("topk_backward", "grad_y", grad_y))
    return _topk_backward(grad_y, mask, r, ste)


def _topk_backward(grad_y, mask, r, ste):
    if mask.shape != grad_y.shape:
        raise ValueError(f"topk_backward: mask shape {mask.shape} must equal grad_y shape "
                         f"{grad_y.shape}")
    if r.shape != (*grad_y.shape[:-1], 1):
        raise ValueError(f"topk_backward: r must have shape {(*grad_y.shape[:-1], 1)} (one "
                         f"factor per row), got {r.shape}")
    grad = grad_y * r
    return grad if ste else np.where(mask, grad, 0)


# ---- the autograd op ----------------------------------------------------------------------------


def sparsify(x: Tensor, k=None, sparsity=None, block=None, rescale="none", ste=True) -> Tensor:
    """Top-K (or N:M) sparsification of a Tensor [..., D]; backward r*g (STE) or r*M⊙g."""
    if not isinstance(x, Tensor):
        raise TypeError(f"sparsify: x must be a Tensor, got {type(x).__name__}")
    if not isinstance(ste, bool):
        raise TypeError(f"sparsify: ste must be True or False, got {ste!r}")
    # No finiteness check here: a diverging training run should reach its loss check, not raise.
    y, mask, r = _topk_forward("sparsify", x.data, k, sparsity, block, rescale)
    return Tensor.from_op(y, (x,), lambda g: (_topk_backward(g, mask, r, ste),), "sparsify")
