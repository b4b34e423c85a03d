"""minisparse: Q-Sparse (top-K activation sparsity + STE) and BitNet b1.58 in NumPy.

Layers, bottom to top: ``tensor`` (autograd engine) -> ``functions`` (differentiable ops) ->
``sparsity`` / ``quant`` (SPEC sections 1-4) -> ``linear`` (SPEC section 5) -> ``model`` ->
``train``. ``oracle`` is the stable functional API for checking other implementations;
``kernels`` is the Numba fast path behind the same interface.
"""

__version__ = "0.1.0"

from minisparse.nn import Module, Parameter
from minisparse.tensor import Tensor, no_grad

__all__ = ["Module", "Parameter", "Tensor", "no_grad", "__version__"]
