"""Wrong implementations of SPEC ops (mutants) that the harness must catch, and correct ones
(controls) it must pass. Each mutant's docstring names its bug. NumPy and PyTorch (the torch
ones are built only when torch imports). Used by test_mutants.py."""

from __future__ import annotations

import math

import numpy as np

# ---- shared correct pieces --------------------------------------------------------------------


def stable_mask(x, k):
    """SPEC 1: the first k of np.argsort(-|x|, kind="stable")."""
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k], True, -1)
    return mask


def block_mask(x, n, m):
    return stable_mask(x.reshape(*x.shape[:-1], -1, m), n).reshape(x.shape)


def safe_norm(x):
    """||x||_2 per row without overflow: max|x| times the norm of x / max|x| (as hypot)."""
    m = np.abs(x).max(axis=-1, keepdims=True)
    unit = x / np.where(m > 0, m, 1)
    return m * np.sqrt((unit * unit).sum(axis=-1, keepdims=True))


def l2_factor(x, mask):
    m = np.abs(x).max(axis=-1, keepdims=True)
    unit = x / np.where(m > 0, m, 1)
    a = np.sqrt((unit * unit).sum(axis=-1, keepdims=True))
    b = np.sqrt((np.where(mask, unit, 0) ** 2).sum(axis=-1, keepdims=True))
    small = m * b < 1e-12
    return np.where(small, np.where(small, m, 0) * a / x.dtype.type(1e-12),
                    a / np.where(small, 1, b))


def absmax(x):
    s = 127 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), x.dtype.type(1e-5))
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def absmean(w):
    s = 1 / np.maximum(np.abs(w).mean(), w.dtype.type(1e-5))
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def linear(x, w, grad_y, *, k, rescale, bits, ste, block=None, mask_fn=None, quant=absmax,
           ternary=absmean):
    """SPEC 5 forward and STE backward, with replaceable pieces for the mutants."""
    a = (lambda q, s: q / s)(*quant(x)) if bits else x
    mask, r = None, np.ones((*x.shape[:-1], 1), x.dtype)
    if k is not None or block is not None:
        mask = (mask_fn or (lambda a: stable_mask(a, k) if block is None else
                            block_mask(a, *block)))(a)
        if rescale == "l2":
            r = l2_factor(a, mask)
    z = a if mask is None else np.where(mask, a, 0) * r
    w_hat = (lambda t, s: t / s)(*ternary(w)) if bits else w
    gz = grad_y @ w_hat
    gx = gz * r if mask is None or ste else np.where(mask, gz * r, 0)
    return z @ w_hat.T, gx, grad_y.reshape(-1, w.shape[0]).T @ z.reshape(-1, w.shape[1])


# ---- controls: correct, by other routes ------------------------------------------------------


def c_topk(x, k):
    return np.where(stable_mask(x, k), x, 0)


def c_block_topk(x, n, m):
    return np.where(block_mask(x, n, m), x, 0)


def c_sparsify(x, grad_y, *, k=None, block=None, rescale, ste):
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    r = l2_factor(x, mask) if rescale == "l2" else np.ones((*x.shape[:-1], 1), x.dtype)
    return np.where(mask, x, 0) * r, grad_y * r if ste else np.where(mask, grad_y * r, 0)


def c_k_for(d, sparsity):
    return max(1, math.ceil((1.0 - sparsity) * d))


def c_threshold(x, tau):
    return np.where(np.abs(x) > tau, x, 0)


def c_absmax(x):
    return absmax(x)


def c_absmean(w):
    return absmean(w)


def c_absmax_fake(x):
    q, s = absmax(x)
    return q / s


def c_absmean_fake(w):
    t, s = absmean(w)
    return t / s


