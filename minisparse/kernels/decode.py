"""The whole single-token forward of a packed model in one compiled call (SPEC 6, decoding).

A decode step through the engine runs hundreds of small NumPy operations and Python calls per
token; their fixed costs, not the weights, set the speed. ``Decoder.step(token)`` does the same
math in one Numba function: embedding, and per block RMSNorm, the int8 codes (SPEC 3), top-K
(SPEC 1), the q/k/v products on the kept inputs, RoPE, attention over the KV cache, o, RMSNorm,
up/gate, the GLU, down; then the final norm and the tied head. The projections are the packed
kernels (``PackedLinear.gemv``'s math: exact int32 sums / (s_x s_w) for ternary, the kept rows
of W^T for float), the rest follows the reference op for op in float32, so the logits equal
the engine's up to float rounding (attention sums in another order) and, where that moves an
int8 code across a rounding boundary (SPEC 3), by one code.

Configs the step does not cover (N:M blocks, rescale "l2", MoE, threshold sparsity: each would
be one more branch in ``_project``'s caller) get ``decoder_for(model) is None`` and keep the
engine path. The SIMD level of the ternary products is a compile-time constant (``width``:
0 portable, 32 AVX2, 64 AVX-512), so a CPU without AVX2 never compiles the intrinsics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.core import errors
from numba.extending import overload

from ..sparsity import k_for
from .simd import _gemv_serial, simd_level
from .sparse_matmul import _gemv_serial as _float_gemv
from .ternary import _absmax_row, _ternary_serial
from .topk import _row_indices


def _ternary_product(width, q, idx, codes, d_out):
    """int32 [d_out] = Σ_{i in idx} q_i t_oi (a stub: the compiled versions are below)."""
    raise NotImplementedError("compiled only")


@overload(_ternary_product, prefer_literal=True)
def _ternary_product_impl(width, q, idx, codes, d_out):
    if not isinstance(width, types.IntegerLiteral):  # the caller retries with the literal
        raise errors.RequireLiteralValue("_ternary_product: width must be a constant")
    w = width.literal_value
    if w == 0:
        def portable(width, q, idx, codes, d_out):
            return _ternary_serial(q.astype(np.int16), idx, codes.view(np.uint16), d_out)
        return portable
    if w == 32:
        def avx2(width, q, idx, codes, d_out):
            return _gemv_serial(32, q, idx, codes, d_out, _lane_table(32))
        return avx2
    if w == 64:  # 64-byte tiles need Q % 64 == 0, else the AVX2 tiles (as simd_gemv_int)
        def avx512(width, q, idx, codes, d_out):
            if codes.shape[1] % 64 == 0:
                return _gemv_serial(64, q, idx, codes, d_out, _lane_table(64))
            return _gemv_serial(32, q, idx, codes, d_out, _lane_table(32))
        return avx512
    return None


@njit(cache=True, inline="always")
def _lane_table(width):
    # simd.lane_bytes(width) rebuilt in compiled code (a constant small table)
    half = width // 2
    lanes = np.empty((2, half), np.int64)
    for h in range(2):
        for lane in range(half):
            lanes[h, lane] = 16 * (lane >> 3) + 8 * h + (lane & 7)
    return lanes


@njit(cache=True, inline="always")
def _rmsnorm(x, g, eps):
    # SPEC 6 in float32 as the engine computes it: r = 1 / sqrt(mean(x^2) + eps), (x r) g
    acc = np.float32(0)
    for j in range(x.shape[0]):
        acc += x[j] * x[j]
    r = np.float32(1) / np.sqrt(acc / np.float32(x.shape[0]) + np.float32(eps))
    return (x * r) * g


@njit(cache=True, inline="always")
def _project(width, x, k, codes, scale, wt):
    """SPEC 5 for one token x [D_in]: ternary (codes, scale) when codes has rows, else float
    (wt [D_in, D_out]); top-K of k inputs when 0 < k < D_in."""
    d_in = x.shape[0]
    if codes.shape[0] > 0:
        q = np.empty(d_in, np.int8)
        s = np.empty(1, x.dtype)
        _absmax_row(x, q, s)
        if 0 < k < d_in:
            qf = q.astype(np.float32)
            idx = _row_indices(qf, qf.view(np.int32), 31, k)
        else:
            idx = np.arange(d_in)
        acc = _ternary_product(width, q, idx, codes, wt.shape[1])
        return (acc / (s[0] * np.float32(scale))).astype(np.float32)
    if 0 < k < d_in:
        idx = _row_indices(x, x.view(np.int32), 31, k)
    else:
        idx = np.arange(d_in)
    return _float_gemv(x, idx, wt)


@njit(cache=True, fastmath=True)
def _attend(qh, keys, values, n, out):
    """out [dh] = softmax(K qh) V over the first n cached positions (keys, values [T, dh]).
    fastmath: the score dot products may reassociate (float rounding only), which lets LLVM
    vectorise them; the value sums run over positions in order, a vector of dh at a time."""
    scores = np.empty(n, np.float32)
    for t in range(n):
        acc = np.float32(0)
        for j in range(qh.shape[0]):
            acc += qh[j] * keys[t, j]
        scores[t] = acc
    scores = np.exp(scores - scores.max())
    scores /= scores.sum()
    out[:] = 0
    for t in range(n):
        for j in range(qh.shape[0]):
            out[j] += scores[t] * values[t, j]


@njit(cache=True, inline="always")
def _block(width, layer, pos, x, norms, codes_d, codes_f, codes_down, scales, wt_d, wt_f,
           wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f, relu2, eps):
    """Block ``layer`` for one position: x [d] updated in place; k_cache / v_cache
    [L, H, T, dh] get the position's keys and values. Projections per layer: d -> d (q, k, v,
    o: index 0-3 of codes_d / wt_d), d -> f (up, gate), f -> d (down)."""
    d = x.shape[0]
    dh = d // n_heads
    half = dh // 2
    inv = np.float32(1.0 / math.sqrt(dh))
    h = _rmsnorm(x, norms[layer, 0], eps)
    q = _project(width, h, k_d, codes_d[layer, 0], scales[layer, 0], wt_d[layer, 0])
    kk = _project(width, h, k_d, codes_d[layer, 1], scales[layer, 1], wt_d[layer, 1])
    v = _project(width, h, k_d, codes_d[layer, 2], scales[layer, 2], wt_d[layer, 2])
    qh = np.empty(dh, np.float32)
    att_out = np.empty(d, np.float32)
    for hd in range(n_heads):
        o = hd * dh
        for j in range(dh):  # RoPE, half-split: rotate_half([x1, x2]) = [-x2, x1]
            partner = -q[o + j + half] if j < half else q[o + j - half]
            kpartner = -kk[o + j + half] if j < half else kk[o + j - half]
            k_cache[layer, hd, pos, j] = kk[o + j] * cos[pos, j] + kpartner * sin[pos, j]
            qh[j] = (q[o + j] * cos[pos, j] + partner * sin[pos, j]) * inv
            v_cache[layer, hd, pos, j] = v[o + j]
        _attend(qh, k_cache[layer, hd], v_cache[layer, hd], pos + 1, att_out[o:o + dh])
    x += _project(width, att_out, k_d, codes_d[layer, 3], scales[layer, 3], wt_d[layer, 3])
    h = _rmsnorm(x, norms[layer, 1], eps)
    u = _project(width, h, k_d, codes_f[layer, 0], scales[layer, 4], wt_f[layer, 0])
    g = _project(width, h, k_d, codes_f[layer, 1], scales[layer, 5], wt_f[layer, 1])
    if relu2:
        f = u * np.maximum(g, np.float32(0)) ** 2
    else:
        f = u * (g * (np.float32(0.5) * (np.float32(1) + np.tanh(np.float32(0.5) * g))))
    x += _project(width, f, k_f, codes_down[layer], scales[layer, 6], wt_down[layer])


@njit(cache=True)
def _forward(width, tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
             scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f, relu2,
             eps):
    """Logits [T, V] of ``tokens`` [T] at positions pos0 .. pos0 + T - 1, after the cached
    ones. Layer by layer, every position through a block before the next block: the block's
    weights stay in cache over the T positions (the reuse a GEMM gets), and position t reads
    the keys / values of positions <= t of the same layer, already written (causal)."""
    n = tokens.shape[0]
    x = np.empty((n, tok_emb.shape[1]), np.float32)
    for r in range(n):
        x[r] = tok_emb[tokens[r]]
    for layer in range(norms.shape[0]):
        for r in range(n):
            _block(width, layer, pos0 + r, x[r], norms, codes_d, codes_f, codes_down, scales,
                   wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f, relu2,
                   eps)
    logits = np.empty((n, tok_emb.shape[0]), np.float32)
    for r in range(n):
        logits[r] = tok_emb @ _rmsnorm(x[r], final_norm, eps)
    return logits


# One cached entry per SIMD level, each passing its width as a literal (a new process then
# loads the forward from the cache instead of typing it again).
@njit(cache=True)
def _forward_portable(tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                      scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                      relu2, eps):
    return _forward(0, tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                    scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                    relu2, eps)


@njit(cache=True)
def _forward_avx2(tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                  scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                  relu2, eps):
    return _forward(32, tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                    scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                    relu2, eps)


@njit(cache=True)
def _forward_avx512(tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                    scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                    relu2, eps):
    return _forward(64, tokens, pos0, tok_emb, norms, final_norm, codes_d, codes_f, codes_down,
                    scales, wt_d, wt_f, wt_down, k_cache, v_cache, cos, sin, n_heads, k_d, k_f,
                    relu2, eps)


_ENTRY = {"portable": _forward_portable, "avx2": _forward_avx2, "avx512": _forward_avx512}
_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down")


class Decoder:
    """A packed float32 model's weights stacked per kind of projection, its KV cache, and
    ``step(token) -> logits [V]`` (the next position of the sequence)."""

    def __init__(self, model):
        c = model.config
        self.config = c
        p = dict(model.named_parameters())
        blocks = range(c.n_layers)
        packed = [[p[f"blocks.{i}.{kind}"].packed for kind in _KINDS] for i in blocks]
        ternary = c.bits is not None
        empty = np.zeros((c.n_layers, 1, 0, 0), np.uint8)
        if ternary:
            self.codes_d = np.stack([[pl.ternary.codes for pl in row[:4]] for row in packed])
            self.codes_f = np.stack([[pl.ternary.codes for pl in row[4:6]] for row in packed])
            self.codes_down = np.stack([row[6].ternary.codes for row in packed])
            self.scales = np.array([[pl.ternary.scale for pl in row] for row in packed])
            # the float products' slots only carry D_out (shape[1]) for the kernels
            self.wt_d = np.zeros((c.n_layers, 4, 0, c.d_model), np.float32)
            self.wt_f = np.zeros((c.n_layers, 2, 0, c.ffn_hidden), np.float32)
            self.wt_down = np.zeros((c.n_layers, 0, c.d_model), np.float32)
        else:
            self.codes_d, self.codes_f = empty[:, [0] * 4], empty[:, [0] * 2]
            self.codes_down = empty[:, 0]
            self.scales = np.ones((c.n_layers, 7))
            self.wt_d = np.stack([[pl.wt for pl in row[:4]] for row in packed])
            self.wt_f = np.stack([[pl.wt for pl in row[4:6]] for row in packed])
            self.wt_down = np.stack([row[6].wt for row in packed])
        self.tok_emb = p["tok_emb"].data
        self.norms = np.stack([[p[f"blocks.{i}.attn_norm"].data, p[f"blocks.{i}.ffn_norm"].data]
                               for i in blocks])
        self.final_norm = p["norm"].data
        self.cos, self.sin = model.rope_cos, model.rope_sin
        shape = (c.n_layers, c.n_heads, c.context, c.d_head)
        self.k_cache, self.v_cache = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.k_d = k_for(c.d_model, sparsity=c.sparsity) if c.sparsity else 0
        self.k_f = k_for(c.ffn_hidden, sparsity=c.sparsity) if c.sparsity else 0
        self.length = 0
        self._entry = _ENTRY[simd_level()]

    def reset(self):
        self.length = 0

    def step(self, token: int) -> np.ndarray:
        """Logits [V] float32 after ``token`` at the next position (the cache must have room)."""
        return self.prefill([token])[-1]

    def prefill(self, tokens) -> np.ndarray:
        """Logits [T, V] float32 of ``tokens`` [T] at the next T positions, in one compiled
        call (equal to T calls of ``step``)."""
        c = self.config
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if self.length + tokens.shape[0] > c.context:
            raise ValueError(f"Decoder: the cache holds context={c.context} positions, "
                             f"{self.length} used, {tokens.shape[0]} more given; reset()")
        logits = self._entry(
            tokens, self.length, self.tok_emb, self.norms, self.final_norm, self.codes_d,
            self.codes_f, self.codes_down, self.scales, self.wt_d, self.wt_f, self.wt_down,
            self.k_cache, self.v_cache, self.cos, self.sin, c.n_heads, self.k_d, self.k_f,
            c.ffn_act == "relu2", c.norm_eps)
        self.length += tokens.shape[0]
        return logits


def decoder_for(model) -> Decoder | None:
    """A Decoder for a packed float32 model whose config the compiled step covers, else None
    (the caller then keeps the engine path)."""
    c = model.config
    params = dict(model.named_parameters())
    if c.ffn != "glu" or c.sparsify != "topk" \
            or c.block is not None or c.rescale != "none" or params["tok_emb"].data.dtype \
            != np.float32:
        return None
    kinds = [params.get(f"blocks.{i}.{k}") for i in range(c.n_layers) for k in _KINDS]
    if any(w is None or getattr(w, "packed", None) is None or w.packed.source is not w.data
           for w in kinds):
        return None
    return Decoder(model)
