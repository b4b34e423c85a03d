"""The autograd engine: a Tensor wrapping a NumPy array, and reverse-mode ``backward``.

Every op computes its output with NumPy and hands ``Tensor.from_op`` a closure that maps the
output's gradient to one gradient per parent. The engine sums broadcast axes away
(``unbroadcast``) for every parent, so no op handles broadcasting itself, and gradients of leaf
tensors accumulate across ``backward()`` calls, like PyTorch (reset with ``zero_grad``).

Dtypes: float32 by default, float64 kept as float64, integer/bool arrays allowed as non-grad
index data. Python scalars and NumPy arrays mixed into arithmetic are constants and adopt the
tensor's float dtype, so float32 never silently becomes float64; two float Tensors of different
dtypes are a TypeError.
"""

from __future__ import annotations

import contextlib

import numpy as np

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Context manager (or decorator): ops inside build no graph; their outputs are constants."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: drop extra leading axes, then sum where ``shape`` has 1."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    if lead < 0 or any(g != n and n != 1 for g, n in zip(grad.shape[lead:], shape, strict=True)):
        raise ValueError(f"unbroadcast: grad of shape {grad.shape} is not a broadcast of {shape}")
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1
    )
    return grad.sum(axis=axes).reshape(shape)


class Tensor:
    """An n-d array with an optional gradient; ops on Tensors record the graph for backward."""

    __array_ufunc__ = None  # make `ndarray + Tensor` defer to Tensor.__radd__

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        if isinstance(data, (np.ndarray, np.generic)):
            data = np.asarray(data)  # no copy: shares memory, like torch.from_numpy
            if data.dtype.kind == "f" and data.dtype not in (np.float32, np.float64):
                data = data.astype(np.float32)
            elif data.dtype.kind not in "fiub":
                raise TypeError(f"Tensor: unsupported dtype {data.dtype} for data {data.shape}")
        else:
            data = np.asarray(data, dtype=np.float32)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"Tensor: requires_grad needs a float dtype, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents = ()
        self._backward = None
        self.op = ""

    @staticmethod
    def from_op(data, parents, backward, op):
        """Make an op's output. ``backward(grad_out) -> tuple of grads, one per parent`` (None
        allowed; grads may be broadcast-shaped, must not be written to in place). Under
        ``no_grad()``, or when no parent requires grad, returns a plain constant Tensor."""
        out = Tensor.__new__(Tensor)
        out.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        out.grad = None
        out.op = op
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad, out._parents, out._backward = True, parents, backward
        else:
            out.requires_grad, out._parents, out._backward = False, (), None
        return out

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad``, in reverse topological
        order (iterative, so deep graphs never hit the recursion limit). ``grad`` defaults to 1
        for a single-element output. Only leaves keep ``.grad``; the graph survives, so calling
        backward again accumulates again."""
        if not self.requires_grad:
            raise RuntimeError("backward: tensor does not require grad (no input requires grad, "
                               "or it was built under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward: grad must be given for a non-scalar output of shape "
                                 f"{self.shape}")
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad shape {grad.shape} does not match output shape "
                                 f"{self.shape}")

        # Post-order DFS with an explicit stack: a node is emitted after all its parents.
        topo, visited, stack = [], {id(self)}, [(self, iter(self._parents))]
        while stack:
            node, parents = stack[-1]
            for p in parents:
                if p.requires_grad and id(p) not in visited:
                    visited.add(id(p))
                    stack.append((p, iter(p._parents)))
                    break
            else:
                stack.pop()
                topo.append(node)

        grads = {id(self): grad}
        for node in reversed(topo):
            g = grads.pop(id(node), None)
            if g is None:  # every path to this node returned None
                continue
            if node._backward is None:  # a leaf: accumulate (copy first, so no grad aliases)
                node.grad = np.array(g) if node.grad is None else node.grad + g
                continue
            parent_grads = node._backward(g)
            if len(parent_grads) != len(node._parents):
                raise ValueError(f"backward of {node.op}: returned {len(parent_grads)} grads for "
                                 f"{len(node._parents)} parents")
            for p, pg in zip(node._parents, parent_grads, strict=True):
                if pg is None or not p.requires_grad:
                    continue
                if pg.shape != p.data.shape:
                    try:
                        pg = unbroadcast(pg, p.data.shape)
                    except ValueError as e:  # a bug in an op's backward: say which op
                        raise ValueError(f"backward of {node.op}: {e}") from None
                if pg.dtype != p.data.dtype:  # keep float32 graphs float32 all the way down
                    pg = pg.astype(p.data.dtype)
                key = id(p)
                grads[key] = pg if key not in grads else grads[key] + pg

    # ---- plumbing ------------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def detach(self):
        """A constant Tensor sharing this tensor's data."""
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad})"

    # ---- arithmetic (elementwise, broadcasting) ------------------------------------------------
    def __add__(self, other):
        return _add(*_pair(self, other, "add"))

    def __radd__(self, other):
        return _add(*_pair(self, other, "add"))

    def __sub__(self, other):
        return _sub(*_pair(self, other, "sub"))

    def __rsub__(self, other):
        b, a = _pair(self, other, "sub")
        return _sub(a, b)

    def __mul__(self, other):
        return _mul(*_pair(self, other, "mul"))

    def __rmul__(self, other):
        return _mul(*_pair(self, other, "mul"))

    def __truediv__(self, other):
        return _div(*_pair(self, other, "div"))

    def __rtruediv__(self, other):
        b, a = _pair(self, other, "div")
        return _div(a, b)

    def __neg__(self):
        return Tensor.from_op(-self.data, (self,), lambda g: (-g,), "neg")

    def __pow__(self, p):
        """x ** p for a Python scalar p; d/dx = p * x**(p-1)."""
        if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
            raise TypeError(f"pow: exponent must be a Python scalar, got {type(p).__name__} "
                            f"(base shape {self.shape})")
        p = float(p)  # a NumPy float64 exponent would upcast float32 data
        x = self.data
        return Tensor.from_op(x**p, (self,), lambda g: (g * p * x ** (p - 1),), "pow")

    def __matmul__(self, other):
        return _matmul(*_pair(self, other, "matmul"))

    def __rmatmul__(self, other):
        b, a = _pair(self, other, "matmul")
        return _matmul(a, b)

    # ---- reductions ----------------------------------------------------------------------------
    def sum(self, axis=None, keepdims=False):
        """Sum over ``axis`` (None = all; int or tuple); backward broadcasts g back."""
        axes = _axes("sum", axis, self.shape)
        out = self.data.sum(axis=axes, keepdims=keepdims)
        return Tensor.from_op(out, (self,), lambda g: (_unreduce(g, self.shape, axes, keepdims),),
                              "sum")

    def mean(self, axis=None, keepdims=False):
        """Mean over ``axis``; backward broadcasts g / n back."""
        axes = _axes("mean", axis, self.shape)
        n = int(np.prod([self.shape[a] for a in axes]))
        out = self.data.mean(axis=axes, keepdims=keepdims)
        return Tensor.from_op(
            out, (self,), lambda g: (_unreduce(g / n, self.shape, axes, keepdims),), "mean")

    def max(self, axis=None, keepdims=False):
        """Max over ``axis``; backward splits g evenly among tied maxima (a valid subgradient)."""
        axes = _axes("max", axis, self.shape)
        x = self.data
        top = x.max(axis=axes, keepdims=True)

        def backward(g):
            hit = x == top
            share = _unreduce(g, x.shape, axes, keepdims) / hit.sum(axes, x.dtype, keepdims=True)
            return (np.where(hit, share, 0),)

        return Tensor.from_op(top if keepdims else top.squeeze(axes), (self,), backward, "max")

    # ---- shape ---------------------------------------------------------------------------------
    def reshape(self, *shape):
        """Same data, new shape (one -1 allowed); backward reshapes g back."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        try:
            out = self.data.reshape(shape)
        except (ValueError, TypeError):
            raise ValueError(f"reshape: cannot reshape tensor of shape {self.shape} "
                             f"(size {self.size}) into {shape}") from None
        return Tensor.from_op(out, (self,), lambda g: (g.reshape(self.shape),), "reshape")

    def permute(self, *axes):
        """Reorder all axes: out.shape[i] = x.shape[axes[i]]; backward applies the inverse."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return self._permute("permute", axes)

    def transpose(self, *axes):
        """``transpose()`` reverses the axes; ``transpose(i, j)`` swaps two axes (as in torch);
        ``transpose(*perm)`` with a full permutation of > 2 axes is ``permute``."""
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if not axes:
            axes = tuple(range(self.ndim))[::-1]
        elif len(axes) == 2:
            i, j = (_axis("transpose", a, self.shape, axes) for a in axes)
            perm = list(range(self.ndim))
            perm[i], perm[j] = j, i
            axes = perm
        return self._permute("transpose", axes)

    def _permute(self, op, axes):
        perm = _permutation(op, axes, self.shape)
        inverse = tuple(perm.index(i) for i in range(len(perm)))
        return Tensor.from_op(self.data.transpose(perm), (self,),
                              lambda g: (g.transpose(inverse),), op)

    T = property(lambda self: self.transpose())

    # ---- indexing ------------------------------------------------------------------------------
    def __getitem__(self, index):
        """Basic slicing and integer-array gather; backward scatters g back (np.add.at, so
        repeated indices add up)."""
        index = _index(index, self.shape)
        try:
            out = self.data[index]
        except IndexError as e:
            raise IndexError(f"getitem: {e} (tensor shape {self.shape})") from None
        gather = any(isinstance(i, np.ndarray) and i.dtype.kind in "iu" for i in index)
        x = self.data

        def backward(g):
            full = np.zeros_like(x)
            if gather:
                np.add.at(full, index, g)
            else:  # basic indexing hits each element at most once
                full[index] = g
            return (full,)

        return Tensor.from_op(out, (self,), backward, "getitem")


