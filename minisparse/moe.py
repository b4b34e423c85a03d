"""Q-Sparse + mixture of experts (SPEC section 6, ``ffn = "moe"``): a softmax router in full
precision picks the top k_e experts of each token; the output is the gate-weighted sum of the
chosen experts (GLU blocks of SparseLinear), computed on the tokens routed to each.

Per token h [d]: p = softmax(h @ router.T) [E]; chosen = the k_e largest p (ties: lower index);
y = Σ_chosen p_e · expert_e(h) (gates not renormalised). Gradients reach the router through the
gates p_e and the experts through their outputs, never through the choice. Load balancing:
aux = E · Σ_e f_e P_e with f_e = (tokens choosing e) / (B·T·k_e), a constant, and P_e = mean p_e.
"""

from __future__ import annotations

import numpy as np

from .functions import softmax
from .nn import Module, Parameter
from .tensor import Tensor


class MoE(Module):
    """Router [E, d] (a plain Parameter: dense, full precision) and E expert feed-forwards."""

    def __init__(self, router: Parameter, experts: list, top_experts: int):
        self.router = router
        self.experts = experts
        self.top_experts = top_experts
        self.aux = None  # the last forward's load-balancing loss (a 0-d Tensor)
        self.load = None  # the last forward's fraction of tokens per expert, f_e k_e [E]
        self.observe_input = None  # if set, called with every token's input h [N, d] ndarray

    def forward(self, h):
        """h (B, T, d) -> (B, T, d); sets self.aux and self.load."""
        B, T, d = h.shape
        x = h.reshape(B * T, d)  # one row per token
        if self.observe_input is not None:
            self.observe_input(x.data)
        p = softmax(x @ self.router.T, axis=-1)  # (N, E), full precision
        chosen = route(p.data, self.top_experts)  # (N, E) bool, a constant for the backward
        out = None  # top_experts >= 1: every token chooses some expert, so out gets set
        for e, expert in enumerate(self.experts):
            rows = np.flatnonzero(chosen[:, e])
            if rows.size == 0:  # no token chose e: its weights get no gradient (zeros)
                continue
            gate = p[rows, e].reshape(-1, 1)  # (n_e, 1)
            y = scatter_rows(expert(x[rows]) * gate, rows, B * T)  # (N, d)
            out = y if out is None else out + y
        counts = chosen.sum(axis=0)  # tokens per expert
        self.load = counts / (B * T)
        f = counts / (B * T * self.top_experts)  # f_e, a constant
        self.aux = (p.mean(axis=0) * f.astype(p.dtype)).sum() * float(len(self.experts))
        return out.reshape(B, T, d)


def route(p: np.ndarray, k: int) -> np.ndarray:
    """Bool (N, E): each row's k largest p, ties to the lower index (a stable sort of -p)."""
    order = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    chosen = np.zeros(p.shape, dtype=bool)
    np.put_along_axis(chosen, order, True, axis=-1)
    return chosen


def scatter_rows(y: Tensor, rows: np.ndarray, n: int) -> Tensor:
    """Y (n, d) with Y[rows] = y (distinct rows), zeros elsewhere; backward g[rows]."""
    out = np.zeros((n, *y.shape[1:]), dtype=y.dtype)
    out[rows] = y.data
    return Tensor.from_op(out, (y,), lambda g: (g[rows],), "scatter_rows")
