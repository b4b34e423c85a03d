"""The Q-Sparse / BitNet b1.58 linear layer (SPEC section 5, eq. 8) and the GLU feed-forward.

``SparseLinear`` is a Module holding one weight and three method objects: a sparsifier
(``sparsity.Dense | TopK | BlockTopK | Threshold``) and two quantizers (``quant.NoQuant |
Int8Absmax | TernaryAbsmean``), one for the activations and one for the weight. Its
``reference`` is the composition a reader follows; with the "numba" backend the same module is
handed to the kernels' fused twin (``backend.fast_linear``). ``sparse_linear`` and
``feed_forward`` are the functional forms with SPEC 5's keyword options.
"""

from __future__ import annotations

from .backend import BACKENDS, fast_linear, resolve_backend
from .functions import relu, silu
from .nn import Module
from .quant import NoQuant, quantizers
from .sparsity import BlockTopK, Dense, TopK, make_sparsifier, resolve_topk
from .tensor import Tensor

__all__ = ["ACTIVATIONS", "BACKENDS", "SparseLinear", "sparse_linear", "feed_forward",
           "glu_activation", "resolve_linear", "linear_methods"]


class SparseLinear(Module):
    """Y [..., D_out] = sparsify(A(X)) @ Qw(W).T for X [..., D_in], W = ``weight`` [D_out, D_in].

    No bias. The weight Parameter carries the module's own name (nn.Module's naming rule), so
    the model's names stay SPEC 6's. ``backend`` None means the process default at each call.
    ``observe``, if set, is called as observe(sparsify(A(X)) ndarray [..., D_in], D_in, D_out)."""

    def __init__(self, weight, sparsifier=None, act_quant=None, weight_quant=None, backend=None):
        self.weight = weight
        self.sparsifier = Dense() if sparsifier is None else sparsifier
        self.act_quant = NoQuant() if act_quant is None else act_quant
        self.weight_quant = NoQuant() if weight_quant is None else weight_quant
        self.backend = backend if backend is None else resolve_backend(backend)
        self.observe = None

    def forward(self, x):
        _check_operands(x, self.weight)
        if resolve_backend(self.backend) == "numba":
            return fast_linear(self, x)
        return self.reference(x)

    def reference(self, x):
        """SPEC 5 composed from the method objects' autograd ops."""
        a = self.sparsifier(self.act_quant(x))  # the mask sees A(X), the values it masks
        if self.observe is not None:
            self.observe(a.data, self.weight.shape[1], self.weight.shape[0])
        return a @ self.weight_quant(self.weight).T  # [..., D_in] @ [D_in, D_out]

    def kept_inputs(self) -> int:
        """K_in of SPEC 7: how many of the D_in inputs a token keeps."""
        return self.sparsifier.kept_inputs(self.weight.shape[1])


def sparse_linear(x, w, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                  ste=True, backend=None, observe=None) -> Tensor:
    """SparseLinear(X) with SPEC 5's keyword options on a weight Tensor w [D_out, D_in].

    A = int8 absmax and Qw = ternary absmean when bits=1.58, else identity; sparsify is top-K
    (k, or sparsity > 0) or N:M (block), else identity."""
    _check_operands(x, w)
    methods = linear_methods(w.shape[1], sparsity=sparsity, k=k, block=block, rescale=rescale,
                             bits=bits, ste=ste)
    linear = SparseLinear(w, *methods, backend=backend)
    linear.observe = observe
    return linear(x)


def linear_methods(d_in, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                   ste=True, op="sparse_linear"):
    """(sparsifier, activation quantizer, weight quantizer) for SPEC 5's keyword options, checked
    against the input size d_in (k <= d_in, M divides d_in)."""
    act_quant, weight_quant = quantizers(bits)
    if k is not None or block is not None or sparsity:
        resolve_topk(d_in, k, sparsity or None, block, op)
    sparsifier = make_sparsifier(sparsity=sparsity, k=k, block=block, rescale=rescale, ste=ste)
    return sparsifier, act_quant, weight_quant


def resolve_linear(d_in, *, op="sparse_linear", **options):
    """Validate SPEC 5's arguments -> (K, None) for top-K, (None, (N, M)) for N:M, or (None, None)
    for no sparsify (k and block None, sparsity 0 or None)."""
    sparsifier, _, _ = linear_methods(d_in, op=op, **options)
    if isinstance(sparsifier, TopK):
        return sparsifier.kept_inputs(d_in), None
    if isinstance(sparsifier, BlockTopK):
        return None, (sparsifier.n, sparsifier.m)
    return None, None


ACTIVATIONS = ("relu2", "silu")


def glu_activation(act: str):
    """SPEC 6's gate activation: "relu2" -> relu(g)² (Q-Sparse eq. 11), "silu" -> silu(g)."""
    if act == "relu2":
        return lambda g: relu(g) ** 2
    if act == "silu":
        return silu
    raise ValueError(f"ffn_act must be one of {list(ACTIVATIONS)}, got {act!r}")


def feed_forward(h, up, gate, down, *, act="relu2", **linear_kwargs) -> Tensor:
    """GLU feed-forward (SPEC 6): down(up(h) * relu(gate(h))^2) (Q-Sparse eq. 11) or * silu(...).

    Every projection is a ``sparse_linear`` with ``linear_kwargs``."""
    activation = glu_activation(act)
    u = sparse_linear(h, up, **linear_kwargs)  # [..., ffn_hidden]
    g = sparse_linear(h, gate, **linear_kwargs)
    return sparse_linear(u * activation(g), down, **linear_kwargs)  # [..., d_model]


def _check_operands(x, w):
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, Tensor):
            raise TypeError(f"sparse_linear: {name} must be a Tensor, got {type(t).__name__}")
    if w.ndim != 2 or x.ndim < 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"sparse_linear: expected x [..., D_in] (at least 2-D) and w "
                         f"[D_out, D_in], got x {x.shape} and w {w.shape}")
