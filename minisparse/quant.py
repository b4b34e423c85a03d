"""BitNet b1.58 quantizers (SPEC sections 3-4): int8 per-token activations, ternary weights.

``absmax_quantize`` / ``absmean_ternarize`` / ``dequantize`` are the NumPy reference (integer
codes plus scales); ``quantize_activations`` / ``ternarize_weights`` are the autograd ops, whose
forward is the dequantized value and whose backward is the straight-through identity.
"""

from __future__ import annotations

import numpy as np

from .sparsity import check_finite, check_float_array
from .tensor import Tensor


def _absmax(op, x):
    # SPEC 3 (eq. 5-7): gamma = max|x| per row, s = 127 / max(gamma, 1e-5); np.rint rounds half
    # to even. |x * s| <= 127 up to rounding, so the clip only pins the int8 range down.
    check_float_array(op, "x", x)
    s = 127 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def _absmean(op, w):
    # SPEC 4 (eq. 9-10): alpha = mean|W| over the whole matrix, s = 1 / max(alpha, 1e-5).
    check_float_array(op, "w", w)
    s = 1 / np.maximum(np.abs(w).mean(), w.dtype.type(1e-5))
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def absmax_quantize(x):
    """x [..., D] -> (q int8 [..., D], s [..., 1]): s = 127 / max(max|x|, 1e-5), q = rint(x s)."""
    if isinstance(x, np.ndarray) and x.ndim and x.shape[-1] == 0:
        raise ValueError(f"absmax_quantize: x must have at least one feature (a max per row), "
                         f"got shape {x.shape}")
    return _absmax("absmax_quantize", check_finite("absmax_quantize", "x", x))


def absmean_ternarize(w):
    """w [...] -> (t int8 in {-1, 0, 1}, s scalar): s = 1 / max(mean|w|, 1e-5), t = rint(w s)."""
    if isinstance(w, np.ndarray) and w.size == 0:
        raise ValueError(f"absmean_ternarize: w must not be empty (its mean|w| is the scale), "
                         f"got shape {w.shape}")
    return _absmean("absmean_ternarize", check_finite("absmean_ternarize", "w", w))


def dequantize(q, s):
    """q / s in the scale's float dtype (s per row [..., 1], or one scalar per matrix)."""
    return q / s


def _ste(op, x, quantizer):
    """Autograd op: forward dequantize(*quantizer(x)), backward the identity (STE)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor, got {type(x).__name__}")
    # No finiteness check: a diverging training run should reach its loss check, not raise.
    return Tensor.from_op(dequantize(*quantizer(op, x.data)), (x,), lambda g: (g,), op)


def quantize_activations(x: Tensor) -> Tensor:
    """Q(x) = q / s with per-token int8 absmax codes (SPEC 3); dQ/dx = identity (STE)."""
    return _ste("quantize_activations", x, _absmax)


def ternarize_weights(w: Tensor) -> Tensor:
    """Qw(w) = t / s with ternary absmean codes (SPEC 4); dQw/dw = identity (STE)."""
    return _ste("ternarize_weights", w, _absmean)


# ---- quantizer objects --------------------------------------------------------------------------
# One class per method, for activations and weights separately; ``bits`` is the config's name.


class NoQuant:
    """Full precision: the identity."""

    bits = None

    def __call__(self, x: Tensor) -> Tensor:
        return x


class Int8Absmax:
    """SPEC 3: per-token int8 absmax codes, dequantized; STE backward (activations)."""

    bits = 8

    def __call__(self, x: Tensor) -> Tensor:
        return quantize_activations(x)


class TernaryAbsmean:
    """SPEC 4: per-matrix ternary absmean codes, dequantized; STE backward (weights)."""

    bits = 1.58

    def __call__(self, w: Tensor) -> Tensor:
        return ternarize_weights(w)


def quantizers(bits=None) -> tuple:
    """(activation quantizer, weight quantizer) for the config's ``bits``: None -> full
    precision; 1.58 -> BitNet b1.58 (int8 absmax activations, ternary absmean weights)."""
    if bits is None:
        return NoQuant(), NoQuant()
    if isinstance(bits, bool) or bits != 1.58:
        raise ValueError(f"bits must be None (full precision) or 1.58, got {bits!r}")
    return Int8Absmax(), TernaryAbsmean()
