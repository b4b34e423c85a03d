"""SparseLinear (SPEC 5) as one fused autograd op on the fast path, and packed inference weights.

Training: the mask, the int8 codes and the ternary weights come from the Numba kernels; the
products of the kept activations with the weights are BLAS matmuls on the masked rows, except
at high sparsity (keep <= 1/10), where the kernels that read only the kept inputs' weights win.
Backward is SPEC 1's STE (or the masked form) with the quantizers' STE identity:

    dX = r * (dY @ Qw(W))  [⊙ M if not ste],    dW = dY^T (r * A(X) ⊙ M).

``linear_forward`` is the fast twin of ``SparseLinear.reference``: it dispatches on the module's
method objects (sparsifier: Dense, TopK, BlockTopK, Threshold; quantizers: none or BitNet
b1.58) and fails loudly on a method it has no kernel for, rather than fall back to a slow path.

Decoding: ``pack_model`` attaches a ``PackedLinear`` to the weight of every SparseLinear (Wt = W^T
for float, 2-bit codes for ternary) and makes the weight array read-only, so a later in-place
update raises instead of leaving a stale copy; a single-token call then reads only the kept rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import tensor as engine
from ..linear import SparseLinear
from ..quant import (
    Int8Absmax,
    NoQuant,
    TernaryAbsmean,
    _absmean,  # no finiteness check: training must reach its own loss check
)
from ..sparsity import (
    BlockTopK,
    Dense,
    Threshold,
    TopK,
    _check_rescale,
    _rescale_factor,
    _threshold_mask,
)
from ..tensor import Tensor
from .simd import simd_level
from .sparse_matmul import pack_sparse_weights, sparse_gemm, sparse_gemv, sparse_weight_grad
from .ternary import PackedTernary, pack_ternary, quantize_rows, ternary_gemv_int
from .token import ALL, THRESHOLD, TOPK, token_inputs, token_outputs
from .topk import topk_indices, topk_select

SPARSE_PRODUCT_MAX_DENSITY = 0.1  # below this kept fraction the sparse kernels beat BLAS
PACKED_MAX_ROWS = 4  # rows up to which a packed weight is used row by row (decode steps)


def linear_forward(linear: SparseLinear, x: Tensor) -> Tensor:
    """SparseLinear(X) on the fast path: the kernel arguments of the module's methods."""
    return sparse_linear(x, linear.weight, **kernel_options(linear), observe=linear.observe)


def kernel_options(linear: SparseLinear) -> dict:
    """The fused op's arguments for a SparseLinear; TypeError for a method with no kernel."""
    if type(linear) is not SparseLinear:
        raise TypeError(f"no fast kernel for the projection type {type(linear).__name__}")
    quant = (type(linear.act_quant), type(linear.weight_quant))
    if quant not in ((NoQuant, NoQuant), (Int8Absmax, TernaryAbsmean)):
        raise TypeError(f"no fast kernel for the quantizers {quant[0].__name__} (activations) "
                        f"+ {quant[1].__name__} (weights)")
    s = linear.sparsifier
    options = dict(bits=None if quant[0] is NoQuant else 1.58, ste=s.ste, rescale=s.rescale)
    if type(s) is TopK:
        return {**options, "k": s.kept_inputs(linear.weight.shape[1])}
    if type(s) is BlockTopK:
        return {**options, "block": (s.n, s.m)}
    if type(s) is Threshold:
        return {**options, "tau": s.tau.data}
    if type(s) is Dense:
        return options
    raise TypeError(f"no fast kernel for the sparsifier {type(s).__name__}")


def sparse_linear(x: Tensor, w: Tensor, *, k=None, block=None, tau=None, rescale="none",
                  bits=None, ste=True, observe=None) -> Tensor:
    """Y [..., D_out] = sparsify(A(X)) @ Qw(W).T (SPEC 5); same semantics as the reference.

    k: kept inputs per row (None: no top-K); block: (N, M) or None; tau: SPEC 11's threshold
    (0-d array) or None; bits: None or 1.58; observe: None or called as
    observe(sparsify(A(X)) [..., D_in], D_in, D_out)."""
    d_out, d_in = w.shape
    packed = getattr(w, "packed", None)
    x2 = x.data.reshape(-1, d_in)  # [N, D_in]
    needs_grad = engine._grad_enabled and (x.requires_grad or w.requires_grad)  # no_grad()?
    if packed is not None and packed.source is w.data and not needs_grad and observe is None \
            and x2.shape[0] <= PACKED_MAX_ROWS and block is None:
        y = np.stack([packed.gemv(row, k, rescale, tau) for row in x2])
        return Tensor(y.reshape(*x.shape[:-1], d_out))

    mask, r, ya = _prepare(x2, k, block, tau, rescale, bits)  # M, r, sparsify(A(X)) [N, D_in]
    if observe is not None:
        observe(ya.reshape(x.shape), d_in, d_out)
    if bits:
        t, s = _absmean("sparse_linear", w.data)  # the reference's SPEC 4 codes and scale
        wq = t / s  # Qw(W) = t / s_w, [D_out, D_in]
    else:
        wq = w.data
    sparse = mask is not None and tau is None and _density(k, block, d_in) \
        <= SPARSE_PRODUCT_MAX_DENSITY
    y = sparse_gemm(ya, mask, pack_sparse_weights(wq)) if sparse else ya @ wq.T

    def backward(g):
        g2 = g.reshape(-1, d_out)
        gx = gw = None
        if x.requires_grad:
            gx = g2 @ wq  # [N, D_in]
            if r is not None:
                gx = gx * r
            if mask is not None and not ste:
                gx = np.where(mask, gx, 0)
            gx = gx.reshape(x.shape)
        if w.requires_grad:
            gw = sparse_weight_grad(ya, mask, g2) if sparse else g2.T @ ya  # [D_out, D_in]
        return gx, gw

    return Tensor.from_op(y.reshape(*x.shape[:-1], d_out), (x, w), backward, "sparse_linear")