def c_sparse_linear(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    return linear(x, w, grad_y, k=k, rescale=rescale, bits=bits, ste=ste, block=block)


def c_bitlinear(x, w):
    return linear(x, w, np.zeros((*x.shape[:-1], w.shape[0]), x.dtype), k=None, rescale="none",
                  bits=1.58, ste=True)[0]


def c_bitlinear_int(q, t):
    return q.astype(np.int32) @ t.T.astype(np.int32)


def _glu(h, up, gate, down, act, k, rescale, bits, act_fn=None):
    def proj(x, w):
        return linear(x, w, np.zeros((*x.shape[:-1], w.shape[0]), x.dtype), k=k,
                      rescale=rescale, bits=bits, ste=True)[0]

    g = proj(h, gate)
    if act_fn is not None:
        a = act_fn(g)
    elif act == "relu2":
        a = np.maximum(g, 0) ** 2
    else:
        a = g * 0.5 * (1 + np.tanh(0.5 * g))  # g sigmoid(g), no overflow
    return proj(proj(h, up) * a, down)


def c_ffn(h, up, gate, down, *, act, k, rescale, bits):
    return _glu(h, up, gate, down, act, k, rescale, bits)


def moe(h, router, up, gate, down, *, top_experts, act, bits, renormalise=False, ties="low",
        f_divisor=True, router_dtype=None):
    """SPEC 6's mixture of experts, token by token, with switches for the mutants."""
    rd = router_dtype or h.dtype
    z = h.astype(rd) @ router.astype(rd).T
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p = (p / p.sum(axis=-1, keepdims=True)).astype(h.dtype)
    n, n_experts = p.shape
    y = np.zeros_like(h)
    counts = np.zeros(n_experts)
    for i in range(n):
        order = np.argsort(-p[i], kind="stable")
        if ties == "high":  # the same sort on the reversed row: higher indices first
            order = n_experts - 1 - np.argsort(-p[i][::-1], kind="stable")
        chosen = order[:top_experts]
        gates = p[i, chosen] / (p[i, chosen].sum() if renormalise else 1)
        for e, g in zip(chosen, gates, strict=True):
            counts[e] += 1
            y[i] += g * _glu(h[i:i + 1], up[e], gate[e], down[e], act, None, "none", bits)[0]
    f = counts / n / (top_experts if f_divisor else 1)
    return y, np.asarray(n_experts * np.sum(f * p.mean(axis=0)), h.dtype)


def c_moe(h, router, up, gate, down, *, top_experts, act, bits):
    return moe(h, router, up, gate, down, top_experts=top_experts, act=act, bits=bits)


NUMPY_CONTROLS = {
    "k_for": c_k_for, "topk": c_topk, "block_topk": c_block_topk, "sparsify": c_sparsify,
    "threshold": c_threshold, "absmax": c_absmax, "absmean": c_absmean,
    "absmax_fake": c_absmax_fake, "absmean_fake": c_absmean_fake,
    "sparse_linear": c_sparse_linear, "bitlinear": c_bitlinear, "bitlinear_int": c_bitlinear_int,
    "ffn": c_ffn, "moe": c_moe,
}

# ---- NumPy mutants ------------------------------------------------------------------------------


def m_ge_kth(x, k):
    """Keeps every |x| >= the K-th largest: more than K on ties."""
    a = np.abs(x)
    return np.where(a >= -np.sort(-a, axis=-1)[..., k - 1:k], x, 0)


def m_argpartition(x, k):
    """np.argpartition's top-K: ties in no particular order."""
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, np.argpartition(-np.abs(x), k - 1, axis=-1)[..., :k], True, -1)
    return np.where(mask, x, 0)


def m_ties_past_32(x, k):
    """Tile-edge bug: right for D <= 32; beyond, ties go to the higher index."""
    if x.shape[-1] <= 32:
        return c_topk(x, k)
    return c_topk(x[..., ::-1], k)[..., ::-1]


def m_by_value(x, k):
    """Ranks by x instead of |x|."""
    mask = np.zeros(x.shape, bool)
    np.put_along_axis(mask, np.argsort(-x, axis=-1, kind="stable")[..., :k], True, -1)
    return np.where(mask, x, 0)


def m_k_minus_one_past_128(x, k):
    """Tile-edge bug: keeps K - 1 entries in rows longer than 128."""
    return c_topk(x, max(1, k - 1)) if x.shape[-1] > 128 else c_topk(x, k)


def m_strided_blocks(x, n, m):
    """N:M over strided groups (every D/M-th feature) instead of consecutive blocks."""
    g = x.shape[-1] // m
    t = np.swapaxes(x.reshape(*x.shape[:-1], m, g), -1, -2)  # [..., g, m] strided
    return np.swapaxes(np.where(stable_mask(t, n), t, 0), -1, -2).reshape(x.shape)


def m_r_missing(x, grad_y, *, k=None, block=None, rescale, ste):
    """Ignores rescale="l2": r = 1 always."""
    return c_sparsify(x, grad_y, k=k, block=block, rescale="none", ste=ste)


def m_r_inverted(x, grad_y, *, k=None, block=None, rescale, ste):
    """r = ||x ⊙ M|| / ||x||: the factor upside down."""
    y, g = c_sparsify(x, grad_y, k=k, block=block, rescale=rescale, ste=ste)
    if rescale == "none":
        return y, g
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    r = l2_factor(x, mask)
    return y / r / r, g / r / r


