"""Which implementation runs a SparseLinear (and the fused attention, RMSNorm and GLU ops): the
NumPy reference or the Numba kernels.

``default_backend()`` is "numba", or "numpy" when MINISPARSE_BACKEND=numpy, NUMBA_DISABLE_JIT=1
(the kernels would run as slow pure Python) or Numba is not installed; ``use_backend(name)``
overrides it inside a ``with`` block. The reference modules (sparsity, quant, linear, model)
never import the kernels: a module asks ``fast_linear`` (``fast_attention``, ``fast_rmsnorm``,
``fast_glu``) here, which imports them when the "numba" backend is actually used.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

BACKENDS = ("numpy", "numba")
_forced = []  # the stack of use_backend(...) overrides, innermost last


def default_backend() -> str:
    """"numba", unless use_backend(...) says otherwise or the environment asks for "numpy"."""
    if _forced:
        return _forced[-1]
    if os.environ.get("MINISPARSE_BACKEND", "").lower() == "numpy" \
            or os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0") \
            or importlib.util.find_spec("numba") is None:
        return "numpy"
    return "numba"


@contextmanager
def use_backend(name: str):
    """``with use_backend("numpy"): ...`` runs every SparseLinear with backend=None on it."""
    resolve_backend(name, "use_backend")
    _forced.append(name)
    try:
        yield name
    finally:
        _forced.pop()


def resolve_backend(backend, op="sparse_linear") -> str:
    """The backend to run: ``backend`` ("numpy" | "numba"), or the default when None."""
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def fast_linear(linear, x):
    """The Numba twin of ``linear.reference(x)`` (kernels/linear.py dispatches on the methods)."""
    from .kernels.linear import linear_forward

    return linear_forward(linear, x)


def fast_attention(q, k, v, cos, sin, n_heads):
    """The Numba twin of ``model.Attention``'s causal RoPE attention over positions 0..T-1."""
    from .kernels.attention import causal_attention

    return causal_attention(q, k, v, cos, sin, n_heads)


def fast_rmsnorm(x, g, eps):
    """The Numba twin of ``functions.rmsnorm``."""
    from .kernels.norm import rmsnorm

    return rmsnorm(x, g, eps)


def fast_glu(u, z, act):
    """The Numba twin of u * act(z), act = glu_activation(act) (GLU feed-forward)."""
    from .kernels.glu import glu

    return glu(u, z, act)