# ---- binary ops: forward and backward side by side ----------------------------------------------
def _pair(a, b, op):
    """Make ``b`` a Tensor and give the pair one dtype: constants adopt the float dtype of the
    other operand; two float Tensors of different dtypes are an error (no silent upcast)."""
    if not isinstance(b, Tensor):
        b = Tensor(np.asarray(b, dtype=a.dtype if a.dtype.kind == "f" else None))
    if a.dtype != b.dtype:
        a_float, b_float = a.dtype.kind == "f", b.dtype.kind == "f"
        if a_float and b_float:
            raise TypeError(f"{op}: dtype mismatch, a is {a.dtype} {a.shape} and b is {b.dtype} "
                            f"{b.shape}; cast one explicitly")
        if a_float:  # b is int/bool data, so a constant
            b = Tensor(b.data.astype(a.dtype))
        elif b_float:
            a = Tensor(a.data.astype(b.dtype))
    return a, b


def _broadcasting(op, fn, a, b):
    try:
        return fn(a.data, b.data)
    except ValueError:
        raise ValueError(f"{op}: cannot broadcast a {a.shape} with b {b.shape}") from None


def _add(a, b):
    """a + b."""
    return Tensor.from_op(_broadcasting("add", np.add, a, b), (a, b), lambda g: (g, g), "add")