_last = {}  # the most recent _prepare call: q, k, v (and up, gate) share one input


def _prepare(x2, k, block, tau, rescale, bits):
    """(M or None, r [N, 1] or None, sparsify(A(X))) for rows x2 [N, D_in] (SPEC 1-3, 11).

    Reused when called again on equal rows with equal arguments (checked by value)."""
    key = (k, block, None if tau is None else float(tau), rescale, bits, x2.dtype, x2.shape)
    if _last.get("key") == key and np.array_equal(_last["x"], x2):
        return _last["out"]
    a = x2
    if bits:
        q, s = quantize_rows(x2)
        a = q / s  # dequantized codes, as the reference computes them
    mask = r = None
    ya = a
    if tau is not None:  # SPEC 11: |A(X)| > tau, r = 1
        mask = _threshold_mask(a, tau)
        ya = np.where(mask, a, 0)
    elif k is not None or block is not None:
        mask, ya = topk_select(a, k, block)
        if rescale == "l2":  # the reference's r = ||A|| / max(||A ⊙ M||, 1e-12) (SPEC 1)
            r = _rescale_factor("sparse_linear", a, mask, rescale)
            ya = ya * r
    _last.update(key=key, x=x2.copy(), out=(mask, r, ya))
    return mask, r, ya


def _density(k, block, d_in):
    return k / d_in if block is None else block[0] / block[1]


@dataclass(frozen=True)
class PackedLinear:
    """Inference form of one projection: Wt [D_in, D_out] (float) or 2-bit codes (ternary)."""

    source: np.ndarray  # the weight array this was packed from (read-only while packed)
    wt: np.ndarray | None
    ternary: PackedTernary | None

    def gemv(self, x: np.ndarray, k, rescale, tau=None) -> np.ndarray:
        """y [D_out] for one token x [D_in]: SPEC 5 reading only the kept inputs' weights
        (the top-k, those above tau, or all of them)."""
        if self.ternary is None:
            idx = _kept(x, k, tau)
            y = sparse_gemv(x, idx, self.wt)
            return y * _row_rescale(x, idx, rescale)
        if x.dtype == np.float32:  # one compiled call before the product, one after
            sel = THRESHOLD if tau is not None else TOPK if k is not None else ALL
            d = x.shape[0]
            q, a, idx = np.empty(d, np.int8), np.empty(d, np.float32), np.empty(d, np.int64)
            s, count, r = token_inputs(np.ascontiguousarray(x), sel, d if k is None else k,
                                       np.float32(0 if tau is None else tau),
                                       _check_rescale("sparse_linear", rescale) == "l2", q, a, idx)
            acc = ternary_gemv_int(q, idx[:count], self.ternary)  # exact integers (SPEC 5)
            return token_outputs(acc, s, self.ternary.scale, r, count)
        q, s = quantize_rows(x[None])  # SPEC 3; the mask of q equals the mask of q / s
        q, s = q[0], s[0, 0]
        a = q / s
        idx = _kept(a, k, tau) if tau is not None else _kept(q.astype(np.float32), k, None)
        acc = ternary_gemv_int(q, idx, self.ternary)
        return (acc / (s * x.dtype.type(self.ternary.scale))).astype(x.dtype) \
            * _row_rescale(a, idx, rescale)


def _kept(a, k, tau):
    """Indices a token a [D_in] keeps: |a| > tau (SPEC 11), its top-k (SPEC 1), or all."""
    if tau is not None:
        return np.flatnonzero(_threshold_mask(a, tau))
    return np.arange(a.shape[0]) if k is None else topk_indices(a, k)


def _row_rescale(a, idx, rescale):
    """SPEC 1's r for one token a [D_in] that keeps the inputs idx: the reference's formula."""
    if rescale == "none":
        return a.dtype.type(1)
    mask = np.zeros(a.shape, np.bool_)
    mask[idx] = True
    return _rescale_factor("sparse_linear", a, mask, rescale)  # [1]


def pack_linear(w: np.ndarray, bits=None, sparse_inputs=True) -> PackedLinear:
    """W [D_out, D_in] -> PackedLinear: transposed float rows, or 2-bit ternary codes (SPEC 4),
    input-major when the projection's inputs are sparse (a dropped input's codes are skipped),
    else output-major where the CPU has the SIMD kernels (bitnet.cpp's I2_S: no shuffles; 1.8x
    faster over all inputs here; the portable loop is faster on input-major codes). Either
    layout gives the exact product for any kept set; one layout is kept in memory."""
    if bits:
        rows = not sparse_inputs and simd_level() != "portable"
        return PackedLinear(w, None, pack_ternary(w, "outputs" if rows else "inputs"))
    return PackedLinear(w, pack_sparse_weights(w), None)


def pack_model(model) -> int:
    """Pack the weight of every SparseLinear of a model for decoding; returns how many.

    A projection with a method the kernels do not know is a TypeError, not a silent slow path.
    The weight arrays become read-only: call ``unpack_model`` before training them again."""
    n = 0
    for _, module in model.named_modules():
        if isinstance(module, SparseLinear):
            p = module.weight
            # Input-major codes for every projection, dense inputs too: the compiled decode
            # step (decode.py) reads that layout.
            p.packed = pack_linear(p.data, kernel_options(module)["bits"])
            p.data.flags.writeable = False
            n += 1
    return n


def unpack_model(model) -> None:
    """Drop the packed copies and make the weights writable again."""
    for _, p in model.named_parameters():
        if getattr(p, "packed", None) is not None:
            p.packed = None
            p.data.flags.writeable = True
