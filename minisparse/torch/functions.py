"""SPEC sections 1-5 as PyTorch autograd Functions: top-K (and N:M, and threshold) with the
straight-through estimator, int8 / ternary fake quantization, and the linear layer.

Each Function's forward computes exactly what the NumPy reference computes (the same tie rule,
the same one-division scales, round half to even); its backward is the surrogate the SPEC
declares. Arguments are validated once, by the NumPy reference's own ``resolve_linear``.
"""

from __future__ import annotations

import torch

from ..linear import resolve_linear


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask [..., D]: the k largest |x| per row; ties go to the lower index (SPEC 1).

    torch.topk does not say which of several tied entries it returns, so it only finds the
    k-th largest magnitude: every larger |x| is kept, and of those equal to it the first
    k - #larger by index -- the order of np.argsort(-abs(x), kind="stable"), without a sort."""
    a = x.abs()
    kth = torch.topk(a, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # [..., 1]
    larger, tied = a > kth, a == kth
    room = k - larger.sum(dim=-1, keepdim=True)  # tied entries still kept, >= 1
    return larger | (tied & (tied.cumsum(dim=-1) <= room))


def block_topk_mask(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask [..., D]: the n largest |x| in each block of m consecutive features (SPEC 2)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)  # [..., D/M, M]
    return topk_mask(blocks, n).reshape(x.shape)


def l2_rescale(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r [..., 1] = ||x||_2 / max(||x ⊙ M||_2, 1e-12), both norms taken after dividing by the
    row's max|x| (as hypot does), so no finite row overflows or underflows (SPEC 1)."""
    top = x.abs().amax(dim=-1, keepdim=True)
    unit = x / torch.where(top > 0, top, torch.ones_like(top))  # |unit| <= 1
    norm = top * unit.square().sum(-1, keepdim=True).sqrt()
    kept = top * (unit * mask).square().sum(-1, keepdim=True).sqrt()
    return norm / kept.clamp_min(1e-12)  # an all-zero row gets r = 0 / 1e-12 = 0


class Sparsify(torch.autograd.Function):
    """y = r · (x ⊙ M) for a given bool mask M [..., D] and factor r [..., 1];
    backward r · g (STE, Q-Sparse eq. 13) or r · M ⊙ g (``ste=False``, eq. 12)."""

    @staticmethod
    def forward(ctx, x, mask, r, ste):
        ctx.save_for_backward(mask, r)
        ctx.ste = ste
        return torch.where(mask, x, 0) * r

    @staticmethod
    def backward(ctx, g):
        mask, r = ctx.saved_tensors
        g = g * r
        return (g if ctx.ste else g * mask), None, None, None


def topk(x, k=None, *, sparsity=None, block=None, rescale="none", ste=True):
    """Top-K (give k or sparsity) or N:M (block=(N, M)) of x [..., D] -> [..., D] (SPEC 1-2)."""
    k, block = resolve_linear(x.shape[-1], sparsity=sparsity, k=k, block=block,
                              rescale=rescale, ste=ste, op="topk")
    if k is None and block is None:
        raise ValueError("topk: give k, a sparsity > 0 or a block")
    return _topk(x, k, block, rescale, ste)


def _topk(x, k, block, rescale, ste):
    mask = topk_mask(x, k) if block is None else block_topk_mask(x, *block)
    r = l2_rescale(x, mask) if rescale == "l2" else torch.ones_like(x[..., :1])
    return Sparsify.apply(x, mask, r, ste)


def threshold(x: torch.Tensor, tau: torch.Tensor, *, ste=True) -> torch.Tensor:
    """SPEC 11: x ⊙ (|x| > tau), strict (ties at tau are dropped); backward as SPEC 1, r = 1."""
    return Sparsify.apply(x, x.abs() > tau, torch.ones_like(x[..., :1]), ste)


def absmax_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D], s [..., 1]): s = 127 / max(max|x|, 1e-5) per row,
    q = clip(round(x s), -128, 127) (SPEC 3; torch.round rounds half to even)."""
    gamma = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    # one division, as SPEC 3 writes it: torch evaluates `127 / t` as 127 * (1 / t)
    s = torch.full_like(gamma, 127.0) / gamma
    return torch.clamp(torch.round(x * s), -128, 127).to(torch.int8), s


def absmean_ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (t int8 in {-1, 0, 1}, s 0-d): s = 1 / max(mean|w|, 1e-5) over the whole matrix,
    t = clip(round(w s), -1, 1) (SPEC 4)."""
    alpha = w.abs().mean().clamp_min(1e-5)
    s = torch.ones_like(alpha) / alpha  # one division (see absmax_quantize)
    return torch.clamp(torch.round(w * s), -1, 1).to(torch.int8), s


class FakeQuant(torch.autograd.Function):
    """Q(x) = codes / s for a quantizer ``quantize(x) -> (codes, s)``: ``absmax_quantize``
    (int8 per row, SPEC 3) or ``absmean_ternarize`` (ternary, SPEC 4); backward the identity
    (STE). ``FakeQuant.apply(x, quantize)``."""

    @staticmethod
    def forward(ctx, x, quantize):
        codes, s = quantize(x)
        return codes / s

    @staticmethod
    def backward(ctx, g):
        return g, None


class WeightQuant(FakeQuant):
    """FakeQuant with the ternary absmean codes: ``WeightQuant.apply(w)`` = Qw(w) (SPEC 4)."""

    @classmethod
    def apply(cls, w):
        return super().apply(w, absmean_ternarize)


def qsparse_linear(x, w, *, sparsity=0.0, k=None, block=None, rescale="none", bits=None,
                   ste=True, tau=None):
    """Y [..., D_out] = sparsify(A(X)) @ Qw(W).T, X [..., D_in], W [D_out, D_in] (SPEC 5).

    A = int8 and Qw = ternary when bits=1.58; sparsify is top-K (k or sparsity), N:M (block),
    or the threshold mask |A(X)| > tau (SPEC 11) when ``tau`` is given; no bias."""
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"qsparse_linear: expected x [..., D_in] and w [D_out, D_in], got x "
                         f"{tuple(x.shape)} and w {tuple(w.shape)}")
    if tau is not None and (k is not None or block is not None or sparsity or rescale != "none"):
        raise ValueError("qsparse_linear: a threshold (tau) decides the mask alone; give no k, "
                         "sparsity, block or rescale with it (SPEC 11)")
    k, block = resolve_linear(w.shape[1], sparsity=sparsity, k=k, block=block, rescale=rescale,
                              bits=bits, ste=ste, op="qsparse_linear")
    a = FakeQuant.apply(x, absmax_quantize) if bits else x
    if tau is not None:  # every mask sees A(X), the values it masks
        a = threshold(a, tau, ste=ste)
    elif k is not None or block is not None:
        a = _topk(a, k, block, rescale, ste)
    return torch.nn.functional.linear(a, WeightQuant.apply(w) if bits else w)
