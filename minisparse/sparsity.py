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
    _check_implied(op, n, m, sparsity)
    return None, (n, m)


def _mask(op, x, k, sparsity, block):
    k, block = resolve_topk(x.shape[-1], k, sparsity, block, op)
    return _topk_mask(x, k) if block is None else _block_topk_mask(x, *block)


RESCALES = ("none", "l2")


def _check_rescale(op, rescale):
    """The one check of SPEC 1's rescale option: "none" or "l2"."""
    if rescale not in RESCALES:
        raise ValueError(f'{op}: rescale must be "none" or "l2", got {rescale!r}')
    return rescale


def _rescale_factor(op, x, mask, rescale):
    """r [..., 1]: ||x||_2 / max(||x * mask||_2, 1e-12) for "l2" (norm-preserving), 1 for "none"."""
    if _check_rescale(op, rescale) == "none":
        return np.ones((*x.shape[:-1], 1), dtype=x.dtype)
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


# ---- SPEC section 11: threshold sparsity (training-free) ----------------------------------------


def threshold_mask(x, tau):
    """Bool mask [..., D]: |x| > tau (strict, so entries equal to tau are dropped; SPEC 11)."""
    check_finite("threshold_mask", "x", check_float_array("threshold_mask", "x", x))
    return _threshold_mask(x, _check_tau("threshold_mask", tau))


def _threshold_mask(x, tau):
    return np.abs(x) > tau


def _check_tau(op, tau):
    tau = np.asarray(tau)
    if tau.shape != () or tau.dtype.kind != "f" or not np.isfinite(tau) or tau < 0:
        raise ValueError(f"{op}: tau must be a finite float scalar >= 0, got {tau!r}")
    return tau


def calibrate_threshold(values, sparsity):
    """SPEC 11: tau = a_j of the collected |A(x)| sorted ascending (1-indexed), j = floor(S n)
    in float64 (tau = 0 if j = 0), so that about a fraction S of them is <= tau."""
    a = np.sort(np.abs(np.asarray(values, dtype=np.float64)).reshape(-1))
    _k_for("calibrate_threshold", 1, None, sparsity)  # S in [0, 1)
    j = math.floor(float(sparsity) * a.size)
    return 0.0 if j == 0 else float(a[j - 1])


# ---- sparsifier objects -------------------------------------------------------------------------
# One class per method. Each validates its options once, in its constructor; knows how many of a
# row's d_in inputs it keeps (kept_inputs, for SPEC 7's N_a); computes its reference forward
# (mask and factor r) and the autograd op whose backward is SPEC 1's (r g, or r M ⊙ g without the
# STE); and names its oracle op. Its fast twin lives in kernels/linear.py, chosen by type there.


def _check_ste(op, ste):
    if not isinstance(ste, bool):
        raise TypeError(f"{op}: ste must be True or False, got {ste!r}")
    return ste


class Sparsifier:
    """Base: the autograd op y = r (a ⊙ M) from ``forward``; dL/da = r g (STE) or r M ⊙ g."""

    oracle_op = None  # the minisparse.oracle op that states this method's math
    rescale = "none"

    def __init__(self, ste=True):
        self.ste = _check_ste(type(self).__name__, ste)

    def __call__(self, a: Tensor) -> Tensor:
        if not isinstance(a, Tensor):
            raise TypeError(f"{type(self).__name__}: expected a Tensor, got {type(a).__name__}")
        # No finiteness check: a diverging training run should reach its loss check, not raise.
        y, mask, r = self.forward(a.data)
        return Tensor.from_op(y, (a,), lambda g: (_topk_backward(g, mask, r, self.ste),),
                              type(self).__name__)

    def forward(self, a):
        """(y = r (a ⊙ M), M, r [..., 1]) for an ndarray a [..., D]."""
        mask = self.mask(a)
        r = _rescale_factor(type(self).__name__, a, mask, self.rescale)
        return np.where(mask, a, 0) * r, mask, r


class Dense(Sparsifier):
    """No sparsification: every input kept (sparsity 0)."""

    def kept_inputs(self, d_in):
        return d_in

    def __call__(self, a):
        return a