def m_r_not_in_backward(x, grad_y, *, k=None, block=None, rescale, ste):
    """Forward rescaled, backward without r."""
    y, _ = c_sparsify(x, grad_y, k=k, block=block, rescale=rescale, ste=ste)
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    return y, grad_y if ste else np.where(mask, grad_y, 0)


def m_mask_in_ste(x, grad_y, *, k=None, block=None, rescale, ste):
    """Masks the gradient even with the STE."""
    return c_sparsify(x, grad_y, k=k, block=block, rescale=rescale, ste=False)


def m_naive_norm(x, grad_y, *, k=None, block=None, rescale, ste):
    """r from sqrt(sum x²): overflows (inf / NaN) on finite huge rows (SPEC 1)."""
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    y = np.where(mask, x, 0)
    r = np.ones((*x.shape[:-1], 1), x.dtype)
    if rescale == "l2":
        with np.errstate(all="ignore"):
            r = np.sqrt((x * x).sum(-1, keepdims=True)) / np.maximum(
                np.sqrt((y * y).sum(-1, keepdims=True)), 1e-12)
    return y * r, grad_y * r if ste else np.where(mask, grad_y * r, 0)


def m_scale_128(x):
    """s = 128 / γ: codes overflow the int8 range at the row max."""
    s = 128 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), x.dtype.type(1e-5))
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def m_per_tensor_int8(x):
    """One absmax scale for the whole tensor, not one per token."""
    s = np.full((*x.shape[:-1], 1), 127 / np.maximum(np.abs(x).max(), 1e-5), x.dtype)
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def m_no_floor(x):
    """s = 127 / γ without the 1e-5 floor: tiny rows get huge scales, zero rows NaN."""
    with np.errstate(all="ignore"):
        s = 127 / np.abs(x).max(axis=-1, keepdims=True)
        return np.clip(np.nan_to_num(np.rint(x * s)), -128, 127).astype(np.int8), s


def m_truncate_past_64(x):
    """Tile-edge bug: rows longer than 64 truncate (astype) instead of rounding."""
    q, s = absmax(x)
    if x.shape[-1] > 64:
        q = np.clip(x * s, -128, 127).astype(np.int8)
    return q, s


def m_ternary_max_scale(w):
    """Ternary scale from max|W| instead of mean|W|."""
    s = 1 / np.maximum(np.abs(w).max(), w.dtype.type(1e-5))
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def m_ternary_half_away(w):
    """Rounds W·s half away from zero (C's round), not half to even."""
    s = 1 / np.maximum(np.abs(w).mean(), w.dtype.type(1e-5))
    v = w * s
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -1, 1).astype(np.int8), s


def m_ternary_per_row(w):
    """One absmean scale per output row instead of one per matrix: s is [D_out, 1]."""
    s = 1 / np.maximum(np.abs(w).mean(axis=-1, keepdims=True), w.dtype.type(1e-5))
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s.mean().astype(w.dtype)