def _sub(a, b):
    """a - b."""
    return Tensor.from_op(_broadcasting("sub", np.subtract, a, b), (a, b), lambda g: (g, -g), "sub")


def _mul(a, b):
    """a * b; d/da = b, d/db = a (each only for an operand that requires grad: a constant
    factor, such as attention's 1 / sqrt(d_head), costs no product and no sum)."""
    x, y = a.data, b.data
    out = _broadcasting("mul", np.multiply, a, b)
    return Tensor.from_op(out, (a, b), lambda g: (g * y if a.requires_grad else None,
                                                  g * x if b.requires_grad else None), "mul")


def _div(a, b):
    """a / b; d/da = 1/b, d/db = -a/b^2 = -out/b (each only where required, as ``_mul``)."""
    y = b.data
    out = _broadcasting("div", np.divide, a, b)
    return Tensor.from_op(out, (a, b), lambda g: (g / y if a.requires_grad else None,
                                                  -g * out / y if b.requires_grad else None),
                          "div")


def _matmul(a, b):
    """Batched a @ b: [..., m, k] @ [..., k, n] -> [..., m, n], batch dims broadcast.
    d/da = g @ b^T, d/db = a^T @ g."""
    x, w = a.data, b.data
    if x.ndim < 2 or w.ndim < 2:
        raise ValueError(f"matmul: both operands need ndim >= 2, got a {x.shape} and b {w.shape}")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"matmul: a {x.shape} has {x.shape[-1]} columns but b {w.shape} has "
                         f"{w.shape[-2]} rows")
    try:
        np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dims of a {x.shape} and b {w.shape} do not "
                         f"broadcast") from None
    shared_weight = w.ndim == 2 and x.ndim > 2
    if shared_weight:  # [..., k] @ [k, n] as one 2-D GEMM rather than a stack of small ones
        out = (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
    else:
        out = np.matmul(x, w)

    def backward(g):
        gx = gw = None
        if shared_weight:  # one 2-D GEMM each; gw sums over the batch inside the GEMM
            g2 = g.reshape(-1, g.shape[-1])
            if a.requires_grad:
                gx = (g2 @ w.T).reshape(x.shape)
            if b.requires_grad:
                gw = x.reshape(-1, x.shape[-1]).T @ g2
        else:
            if a.requires_grad:
                gx = np.matmul(g, w.swapaxes(-1, -2))
            if b.requires_grad:
                gw = np.matmul(x.swapaxes(-1, -2), g)
        return gx, gw

    return Tensor.from_op(out, (a, b), backward, "matmul")


# ---- helpers for reductions, permutations and indexing ------------------------------------------
def _axes(op, axis, shape):
    """Normalise ``axis`` (None, int or tuple of ints) to a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(len(shape)))
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    out = [_axis(op, ax, shape, axis) for ax in axes]
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis!r} (shape {shape})")
    return tuple(sorted(out))


def _axis(op, ax, shape, given):
    """One axis ``ax`` (part of the argument ``given``) as a non-negative int < len(shape)."""
    ndim = len(shape)
    if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
        raise TypeError(f"{op}: axis must be an int or tuple of ints, got {given!r} "
                        f"(shape {shape})")
    if not -ndim <= ax < ndim:
        raise ValueError(f"{op}: axis {ax} is out of range for shape {shape}")
    return int(ax) % ndim


def _unreduce(g, shape, axes, keepdims):
    """Backward of a reduction over ``axes``: reinsert the reduced axes and broadcast to shape."""
    if not keepdims:
        g = np.expand_dims(g, axes)
    return np.broadcast_to(g, shape)


def _permutation(op, axes, shape):
    """``axes`` as non-negative ints, checked to be a permutation of all axes of ``shape``."""
    perm = tuple(_axis(op, a, shape, axes) for a in axes)
    if sorted(perm) != list(range(len(shape))):
        raise ValueError(f"{op}: axes {axes} are not a permutation of the {len(shape)} axes of "
                         f"shape {shape}")
    return perm


def _index(index, shape):
    """Normalise an index to a tuple; Tensors/lists become arrays, which must be int or bool."""
    items = index if isinstance(index, tuple) else (index,)
    out = []
    for i in items:
        if isinstance(i, Tensor):
            i = i.data
        elif isinstance(i, list):
            i = np.asarray(i)
        if isinstance(i, np.ndarray) and i.dtype.kind not in "iub":
            raise TypeError(f"getitem: index arrays must be integer or bool, got {i.dtype} "
                            f"{i.shape} (tensor shape {shape})")
        out.append(i)
    return tuple(out)
