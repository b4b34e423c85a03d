"""Lesson 7 exercise: a PyTorch BitLinear (SPEC 5 at bits=1.58) with straight-through gradients."""

import torch


class _RoundSTE(torch.autograd.Function):
    """clamp(round(v), lo, hi) in the forward (half to even), the identity in the backward."""

    @staticmethod
    def forward(ctx, v, lo, hi):
        return torch.clamp(torch.round(v), lo, hi)

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _TopKSTE(torch.autograd.Function):
    """a ⊙ Topk(|a|) with SPEC 1's tie rule (a stable sort); backward: the identity (eq. 13)."""

    @staticmethod
    def forward(ctx, a, k):
        idx = torch.sort(-a.abs(), dim=-1, stable=True).indices[..., :k]
        return a * torch.zeros_like(a, dtype=torch.bool).scatter(-1, idx, True)

    @staticmethod
    def backward(ctx, g):
        return g, None


def bitlinear(x, w, k):
    """y = topk(A(x)) @ Qw(w).T: A per-row int8 absmax, Qw ternary absmean, top-k of A(x)."""
    s_x = 127 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    a = _RoundSTE.apply(x * s_x, -128, 127) / s_x
    if k is not None:
        a = _TopKSTE.apply(a, k)
    s_w = 1 / w.detach().abs().mean().clamp(min=1e-5)
    return a @ (_RoundSTE.apply(w * s_w, -1, 1) / s_w).T