def m_mask_before_quant(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    """Top-K mask taken on X, before A: wrong where codes tie but floats do not."""
    kw = dict(k=k, rescale=rescale, bits=bits, ste=ste, block=block)
    if k is None and block is None:
        return linear(x, w, grad_y, **kw)
    raw = stable_mask(x, k) if block is None else block_mask(x, *block)
    return linear(x, w, grad_y, mask_fn=lambda a: raw, **kw)


def m_tail_dropped_past_8(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    """Tile-edge bug: outputs past the last full tile of 8 are left zero when D_out > 8."""
    y, gx, gw = linear(x, w, grad_y, k=k, rescale=rescale, bits=bits, ste=ste, block=block)
    d_out = w.shape[0]
    if d_out > 8 and d_out % 8:
        y = y.copy()
        y[..., d_out // 8 * 8:] = 0
    return y, gx, gw


def m_float16_accumulation(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    """Products summed in float16."""
    y, gx, gw = linear(x, w, grad_y, k=k, rescale=rescale, bits=bits, ste=ste, block=block)
    y16 = linear(x.astype(np.float16), w.astype(np.float16), grad_y.astype(np.float16), k=k,
                 rescale=rescale, bits=bits, ste=ste, block=block)[0]
    return y16.astype(x.dtype), gx, gw


def m_grad_w_unmasked(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    """dW = g^T A(x): the sparsified input not used in the weight gradient."""
    y, gx, _ = linear(x, w, grad_y, k=k, rescale=rescale, bits=bits, ste=ste, block=block)
    a = (lambda q, s: q / s)(*absmax(x)) if bits else x
    return y, gx, grad_y.reshape(-1, w.shape[0]).T @ a.reshape(-1, w.shape[1])


def m_bitlinear_no_weight_scale(x, w):
    """Forgets the weight scale: Q(x) @ t.T."""
    q, s = absmax(x)
    return (q / s) @ absmean(w)[0].T.astype(x.dtype)


def m_bitlinear_per_tensor(x, w):
    """BitLinear with one int8 scale for the whole batch."""
    q, s = m_per_tensor_int8(x)
    t, sw = absmean(w)
    return (q / s) @ (t / sw).T


def m_int8_accumulation(q, t):
    """The integer kernel accumulates in int16: sums wrap past 32767."""
    return (q.astype(np.int16) @ t.T.astype(np.int16)).astype(np.int32)


def m_int_tail_past_64(q, t):
    """Tile-edge bug: only the first multiple of 64 inputs are summed when D_in > 64."""
    d = q.shape[-1]
    n = d // 64 * 64 if d > 64 else d
    return q[..., :n].astype(np.int32) @ t[:, :n].T.astype(np.int32)


def m_k_round(d, sparsity):
    """K = round((1 - S) d) instead of the ceiling."""
    return max(1, round((1.0 - sparsity) * d))


def m_k_float32(d, sparsity):
    """(1 - S) * d in float32."""
    return max(1, math.ceil(float(np.float32(1.0 - sparsity) * np.float32(d))))


def m_threshold_ge(x, tau):
    """|x| >= tau: keeps the ties at tau (SPEC 11 drops them)."""
    return np.where(np.abs(x) >= tau, x, 0)


def m_fake_quant_times_scale(x):
    """Dequantizes as q * (γ / 128) instead of q / s."""
    q, _ = absmax(x)
    return (q * (np.maximum(np.abs(x).max(-1, keepdims=True), 1e-5) / 128)).astype(x.dtype)


def m_fake_ternary_no_clip(w):
    """Ternary fake-quant without the clip to [-1, 1]."""
    s = 1 / np.maximum(np.abs(w).mean(), w.dtype.type(1e-5))
    return np.rint(w * s) / s


def m_ffn_relu(h, up, gate, down, *, act, k, rescale, bits):
    """GLU with relu(g), not relu(g)² (and silu kept)."""
    fn = (lambda g: np.maximum(g, 0)) if act == "relu2" else None
    return _glu(h, up, gate, down, act, k, rescale, bits, act_fn=fn)


def m_moe_renormalised(h, router, up, gate, down, *, top_experts, act, bits):
    """Gates renormalised over the chosen experts (SPEC 6 keeps p)."""
    return moe(h, router, up, gate, down, top_experts=top_experts, act=act, bits=bits,
               renormalise=True)


def m_moe_high_index_ties(h, router, up, gate, down, *, top_experts, act, bits):
    """Equal router probabilities go to the higher expert index."""
    return moe(h, router, up, gate, down, top_experts=top_experts, act=act, bits=bits,
               ties="high")


def m_moe_f_not_divided(h, router, up, gate, down, *, top_experts, act, bits):
    """Load-balancing f_e not divided by k_e."""
    return moe(h, router, up, gate, down, top_experts=top_experts, act=act, bits=bits,
               f_divisor=False)



# Held-back classes (issue 13, second round): bugs of kinds the list above does not have.


def m_topk_batch_threshold(x, k):
    """One top-(K·rows) over the whole batch instead of K per row."""
    flat = x.reshape(1, -1)
    return c_topk(flat, k * (x.size // max(x.shape[-1], 1))).reshape(x.shape)


def m_blocks_offset(x, n, m):
    """N:M blocks start one feature late (wrapping round): misaligned with the rows."""
    return np.roll(c_block_topk(np.roll(x, -1, axis=-1), n, m), 1, axis=-1)


def m_r_l1(x, grad_y, *, k=None, block=None, rescale, ste):
    """r = ||X||₁ / ||X ⊙ M||₁: the L1 norm instead of the L2 norm."""
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    r = np.ones((*x.shape[:-1], 1), x.dtype)
    if rescale == "l2":
        a = np.abs(x).sum(-1, keepdims=True)
        r = a / np.maximum(np.where(mask, np.abs(x), 0).sum(-1, keepdims=True), 1e-12)
    return np.where(mask, x, 0) * r, grad_y * r if ste else np.where(mask, grad_y * r, 0)


def m_gamma_first_tile(x):
    """Tile-edge bug: γ is the max over the first 64 features only when D > 64."""
    gamma = np.abs(x[..., :64]).max(axis=-1, keepdims=True)
    s = 127 / np.maximum(gamma, x.dtype.type(1e-5))
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def m_ternary_floor_1e6(w):
    """Ternary scale floor 1e-6 instead of 1e-5: wrong for matrices with mean|W| < 1e-5."""
    s = 1 / np.maximum(np.abs(w).mean(), w.dtype.type(1e-6))
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def m_r_before_quant(x, w, grad_y, *, k, rescale, bits, ste, block=None):
    """The l2 factor r from X instead of A(X), the values the mask keeps."""
    y, gx, gw = linear(x, w, grad_y, k=k, rescale="none", bits=bits, ste=ste, block=block)
    if rescale == "none" or (k is None and block is None):
        return y, gx, gw
    mask = stable_mask(x, k) if block is None else block_mask(x, *block)
    r = l2_factor(x, mask)
    return y * r, gx * r, linear(x, w, grad_y * r, k=k, rescale="none", bits=bits, ste=ste,
                                 block=block)[2]


def m_bitlinear_square_transposed(x, w):
    """Reads W as [D_in, D_out] (x @ W) where that fits, i.e. for square W."""
    if w.shape[0] != w.shape[1]:
        return c_bitlinear(x, w)
    return c_bitlinear(x, np.ascontiguousarray(w.T))


def m_k_ceil_epsilon(d, sparsity):
    """ceil((1 - S) d - 1e-9): an epsilon against 3.0000000000000004 (SPEC: ceil as computed)."""
    return max(1, math.ceil((1.0 - sparsity) * d - 1e-9))


def m_ffn_up_gate_swapped(h, up, gate, down, *, act, k, rescale, bits):
    """GLU with the roles of up and gate exchanged: gate(h) * act(up(h))."""
    return _glu(h, gate, up, down, act, k, rescale, bits)


def m_moe_router_float16(h, router, up, gate, down, *, top_experts, act, bits):
    """Router logits and softmax in float16."""
    return moe(h, router, up, gate, down, top_experts=top_experts, act=act, bits=bits,
               router_dtype=np.float16)


NUMPY_MUTANTS = [
    ("topk", m_ge_kth), ("topk", m_argpartition), ("topk", m_ties_past_32), ("topk", m_by_value),
    ("topk", m_k_minus_one_past_128), ("block_topk", m_strided_blocks),
    ("sparsify", m_r_missing), ("sparsify", m_r_inverted), ("sparsify", m_r_not_in_backward),
    ("sparsify", m_mask_in_ste), ("sparsify", m_naive_norm), ("absmax", m_scale_128),
    ("absmax", m_per_tensor_int8), ("absmax", m_no_floor), ("absmax", m_truncate_past_64),
    ("absmean", m_ternary_max_scale), ("absmean", m_ternary_half_away),
    ("absmean", m_ternary_per_row), ("sparse_linear", m_mask_before_quant),
    ("sparse_linear", m_tail_dropped_past_8), ("sparse_linear", m_float16_accumulation),
    ("sparse_linear", m_grad_w_unmasked), ("bitlinear", m_bitlinear_no_weight_scale),
    ("bitlinear", m_bitlinear_per_tensor), ("bitlinear_int", m_int8_accumulation),
    ("bitlinear_int", m_int_tail_past_64), ("k_for", m_k_round), ("k_for", m_k_float32),
    ("threshold", m_threshold_ge), ("absmax_fake", m_fake_quant_times_scale),
    ("absmean_fake", m_fake_ternary_no_clip), ("ffn", m_ffn_relu),
    ("moe", m_moe_renormalised), ("moe", m_moe_high_index_ties), ("moe", m_moe_f_not_divided),
    ("topk", m_topk_batch_threshold), ("block_topk", m_blocks_offset), ("sparsify", m_r_l1),
    ("absmax", m_gamma_first_tile), ("absmean", m_ternary_floor_1e6),
    ("sparse_linear", m_r_before_quant), ("bitlinear", m_bitlinear_square_transposed),
    ("k_for", m_k_ceil_epsilon), ("ffn", m_ffn_up_gate_swapped), ("moe", m_moe_router_float16),
]


# ---- PyTorch mutants and controls ---------------------------------------------------------------


def torch_cases():
    """(mutants, controls): lists of (op, fn) in PyTorch, taking and returning tensors."""
    import torch

    def stable(x, k):
        idx = torch.sort(-x.abs(), dim=-1, stable=True).indices[..., :k]
        return torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, True)

    def t_topk(x, k):
        """Control: a stable sort of -|x|."""
        return x * stable(x, k)

    def t_topk_indices(x, k):
        """torch.topk's indices: the order among ties is unspecified."""
        idx = torch.topk(x.abs(), k, dim=-1).indices
        return x * torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, True)

    def t_absmax_reciprocal(x):
        """Control: 127 * (1 / γ), the spelling PyTorch compiles to (legal under SPEC 3)."""
        s = 127 * (1 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5))
        return torch.clamp(torch.round(x * s), -128, 127).to(torch.int8), s

    def t_absmax_truncate(x):
        """Codes by casting x * s to int8: truncation toward zero, no rounding."""
        s = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        return torch.clamp(x * s, -128, 127).to(torch.int8), s

    def t_sparsify(detach_r):
        def fn(x, grad_y, *, k=None, block=None, rescale, ste):
            mask = stable(x, k) if block is None else stable(
                x.reshape(*x.shape[:-1], -1, block[1]), block[0]).reshape(x.shape)
            y = x * mask
            r = torch.ones_like(x[..., :1])
            if rescale == "l2":
                m = x.abs().amax(dim=-1, keepdim=True)
                m = torch.where(m > 0, m, torch.ones_like(m))
                a, b = (x / m).norm(dim=-1, keepdim=True), (y / m).norm(dim=-1, keepdim=True)
                r = torch.where(m * b < 1e-12, m * a / 1e-12, a / torch.where(
                    m * b < 1e-12, torch.ones_like(b), b))
                r = r.detach() if detach_r else r
            ste_y = x + (y - x).detach() if ste else y  # STE: dy/dx = 1
            return ste_y * r  # the harness runs y.backward(grad_y)
        fn.__doc__ = ("Control: STE top-K with r a constant in the backward." if detach_r else
                      "r differentiated: autograd flows through the l2 factor.")
        return fn

    def ternary(w, half_away=False):
        s = 1 / w.abs().mean().clamp(min=1e-5)
        v = w * s
        r = torch.sign(v) * torch.floor(v.abs() + 0.5) if half_away else torch.round(v)
        return torch.clamp(r, -1, 1) / s

    def act_quant(x, per_tensor=False):
        gamma = x.abs().amax() if per_tensor else x.abs().amax(dim=-1, keepdim=True)
        s = 127 / gamma.clamp(min=1e-5)
        return torch.clamp(torch.round(x * s), -128, 127) / s

    class BitLinear(torch.nn.Linear):
        """Control: the BitNet b1.58 BitLinear of common PyTorch code (an nn.Linear subclass,
        STE through .detach()), built by the harness as BitLinear(D_in, D_out, bias=False)."""

        per_tensor = False
        half_away = False

        def forward(self, x):
            xq = x + (act_quant(x, self.per_tensor) - x).detach()
            wq = self.weight + (ternary(self.weight, self.half_away) - self.weight).detach()
            return torch.nn.functional.linear(xq, wq)

    class BitLinearPerTensor(BitLinear):
        """One activation scale for the whole batch."""

        per_tensor = True

    class BitLinearHalfAway(BitLinear):
        """Ternary codes rounded half away from zero."""

        half_away = True

    def t_linear(x, w, grad_y, *, k, rescale, bits, ste, block=None, quantize_w_in_backward=True):
        a = x + (act_quant(x) - x).detach() if bits else x
        if k is not None or block is not None:
            a = t_sparsify(True)(a, None, k=k, block=block, rescale=rescale, ste=ste)
        wq = w + (ternary(w) - w).detach() if bits else w
        return a @ wq.T

    def t_linear_float16(x, w, grad_y, **kw):
        """Products in float16 (a half-precision matmul) and cast back."""
        return t_linear(x.half(), w.half(), grad_y, **kw).to(x.dtype)

    mutants = [("topk", t_topk_indices), ("absmax", t_absmax_truncate),
               ("sparsify", t_sparsify(False)), ("bitlinear", BitLinearPerTensor),
               ("bitlinear", BitLinearHalfAway), ("sparse_linear", t_linear_float16)]
    controls = [("topk", t_topk), ("absmax", t_absmax_reciprocal), ("sparsify", t_sparsify(True)),
                ("bitlinear", BitLinear), ("sparse_linear", t_linear)]
    return mutants, controls
