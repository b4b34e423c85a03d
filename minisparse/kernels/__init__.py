"""The Numba fast path: the same math as the NumPy reference (``sparsity``, ``quant``,
``linear``), tested against it, never the other way round.

``default_backend`` and ``use_backend`` (re-exported from ``minisparse.backend``) pick what a
SparseLinear with backend=None runs. Every kernel is compiled with ``cache=True``: a second
process loads the machine code from ``__pycache__`` instead of compiling again.
"""

from __future__ import annotations

from ..backend import BACKENDS, default_backend, use_backend
from .linear import PackedLinear, pack_linear, pack_model, sparse_linear, unpack_model
from .sparse_matmul import pack_sparse_weights, sparse_gemm, sparse_gemv, sparse_weight_grad
from .ternary import PackedTernary, pack_ternary, quantize_rows, ternary_gemv_int, unpack_ternary
from .topk import block_topk_mask, topk_indices, topk_mask

__all__ = [
    "BACKENDS", "default_backend", "use_backend",
    "topk_mask", "block_topk_mask", "topk_indices",
    "pack_sparse_weights", "sparse_gemv", "sparse_gemm", "sparse_weight_grad",
    "PackedTernary", "pack_ternary", "unpack_ternary", "quantize_rows", "ternary_gemv_int",
    "PackedLinear", "pack_linear", "pack_model", "unpack_model", "sparse_linear",
]
