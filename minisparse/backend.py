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
from contextlib import contextmanager, nullcontext

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


@contextmanager
def blas_threads(n):
    """Limit every loaded BLAS (numpy's OpenBLAS, and scipy's if loaded) to n threads inside
    the block, and restore them after."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def training_threads(backend):
    """The BLAS setting to train under: one thread on the "numba" backend, whose kernels run
    their own parallel regions on the cores (a second pool waking for every small product
    competes with them: SPEC 9's training step took 171 ms with 2 BLAS threads, 119 ms with
    one, here); the library's own setting on "numpy"."""
    return blas_threads(1) if resolve_backend(backend) == "numba" else nullcontext()


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