class TopK(Sparsifier):
    """SPEC 1: per row keep the K largest |a| (ties: lower index), K = k or K(S, D); re-scale."""

    oracle_op = "topk"

    def __init__(self, *, k=None, sparsity=None, rescale="none", ste=True):
        super().__init__(ste)
        if k is not None and sparsity is None:
            k = _int("TopK", "k", k, 1, math.inf)  # k <= D is checked against each row's D
        else:
            _k_for("TopK", 1, k, sparsity)  # exactly one of k / S; S in [0, 1)
        self.k, self.sparsity = k, sparsity
        self.rescale = _check_rescale("TopK", rescale)

    def kept_inputs(self, d_in):
        return _k_for("TopK", d_in, self.k, self.sparsity)

    def mask(self, a):
        return _topk_mask(a, self.kept_inputs(a.shape[-1]))


class BlockTopK(Sparsifier):
    """SPEC 2: keep the N largest |a| in every block of M consecutive inputs, block = (N, M)."""

    oracle_op = "block_topk"

    def __init__(self, block, *, rescale="none", ste=True):
        super().__init__(ste)
        if not _is_pair(block):
            raise ValueError(f"BlockTopK: block must be a pair (N, M), got {block!r}")
        m = _int("BlockTopK", "block M", block[1], 1, math.inf)
        self.n, self.m = _check_block("BlockTopK", block, m)
        self.rescale = _check_rescale("BlockTopK", rescale)

    @property
    def sparsity(self):
        return 1.0 - self.n / self.m

    def kept_inputs(self, d_in):
        _check_block("BlockTopK", (self.n, self.m), d_in)
        return d_in // self.m * self.n

    def mask(self, a):
        n, m = _check_block("BlockTopK", (self.n, self.m), a.shape[-1])
        return _block_topk_mask(a, n, m)


class Threshold(Sparsifier):
    """SPEC 11: M = |a| > tau (strict), r = 1. ``tau`` is a 0-d Tensor (a model parameter, read
    at every call); ``target`` is the calibration's S, which only N_a reports (the number kept
    per row varies: measure it)."""

    oracle_op = "threshold"

    def __init__(self, tau: Tensor, *, target=0.0, ste=True):
        super().__init__(ste)
        if not isinstance(tau, Tensor) or tau.shape != ():
            raise TypeError(f"Threshold: tau must be a 0-d Tensor, got {tau!r}")
        _k_for("Threshold", 1, None, target)  # target S in [0, 1)
        self.tau, self.target = tau, float(target)

    def kept_inputs(self, d_in):
        return _k_for("Threshold", d_in, None, self.target)  # the calibration target, not measured

    def mask(self, a):
        return _threshold_mask(a, _check_tau("Threshold", self.tau.data))


def make_sparsifier(*, sparsity=0.0, k=None, block=None, rescale="none", ste=True):
    """The sparsifier SPEC 5's keyword options describe: TopK (k, or sparsity > 0), BlockTopK
    (block; sparsity then None, 0 or 1 - N/M), else Dense."""
    if block is not None:
        if k is not None:
            raise ValueError(f"sparsify: give k or block, not both (got k={k!r}, block={block!r})")
        sparsifier = BlockTopK(block, rescale=rescale, ste=ste)
        _check_implied("sparsify", sparsifier.n, sparsifier.m, sparsity)
        return sparsifier
    if k is not None or sparsity:
        return TopK(k=k, sparsity=sparsity or None, rescale=rescale, ste=ste)
    _check_rescale("sparsify", rescale)
    return Dense(ste)


def _is_pair(block):
    return not isinstance(block, (str, bytes)) and hasattr(block, "__len__") and len(block) == 2


def _check_implied(op, n, m, sparsity):
    """N:M fixes the sparsity: sparsity must be None, 0 or 1 - N/M; -> 1 - N/M."""
    implied = 1 - n / m
    if sparsity not in (None, 0) and not (isinstance(sparsity, numbers.Real)
                                          and math.isclose(sparsity, implied, abs_tol=1e-9)):
        raise ValueError(f"{op}: block {n}:{m} implies sparsity {implied:g}, "
                         f"got sparsity={sparsity!r}")
    return implied


# ---- the autograd op ----------------------------------------------------------------------------


def sparsify(x: Tensor, k=None, sparsity=None, block=None, rescale="none", ste=True) -> Tensor:
    """Top-K (or N:M) sparsification of a Tensor [..., D]; backward r*g (STE) or r*M⊙g."""
    if not isinstance(x, Tensor):
        raise TypeError(f"sparsify: x must be a Tensor, got {type(x).__name__}")
    _check_ste("sparsify", ste)
    sparsifier = make_sparsifier(sparsity=sparsity, k=k, block=block, rescale=rescale, ste=ste)
    resolve_topk(x.shape[-1], k, sparsity, block, "sparsify")  # k <= D, M divides D
    return sparsifier(x)
