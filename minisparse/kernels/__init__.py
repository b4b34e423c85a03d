"""The Numba fast path: the same math as the NumPy reference (``sparsity``, ``quant``,
``linear``), tested against it, never the other way round.

``default_backend()`` picks what ``sparse_linear(..., backend=None)`` runs: "numba", or
"numpy" when MINISPARSE_BACKEND=numpy or NUMBA_DISABLE_JIT=1 (then the kernels would run as
slow pure Python, so the reference composition is used instead). ``use_backend(name)``
overrides it inside a ``with`` block. Every kernel is compiled with ``cache=True``: a second
process loads the machine code from ``__pycache__`` instead of compiling again.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from .linear import PackedLinear, pack_linear, pack_model, sparse_linear, unpack_model
from .sparse_matmul import pack_sparse_weights, sparse_gemm, sparse_gemv, sparse_weight_grad
from .ternary import PackedTernary, pack_ternary, quantize_rows, ternary_gemv_int, unpack_ternary
from .topk import block_topk_mask, topk_indices, topk_mask

BACKENDS = ("numba", "numpy")
_forced = []  # the stack of use_backend(...) overrides, innermost last


def default_backend() -> str:
    """"numba", unless use_backend(...) says otherwise or the environment asks for "numpy"."""
    if _forced:
        return _forced[-1]
    if os.environ.get("MINISPARSE_BACKEND", "").lower() == "numpy" \
            or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        return "numpy"
    return "numba"


@contextmanager
def use_backend(name: str):
    """``with use_backend("numpy"): ...`` runs sparse_linear(backend=None) on that backend."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    _forced.append(name)
    try:
        yield name
    finally:
        _forced.pop()


__all__ = [
    "BACKENDS", "default_backend", "use_backend",
    "topk_mask", "block_topk_mask", "topk_indices",
    "pack_sparse_weights", "sparse_gemv", "sparse_gemm", "sparse_weight_grad",
    "PackedTernary", "pack_ternary", "unpack_ternary", "quantize_rows", "ternary_gemv_int",
    "PackedLinear", "pack_linear", "pack_model", "unpack_model", "sparse_linear",
]
