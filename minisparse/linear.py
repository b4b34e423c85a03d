"""The Q-Sparse / BitNet b1.58 linear layer (SPEC section 5, eq. 8) and the GLU feed-forward.

``sparse_linear`` composes the autograd ops of ``quant.py`` and ``sparsity.py``; with
``backend="numba"`` it hands the same arguments to the Numba kernels, which compute the same
thing faster (``minisparse.kernels``, imported only when asked for).
"""

from __future__ import annotations

from .functions import relu, silu
from .quant import quantize_activations, ternarize_weights
from .sparsity import resolve_topk, sparsify
from .tensor import Tensor

BACKENDS = ("numpy", "numba")


def sparse_linear(x, w, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                  ste=True, backend=None, observe=None) -> Tensor:
    """Y [..., D_out] = sparsify(A(X)) @ Qw(W).T for X [..., D_in], W [D_out, D_in] (SPEC 5).

    A = int8 absmax and Qw = ternary absmean when bits=1.58, else identity; sparsify is top-K
    (k, or sparsity > 0) or N:M (block), else identity; no bias. ``observe``, if given, is
    called as observe(sparsify(A(X)) ndarray [..., D_in], D_in, D_out) (e.g. to count nonzeros)."""
    _check_operands(x, w)
    k, block = resolve_linear(w.shape[1], sparsity=sparsity, k=k, block=block, rescale=rescale,
                              bits=bits, ste=ste)
    if _backend(backend) == "numba":
        from .kernels import sparse_linear as kernel

        return kernel(x, w, k=k, block=block, rescale=rescale, bits=bits, ste=ste,
                      observe=observe)
    a = quantize_activations(x) if bits else x
    if k is not None or block is not None:  # the mask sees A(X), the values it masks
        a = sparsify(a, k=k, block=block, rescale=rescale, ste=ste)
    if observe is not None:
        observe(a.data, w.shape[1], w.shape[0])
    return a @ (ternarize_weights(w) if bits else w).T  # [..., D_in] @ [D_in, D_out]


def feed_forward(h, up, gate, down, *, act="relu2", **linear_kwargs) -> Tensor:
    """GLU feed-forward (SPEC 6): down(up(h) * relu(gate(h))^2) (Q-Sparse eq. 11) or * silu(...).

    Every projection is a ``sparse_linear`` with ``linear_kwargs``."""
    if act not in ("relu2", "silu"):
        raise ValueError(f'feed_forward: act must be "relu2" or "silu", got {act!r}')
    u = sparse_linear(h, up, **linear_kwargs)  # [..., ffn_hidden]
    g = sparse_linear(h, gate, **linear_kwargs)
    f = u * relu(g) ** 2 if act == "relu2" else u * silu(g)
    return sparse_linear(f, down, **linear_kwargs)  # [..., d_model]


def resolve_linear(d_in, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                   ste=True, op="sparse_linear"):
    """Validate SPEC 5's arguments -> (K, None) for top-K, (None, (N, M)) for N:M, or (None, None)
    for no sparsify (k and block None, sparsity 0 or None; with k or block, sparsity 0 means
    "not given")."""
    if bits is not None and (isinstance(bits, bool) or bits != 1.58):
        raise ValueError(f"{op}: bits must be None (full precision) or 1.58, got {bits!r}")
    if rescale not in ("none", "l2"):
        raise ValueError(f'{op}: rescale must be "none" or "l2", got {rescale!r}')
    if not isinstance(ste, bool):
        raise TypeError(f"{op}: ste must be True or False, got {ste!r}")
    if k is None and block is None and not sparsity:
        return None, None
    return resolve_topk(d_in, k, sparsity or None, block, op)


def _check_operands(x, w):
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparse_linear: {name} must be a Tensor, got {type(t).__name__}")
    if w.ndim != 2 or x.ndim < 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"sparse_linear: expected x [..., D_in] (at least 2-D) and w "
                         f"[D_out, D_in], got x {x.shape} and w {w.shape}")


def _backend(backend):
    """The backend to run: the argument, else the process default of the Numba kernels."""
    if backend is None:
        try:
            from .kernels import default_backend
        except ImportError:  # the kernels package is optional for the reference path
            return "numpy"
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"sparse_linear: backend must be one of {BACKENDS} or None, "
                         f"got {backend!r}")
    return backend
