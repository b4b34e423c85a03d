"""Parameter and Module: the thin object layer over the engine (no registries, no metaclasses).

A Module finds its parameters by walking its own attributes in definition order, so names come
out SPEC-style: ``blocks.0.attn.q``, ``norm``, ... One naming rule keeps SPEC's names for layers
that are Modules: a Parameter attribute called ``weight`` is named by its module (the
SparseLinear ``blocks.0.attn.q`` holds the parameter ``blocks.0.attn.q``, not ``...q.weight``).
"""

from __future__ import annotations

import numpy as np

from minisparse.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that requires grad: what ``Module.named_parameters`` finds and optimizers update."""

    def __init__(self, data):
        super().__init__(data, requires_grad=True)


class Module:
    """Base class: subclasses set Parameters, Modules and lists of Modules as attributes and
    define ``forward``; ``module(x)`` calls ``forward(x)``."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def named_parameters(self, prefix=""):
        """Yield ``(dotted_name, Parameter)`` in attribute-definition order: a Parameter attribute
        is ``name``, a Module ``name.<its names>``, a list/tuple item ``name.{i}...``. A shared
        Parameter is yielded once, under its first name."""
        seen = set()
        for name, p in _walk(self, prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def children(self):
        """The direct sub-modules, in attribute-definition order."""
        return [child for _, child in _children(self, "")]

    def named_modules(self, prefix=""):
        """Yield ``(dotted_name, Module)`` for this module ("" for itself) and every Module
        below it, parents before children, in attribute-definition order."""
        yield prefix.rstrip("."), self
        for name, child in _children(self, prefix):
            yield from child.named_modules(f"{name}.")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def state_dict(self):
        """``{name: copy of the parameter's array}`` (plain NumPy, ready for ``np.savez``)."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays into the parameters in place (cast to each parameter's dtype); the key
        sets must match exactly and every shape must agree."""
        params = dict(self.named_parameters())
        missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params)
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            value = np.asarray(state[name])
            if value.shape != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {value.shape} in the state "
                                 f"but {p.shape} in the model")
            p.data[...] = value


def _walk(module, prefix):
    """Every (name, Parameter) reachable from a Module's attributes, duplicates included."""
    for name, item in _items(module, prefix):
        if isinstance(item, Parameter):
            # a module's `weight` is the module: blocks.0.attn.q, not blocks.0.attn.q.weight
            yield (prefix[:-1] if prefix and name == prefix + "weight" else name), item
        else:
            yield from _walk(item, f"{name}.")


def _children(module, prefix):
    """(name, Module) of the direct sub-modules, in attribute-definition order."""
    return [(name, item) for name, item in _items(module, prefix) if isinstance(item, Module)]


def _items(module, prefix):
    """(dotted name, Parameter or Module) of a Module's attributes; a list/tuple item is
    ``name.{i}``."""
    for name, attr in vars(module).items():
        if isinstance(attr, (Parameter, Module)):
            yield prefix + name, attr
        elif isinstance(attr, (list, tuple)):
            for i, item in enumerate(attr):
                if isinstance(item, (Parameter, Module)):
                    yield f"{prefix}{name}.{i}", item
