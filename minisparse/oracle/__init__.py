"""The functional oracle (SPEC section 10): pure NumPy functions, float64-capable, no global state.

Per operation (SPEC 1-5), forward and backward:

- top-K / N:M: ``k_for``, ``topk_mask``, ``block_topk_mask``, ``topk_forward`` -> (y, mask, r),
  ``topk_backward(grad_y, mask, r, ste)``;
- quantizers: ``absmax_quantize`` (int8 codes, per-row scale), ``absmean_ternarize`` (ternary
  codes, one scale), ``dequantize``; their backward is the identity (STE), nothing to call;
- the layer: ``sparse_linear_forward``, ``sparse_linear_backward``, the integer-code form
  ``sparse_linear_int``, the comparison scales ``sparse_linear_magnitudes``, and the GLU
  feed-forward ``ffn_forward`` / ``ffn_backward``;
- threshold sparsity (SPEC 11): ``threshold_forward``, and ``tau=`` in the layer functions;
- the model: ``gpt_forward``, ``gpt_loss_and_grads``, ``gpt_trace`` (``oracle/gpt.py``: plain
  NumPy with a hand-written backward, independent of the engine's GPT) and SPEC 10's
  projection-by-projection ``compare_model`` of another implementation's trace.

``TOLERANCES`` / ``tolerance`` / ``compare`` say how close another implementation must come.
``write_vectors`` writes golden vectors; ``harness.check`` / ``harness.assert_conforms`` test an
outside implementation on hypothesis-generated cases (imported on first use: loading
hypothesis takes a moment the other functions should not pay). Non-finite inputs raise
ValueError.
"""

from ..quant import absmax_quantize, absmean_ternarize, dequantize
from ..sparsity import block_topk_mask, k_for, topk_backward, topk_forward, topk_mask
from .compare_model import ModelReport, compare_model
from .gpt import gpt_forward, gpt_loss_and_grads, gpt_trace
from .ops import (
    ffn_backward,
    ffn_forward,
    sparse_linear_backward,
    sparse_linear_forward,
    sparse_linear_int,
    sparse_linear_magnitudes,
    threshold_forward,
)
from .tolerances import TOLERANCES, Mismatch, Tolerance, compare, tolerance
from .vectors import FORMAT_VERSION, read_vector, write_vectors

__all__ = [
    "FORMAT_VERSION", "TOLERANCES", "Mismatch", "ModelReport", "Tolerance", "absmax_quantize",
    "absmean_ternarize", "block_topk_mask", "compare", "compare_model", "dequantize",
    "ffn_backward", "ffn_forward", "gpt_forward", "gpt_loss_and_grads", "gpt_trace", "k_for",
    "read_vector", "sparse_linear_backward", "sparse_linear_forward", "sparse_linear_int",
    "sparse_linear_magnitudes", "threshold_forward", "tolerance", "topk_backward", "topk_forward",
    "topk_mask", "write_vectors",
]


def __getattr__(name):
    if name in ("check", "assert_conforms", "Report"):  # loads hypothesis: import lazily
        from . import harness

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
