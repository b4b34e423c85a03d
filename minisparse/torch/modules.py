"""Modules over ``qsparse_linear``: the drop-in ``QSparseLinear`` and the GLU and
mixture-of-experts feed-forwards of SPEC section 6.

The feed-forwards hold their weights as raw Parameters named as in SPEC 6 (``up``, ``gate``,
``down``, ``router``, ``experts.{e}.*``), so a model's ``state_dict`` needs no renaming.
``project`` is the one place a projection runs, and where ``trace`` records it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..linear import resolve_linear
from .functions import qsparse_linear, topk_mask


class QSparseLinear(nn.Module):
    """A drop-in for ``nn.Linear(in_features, out_features, bias=False)`` computing SPEC 5:
    Y = sparsify(A(X)) @ Qw(W).T, with top-K (``sparsity`` or ``k``) or N:M (``block``)
    sparsity, optional l2 ``rescale``, ``bits=1.58`` (int8 activations, ternary weights) and
    the straight-through gradient (``ste=False``: the masked one). No bias (SPEC 5)."""

    def __init__(self, in_features, out_features, bias=False, *, sparsity=0.0, k=None,
                 block=None, rescale="none", bits=None, ste=True, device=None, dtype=None):
        super().__init__()
        if bias:
            raise ValueError("QSparseLinear: bias must be False (SPEC 5 has no biases)")
        self.in_features, self.out_features = in_features, out_features
        resolve_linear(in_features, sparsity=sparsity, k=k, block=block, rescale=rescale,
                       bits=bits, ste=ste, op="QSparseLinear")  # fail here, not at forward
        self.options = dict(sparsity=sparsity, k=k, block=block, rescale=rescale, bits=bits,
                            ste=ste)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> QSparseLinear:
        """A QSparseLinear holding a copy of a bias-free ``nn.Linear``'s weight."""
        if linear.bias is not None:
            raise ValueError("QSparseLinear.from_linear: the nn.Linear has a bias; SPEC 5 has "
                             "none (build it with bias=False)")
        layer = cls(linear.in_features, linear.out_features, device=linear.weight.device,
                    dtype=linear.weight.dtype, **options)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
        return layer

    def forward(self, x):
        return qsparse_linear(x, self.weight, **self.options)

    def extra_repr(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, {options}"


def project(name, x, w, linear: dict, tau=None, trace=None):
    """One SPEC 5 projection; with a ``trace`` dict, record trace[name] = (x, y) as NumPy
    arrays: x [..., D_in] as given (before A and sparsify), y [..., D_out]."""
    y = qsparse_linear(x, w, tau=tau, **linear)
    if trace is not None:
        trace[name] = (_numpy(x), _numpy(y))
    return y


def _numpy(t):
    """A tensor as a NumPy array; bf16 / fp16 (under autocast) widened to float32."""
    t = t.detach().cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


def normal_(w: torch.Tensor, rng, std: float) -> torch.Tensor:
    """SPEC 6 init: normal(0, std) drawn from the NumPy Generator ``rng`` in the engine's
    order (float64 draws rounded to w's dtype), so one seed gives the NumPy model's weights."""
    with torch.no_grad():
        return w.copy_(torch.from_numpy(rng.normal(0.0, std, tuple(w.shape))))


class GLU(nn.Module):
    """GLU feed-forward (SPEC 6): down(up(h) * relu(gate(h))^2) (Q-Sparse eq. 11) or
    down(up(h) * silu(gate(h))); up, gate [ffn_hidden, d_model], down [d_model, ffn_hidden]."""

    def __init__(self, d_model, ffn_hidden, act, down_std, rng, dtype):
        super().__init__()
        self.up = nn.Parameter(normal_(torch.empty(ffn_hidden, d_model, dtype=dtype), rng, 0.02))
        self.gate = nn.Parameter(normal_(torch.empty(ffn_hidden, d_model, dtype=dtype), rng,
                                         0.02))
        self.down = nn.Parameter(normal_(torch.empty(d_model, ffn_hidden, dtype=dtype), rng,
                                         down_std))
        self.act = act

    def forward(self, h, linear, taus=(None, None), trace=None, name="ffn"):
        """h [..., d_model] -> [..., d_model]; taus = (ffn_in, ffn_down) thresholds or None."""
        u = project(f"{name}.up", h, self.up, linear, taus[0], trace)  # [..., ffn_hidden]
        g = project(f"{name}.gate", h, self.gate, linear, taus[0], trace)
        f = u * (torch.relu(g) ** 2 if self.act == "relu2" else nn.functional.silu(g))
        return project(f"{name}.down", f, self.down, linear, taus[1], trace)


class MoE(nn.Module):
    """Mixture of GLU experts (SPEC 6): p = softmax(h @ router.T) in full precision, each token
    goes to its ``top`` largest p (ties: lower index) with gate p_e (not renormalised); the
    output is Σ_chosen p_e · expert_e(h), each expert run on its routed tokens only."""

    def __init__(self, d_model, ffn_hidden, act, down_std, rng, dtype, n_experts, top):
        super().__init__()
        self.router = nn.Parameter(normal_(torch.empty(n_experts, d_model, dtype=dtype), rng,
                                           0.02))
        self.experts = nn.ModuleList(
            GLU(d_model, ffn_hidden, act, down_std, rng, dtype) for _ in range(n_experts))
        self.top = top

    def forward(self, h, linear, taus=(None, None), trace=None, name="ffn"):
        """h [B, T, d] -> (out [B, T, d], load-balancing loss E · Σ_e f_e P_e)."""
        rows = h.reshape(-1, h.shape[-1])  # [N, d], N = B·T tokens
        with torch.autocast(rows.device.type, enabled=False):  # the router stays in fp32/fp64
            p = torch.softmax(rows @ self.router.T, dim=-1)  # [N, E]
        chosen = topk_mask(p.detach(), self.top)  # [N, E] bool; the choice carries no gradient
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            tokens = chosen[:, e].nonzero().squeeze(-1)  # [n_e]
            if tokens.numel() == 0:
                continue
            y = expert(rows[tokens], linear, taus, trace, f"{name}.experts.{e}")  # [n_e, d]
            out = out.index_add(0, tokens, (y * p[tokens, e, None]).to(out.dtype))
        n_experts = p.shape[-1]
        f = chosen.to(p.dtype).mean(0) / self.top  # fraction choosing e, / k_e: a constant
        aux = n_experts * (f * p.mean(0)).sum()
        return out.reshape(h.shape), aux
