"""The whole single-token forward of a packed model in one compiled call (SPEC 6, decoding).

A decode step through the engine runs hundreds of small NumPy operations and Python calls per
token; their fixed costs, not the weights, set the speed. ``Decoder.step(token)`` does the same
math in one Numba function: embedding, and per block RMSNorm, the int8 codes (SPEC 3), the kept
inputs (top-K, SPEC 1; N:M blocks, SPEC 2; or |A(x)| > tau, SPEC 11; with SPEC 1's l2 rescale),
the q/k/v products, RoPE, attention over the KV cache, o, RMSNorm, up/gate, the GLU, down; then
the final norm and the tied head. The projections are the packed kernels (``PackedLinear.gemv``'s
math: exact int32 sums / (s_x s_w) for ternary, the kept rows of W^T for float), the rest
follows the reference op for op in float32 (RMSNorm bit for bit, with NumPy's pairwise mean;
the GLU's tanh correctly rounded, ``tanh32``), so the logits equal the engine's up to float
rounding (attention sums in another order) and, where that moves an int8 code across a
rounding boundary (SPEC 3), by one code.

Per token the fixed costs are paid per *input*, not per weight: q, k and v read one input, so
it is quantized, its kept inputs chosen and paired once, and their codes sit side by side (one
kept input is one run of 3 Q bytes, split in one part per worker); likewise up and gate.
Scratch buffers are allocated once per call. MoE configs get ``decoder_for(model) is None``
and keep the engine path.

Two cores, one parallel region per call (waking a thread pool costs 40-75 us, a whole layer's
work here): each worker runs the whole forward, the cheap sequential parts redundantly in its
own scratch and its own copy of the KV cache, and the expensive stages (the products' column
tiles, the heads' attention) are split by claiming: a worker takes the next run of tiles of
a stage with an atomic counter (worker 0 from the front, worker 1 from the back, so each
reads one contiguous half of every kept row), writes its outputs to a buffer of that stage
and counts them done, and before reading the stage's output spins until every tile is done.
A claim is an atomic add on a line both cores write (~0.2 us), so a worker asks for its whole
share at once, and the GLU, cheaper than that, is done by both. A worker alone does every
tile, so no schedule can deadlock (a waiting worker only waits for tiles a running
worker holds), and a tile is computed by the same code whoever claims it: one or two workers
give bit-equal logits. Models with under 0.5 MB of packed weights keep one worker
(``WORKERS_FROM``). The SIMD level of the ternary products is a compile-time constant
(``width``: 0 portable, 32 AVX2, 64 AVX-512; with the type of the q words, int16 pairs or
int32 quads for AVX-512 VNNI), so a CPU without AVX2 never compiles the intrinsics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, get_num_threads, njit, prange, types
from numba.core import errors
from numba.extending import overload

from ..sparsity import k_for
from .atomics import atomic_add, atomic_load
from .attention import _rope
from .glu import RELU2, SILU, _act
from .pairwise import pairwise_sum
from .simd import _groups, _scatter, _tiles, lane_bytes, simd_level
from .sparse_matmul import FMA, _axpy_rows
from .tanh import tanh32
from .ternary import _ternary_serial
from .token import (
    ALL,
    BLOCK,
    THRESHOLD,
    TOPK,
    _abs_max,
    l2_factor,
    rescale_sums,
    select,
    ternary_inputs,
)


@njit(cache=True, inline="always")
def _portable_tiles(q, idx, codes, y, sync, slot):
    """The portable kernel's share of ``_ternary_tiles``: the whole product is one tile, of
    codes stored whole (one column part: Decoder splits no codes for the portable level)."""
    if _claim(sync, slot, 1) == 0:
        cols = codes.shape[2]
        y[:4 * cols] = _ternary_serial(q.astype(np.int16), idx, codes[0].view(np.uint16),
                                       4 * cols)
        _release(sync, slot)
    return 1


def _ternary_tiles(width, q, idx, codes, y, sync, slot, buffers):
    """y[:4 Q] int32 = Σ_{i in idx} q_i t_oi for codes [P, D_in, Q / P] (column parts), the
    tiles this worker claims (see ``_claim``), in the worker's buffers (``_simd_tiles``);
    returns the number of tiles.
    As written it runs when interpreted (NUMBA_DISABLE_JIT: always width 0); compiled, the
    overload below picks the kernel of the literal width while typing."""
    if width != 0:
        raise NotImplementedError("the SIMD tiles run compiled only")
    return _portable_tiles(q, idx, codes, y, sync, slot)


@overload(_ternary_tiles, prefer_literal=True)
def _ternary_tiles_impl(width, q, idx, codes, y, sync, slot, buffers):
    if not isinstance(width, types.IntegerLiteral):  # the caller retries with the literal
        raise errors.RequireLiteralValue("_ternary_tiles: width must be a constant")
    w = width.literal_value
    if w == 0:
        def portable(width, q, idx, codes, y, sync, slot, buffers):
            return _portable_tiles(q, idx, codes, y, sync, slot)
        return portable
    if w == 32:
        def avx2(width, q, idx, codes, y, sync, slot, buffers):
            return _simd_tiles(32, q, idx, codes, y, sync, slot, buffers)
        return avx2
    if w == 64:  # 64-byte tiles need Q % 64 == 0, else the AVX2 tiles (as simd_gemv_int)
        def avx512(width, q, idx, codes, y, sync, slot, buffers):
            if codes.shape[2] % 64 == 0:
                return _simd_tiles(64, q, idx, codes, y, sync, slot, buffers)
            return _simd_tiles(32, q, idx, codes, y, sync, slot, buffers)
        return avx512
    return None


CLAIMED_BACK = 1 << 32  # a stage's claim counter: tiles asked for from the front + this * back


@njit(cache=True, inline="always")
def _claim_run(sync, slot, n_tiles, size):
    """The next run [lo, hi) of at most ``size`` unclaimed tiles of stage ``slot`` from this
    worker's end (sync[4] = (worker, workers): worker 0 takes tiles from the front, the others
    from the back), lo == hi when none is left. One counter holds both ends' requests (sync[0]
    [2 S] int64: asked for, then done), so one atomic add both asks for ``size`` tiles and sees
    what the other end asked for before: a run stops where the other end's requests begin.
    Whichever add comes second sees the first, so no tile is taken twice, and a worker asks
    until the two ends' requests cover all n_tiles, so none is left out."""
    back = sync[4][0] > 0
    old = atomic_add(sync[0], slot, size * CLAIMED_BACK if back else size)
    front, behind = old % CLAIMED_BACK, old // CLAIMED_BACK
    lo, hi = front, min(front + size, n_tiles - behind)
    if back:
        lo, hi = max(n_tiles - behind - size, front), n_tiles - behind
    return (lo, hi) if lo < hi else (0, 0)


@njit(cache=True, inline="always")
def _share(sync, n_tiles):
    """ceil(n_tiles / workers): the run a worker asks for at once (a claim is an atomic add on
    a line both cores write, ~0.2 us; smaller runs, to balance, measured 0.90x a token)."""
    return -(-n_tiles // sync[4][1])


@njit(cache=True, inline="always")
def _claim(sync, slot, n_tiles):
    """The next unclaimed tile of stage ``slot`` (``_claim_run`` of one), or n_tiles when none
    is left."""
    lo, hi = _claim_run(sync, slot, n_tiles, 1)
    return lo if lo < hi else n_tiles


@njit(cache=True, inline="always")
def _release(sync, slot, n=1):
    """n more tiles of product ``slot`` are written (their stores published before the count)."""
    atomic_add(sync[0], sync[0].shape[0] // 2 + slot, n)


@njit(cache=True, inline="always")
def _wait(sync, slot, n_tiles):
    """Spin until all n_tiles of product ``slot`` are written. Only tiles already claimed by a
    running worker can be missing (a worker claims tiles until none is left), so this never
    waits for a worker that has not started: no deadlock under any schedule."""
    done = sync[0].shape[0] // 2 + slot
    while atomic_load(sync[0], done) < n_tiles:
        pass


@njit(cache=True, inline="always")
def _simd_tiles(width, q, idx, codes, y, sync, slot, buffers):
    # simd._gemv_serial's tiles of codes [P, D_in, Q / P] (column parts: tile t is tile
    # t % n of part t // n, n = Q / (P width)), computed by whichever worker claims them, in
    # the worker's buffers (groups: rows int64 [D + 3], q words [D // 2 + 2], int16 for pairs
    # or int32 for quads; the int32 sums of a run of tiles, one tile's int16 sums); a run of
    # tiles that spans parts is read part by part. A worker asks for its share of the tiles
    # at once: one run reads each kept row's bytes of the run front to back (_tiles), where a
    # tile at a time reads every kept row once per tile (a 48.3M model's products, one
    # thread: 1.5x faster)
    group_rows, group_q, sums, scratch = buffers
    rows, words, q_sum = _groups(q, idx, group_rows, group_q)
    per_part = codes.shape[2] // width
    cols = codes.shape[0] * codes.shape[2]
    n_tiles = codes.shape[0] * per_part
    share = _share(sync, n_tiles)
    lanes = lane_bytes(width, words.itemsize)
    lo, hi = _claim_run(sync, slot, n_tiles, share)
    while lo < hi:
        for part in range(lo // per_part, (hi - 1) // per_part + 1):  # the run in each part
            c0, c1 = max(lo - part * per_part, 0), min(hi - part * per_part, per_part)
            _tiles(width, codes[part], rows, words, c0, c1, scratch, sums)
            for c in range(c0, c1):
                _scatter(sums[c - c0], (part * per_part + c) * width, cols, q_sum, lanes,
                         4 * cols, y)
        _release(sync, slot, hi - lo)
        lo, hi = _claim_run(sync, slot, n_tiles, share)
    return n_tiles


@njit(cache=True, error_model="numpy")
def _rmsnorm(x, g, eps, out):
    """out [d] = SPEC 6 (overflow-safe, SPEC 1) for x, g [d] float32 as functions.rmsnorm
    computes it, bit for bit: m = max(max|x|, 1), s = x / m, (s / sqrt(mean(s^2) + eps / m / m))
    g, the mean in NumPy's pairwise order (out holds s^2 meanwhile); returns out."""
    one = np.float32(1)
    m = max(np.float32(_abs_max(x)), one)
    for j in range(x.shape[0]):
        out[j] = (x[j] / m) * (x[j] / m)
    mean = np.float32(pairwise_sum(out) / np.float32(x.shape[0]))
    r = one / np.sqrt(mean + np.float32(eps) / m / m)
    for j in range(x.shape[0]):
        out[j] = ((x[j] / m) * r) * g[j]
    return out


@njit(cache=True, error_model="numpy")
def _glu(u, g, relu2, act):
    """act[j] = u_j a(g_j) in float32, a = relu2 or silu as in the training GLU (``glu._act``),
    silu's sigmoid as functions.sigmoid: (1 + tanh(g / 2)) / 2. With tanh32 the loop calls
    nothing, and the numpy error model checks no division for zero: it vectorises."""
    half, one = np.float32(0.5), np.float32(1)
    kind = RELU2 if relu2 else SILU
    for j in range(u.shape[0]):
        s = one if relu2 else half * (one + tanh32(half * g[j]))
        act[j] = u[j] * _act(g[j], s, kind, one)[0]


STAGES = 5  # shared stages per block and position: q k v, attention, o, up gate, down
# A float product is shared as FLOAT_SPLIT parts of each weight's kept rows, summed in part
# order by every worker (the same bits on one worker or two), so o and down (one weight each)
# are split between the workers too, where whole weights left them to one.
FLOAT_SPLIT = 2


@njit(cache=True, fastmath=FMA)  # (the FMAs only here: SPEC 3's x s must stay one rounding)
def _float_rows(x, kept, lo, hi, wt, y):
    """y [D_out] = Σ_{p in [lo, hi)} x_i wt[i, :], i = kept[p], for wt [D_in, D_out]
    (sparse_matmul's axpys, into a new array: LLVM vectorises a loop into one it knows does
    not alias wt without run-time checks)."""
    acc = np.zeros(wt.shape[1], wt.dtype)
    _axpy_rows(x, kept, lo, hi, wt, acc)
    y[:] = acc


# Compiled once, not inlined at its four call sites in _block: the step then compiles in 51 s
# instead of 244 s from an empty cache, and a token is no slower (paired 1.03x, 30 runs).
@njit(cache=True, error_model="numpy")
def _products(width, x, codes, wt, scales, sparse, tau, l2, scratch, outs, sync, slot):
    """outs[m, :D_out] = SPEC 5 for one token x [D_in] and each weight m of a group that reads
    the same input (q, k, v; up, gate): A(x), the kept inputs and r found once for all of them.
    Ternary when codes [P, D_in, n Q / P] has rows (the group's codes side by side, in P
    column parts: one kept row is n Q / P contiguous bytes of each), else float (wt
    [n, D_in, D_out]). sparse = (sel, k, N, M).
    The product itself is shared: its tiles go to the workers that claim them (product
    ``slot`` of sync = (counters, int32 [B, *], float32 [B, *] outputs, row slot % B; the
    attention's outputs [B, d]; (worker, workers)))."""
    q8, a, idx = scratch[:3]
    d_in, n_mats, d_out = x.shape[0], wt.shape[0], wt.shape[2]
    ternary = codes.shape[1] > 0
    q = q8[:d_in]
    sel, k, block_n, block_m = sparse
    if ternary:
        s, count, r = ternary_inputs(x, sel, k, block_n, block_m, tau, l2, q, a[:d_in], idx)
    else:  # A(x) = x: the float path has no quantizer
        s, count = np.float32(1), select(x, q8[:0], sel, k, block_n, block_m, tau, idx)
        r = l2_factor(x, idx[:count]) if l2 else np.float32(1)
    kept = idx[:count]
    if not ternary:
        y = sync[2][slot % sync[2].shape[0]]
        n_tiles = n_mats * FLOAT_SPLIT
        share = _share(sync, n_tiles)
        lo, hi = _claim_run(sync, slot, n_tiles, share)
        while lo < hi:  # tile t: weight t // S, the S-th part t % S of the kept rows
            for t in range(lo, hi):
                part = t % FLOAT_SPLIT
                _float_rows(x, kept, part * count // FLOAT_SPLIT,
                            (part + 1) * count // FLOAT_SPLIT, wt[t // FLOAT_SPLIT],
                            y[t * d_out:(t + 1) * d_out])
            _release(sync, slot, hi - lo)
            lo, hi = _claim_run(sync, slot, n_tiles, share)
        _wait(sync, slot, n_tiles)
        for m in range(n_mats):  # the parts' sums, in part order whoever computed them
            for o in range(d_out):
                total = y[m * FLOAT_SPLIT * d_out + o]
                for part in range(1, FLOAT_SPLIT):
                    total += y[(m * FLOAT_SPLIT + part) * d_out + o]
                outs[m, o] = total * r if l2 else total
        return
    # the group as one matrix of n Q columns: its output s (n Q) + m Q + b is weight m's
    # output s Q + b (byte b of a row holds outputs b, Q + b, 2Q + b, 3Q + b: ternary.py)
    cols = codes.shape[0] * codes.shape[2]
    acc = sync[1][slot % sync[1].shape[0]]
    _wait(sync, slot, _ternary_tiles(width, q, kept, codes, acc, sync, slot, scratch[3:]))
    cols_m = cols // n_mats
    for m in range(n_mats):
        for plane in range(4):
            n = min(cols_m, d_out - plane * cols_m)
            start = plane * cols + m * cols_m
            rescale_sums(acc[start:start + n], s, scales[m], r,
                         outs[m, plane * cols_m:plane * cols_m + n], count)


@njit(cache=True, fastmath=True)
def _attend(qh, keys, values, n, scores, out):
    """out [dh] = softmax(K qh) V over the first n cached positions (keys, values [T, dh]),
    scores [>= n] the caller's scratch. fastmath: the sums may reassociate (float rounding
    only), which lets LLVM vectorise them; the value sums run over positions in order, a
    vector of dh at a time."""
    top = np.float32(-np.inf)
    for t in range(n):
        acc = np.float32(0)
        for j in range(qh.shape[0]):
            acc += qh[j] * keys[t, j]
        scores[t] = acc
        top = max(top, acc)
    total = np.float32(0)
    for t in range(n):
        scores[t] = np.exp(scores[t] - top)
        total += scores[t]
    for t in range(n):
        scores[t] /= total
    out[:] = 0
    for t in range(n):
        for j in range(qh.shape[0]):
            out[j] += scores[t] * values[t, j]


@njit(cache=True, inline="always")
def _block(width, layer, pos, x, model, k_cache, v_cache, scratch, own, outs, sync, slot):
    """Block ``layer`` for one position: x [d] updated in place; k_cache / v_cache
    [L, H, T, dh] get the position's keys and values (own [d + dh + T]: this worker's normed
    input, and a head's query and scores). The four groups of projections (q k v, o, up gate,
    down) are ``model``'s codes / wts [layer] (see ``Decoder``). Shared stages slot ..
    slot + STAGES - 1: the products and the heads' attention (the GLU is done by both)."""
    norms, codes, wts, scales, taus, cos, sin, n_heads, sparse, l2, relu2, eps = model
    d = x.shape[0]
    dh = d // n_heads
    inv = np.float32(1.0 / math.sqrt(dh))
    f = wts[2].shape[3]
    sc = scales[layer]
    h, qh, scores = own[:d], own[d:d + dh].reshape((1, dh)), own[d + dh:]  # qh: a row
    _rmsnorm(x, norms[layer, 0], eps, h)
    _products(width, h, codes[0][layer], wts[0][layer], sc[0:3], sparse[0], taus[layer, 0], l2,
              scratch, outs, sync, slot)
    q, kk, v = outs[0], outs[1], outs[2]
    for hd in range(n_heads):  # every worker fills its own cache, in loops (a slice
        for j in range(dh):      # assignment checks for overlap first: 41 -> 20 us a token)
            k_cache[layer, hd, pos, j] = kk[hd * dh + j]
            v_cache[layer, hd, pos, j] = v[hd * dh + j]
        _rope(k_cache[layer, hd, pos:pos + 1], cos[pos:pos + 1], sin[pos:pos + 1])
    att_out = sync[3][(slot + 1) % sync[3].shape[0], :d]
    share = _share(sync, n_heads)  # a head is a tile
    lo, hi = _claim_run(sync, slot + 1, n_heads, share)
    while lo < hi:
        for hd in range(lo, hi):
            for j in range(dh):
                qh[0, j] = q[hd * dh + j]
            _rope(qh, cos[pos:pos + 1], sin[pos:pos + 1])
            qh *= inv
            _attend(qh[0], k_cache[layer, hd], v_cache[layer, hd], pos + 1, scores,
                    att_out[hd * dh:(hd + 1) * dh])
        _release(sync, slot + 1, hi - lo)
        lo, hi = _claim_run(sync, slot + 1, n_heads, share)
    _wait(sync, slot + 1, n_heads)
    _products(width, att_out, codes[1][layer], wts[1][layer], sc[3:4], sparse[0],
              taus[layer, 1], l2, scratch, outs, sync, slot + 2)
    x += outs[0, :d]
    _rmsnorm(x, norms[layer, 1], eps, h)
    _products(width, h, codes[2][layer], wts[2][layer], sc[4:6], sparse[0], taus[layer, 2], l2,
              scratch, outs, sync, slot + 3)
    act = outs[2, :f]  # v's row, free by now; down writes only row 0, after reading act
    _glu(outs[0, :f], outs[1, :f], relu2, act)
    _products(width, act, codes[3][layer], wts[3][layer], sc[6:7], sparse[1], taus[layer, 3],
              l2, scratch, outs, sync, slot + 4)
    x += outs[0, :d]


@njit(cache=True, error_model="numpy")  # no zero check per division: the loops vectorise
def _worker(width, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache, sync, logits,
            words):
    """logits [T, V] of ``tokens`` [T] at positions pos0 .. pos0 + T - 1, after the cached
    ones, as one worker computes them. Layer by layer, every position through a block before
    the next block: the block's weights stay in cache over the T positions (the reuse a GEMM
    gets), and position t reads the keys / values of positions <= t of the same layer, already
    written (causal). Everything but the products runs in this worker's own scratch and KV
    cache (every worker computes the same values); stage s of (r, layer) is shared slot
    STAGES (r L + layer) + s."""
    n = tokens.shape[0]
    norms, eps = model[0], model[-1]
    n_layers = norms.shape[0]
    widest = _widest(tok_emb, model)
    # scratch of every projection, allocated once per call: codes, A(x), kept positions, the
    # ternary tiles' buffers (see _simd_tiles: ``words``, the caller's, sets the kernel; a run
    # of up to Q / 32 tiles of at most ``width`` bytes, 4 width outputs each; the portable
    # kernel uses none); outputs of up to three weights
    scratch = (np.empty(widest, np.int8), np.empty(widest, np.float32),
               np.empty(widest, np.int64), np.empty(widest + 3, np.int64), words,
               np.empty((max([c.shape[3] for c in model[1]]) // 32 + 1, 4 * width), np.int32),
               np.empty(4 * width, np.int16))
    outs = np.empty((3, widest), np.float32)
    # this worker's own floats: the normed input [d], a head's query [dh] and scores [T]
    own = np.empty(tok_emb.shape[1] + k_cache.shape[3] + k_cache.shape[2], np.float32)
    x = np.empty((n, tok_emb.shape[1]), np.float32)
    for r in range(n):
        x[r] = tok_emb[tokens[r]]
    for layer in range(n_layers):
        for r in range(n):
            _block(width, layer, pos0 + r, x[r], model, k_cache, v_cache, scratch, own, outs,
                   sync, STAGES * (r * n_layers + layer))
    for r in range(n):
        logits[r] = tok_emb @ _rmsnorm(x[r], final_norm, eps, own[:x.shape[1]])


@njit(cache=True, inline="always")
def _widest(tok_emb, model):
    """The longest vector a block reads: max(d_model, ffn_hidden)."""
    return max(tok_emb.shape[1], model[2][2].shape[3])


@njit(parallel=True, cache=True)
def _spread(width, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache, sync, logits,
            words):
    # The call's one parallel region (a thread wake-up costs 40-75 us here): every worker runs
    # the whole forward; only the products' tiles are divided, by claiming (see _wait).
    # A parallel loop takes arrays and numbers, not tuples: the model goes in piece by piece
    # and is put together again inside.
    norms, codes, wts, scales, taus, cos, sin, n_heads, sparse, l2, relu2, eps = model
    c0, c1, c2, c3 = codes
    w0, w1, w2, w3 = wts
    (sel0, k0, n0, m0), (sel1, k1, n1, m1) = sparse
    counters, ints, floats, vectors, _ = sync
    for w in prange(k_cache.shape[0]):
        parts = (norms, (c0, c1, c2, c3), (w0, w1, w2, w3), scales, taus, cos, sin, n_heads,
                 ((sel0, k0, n0, m0), (sel1, k1, n1, m1)), l2, relu2, eps)
        _worker(width, tokens, pos0, tok_emb, final_norm, parts, k_cache[w], v_cache[w],
                (counters, ints, floats, vectors, (np.int64(w), np.int64(k_cache.shape[0]))),
                logits[w], words[w])


@njit(cache=True)
def _forward(width, word, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache):
    """Logits [T, V] of ``tokens`` [T] after the cached positions, computed by
    k_cache.shape[0] workers (each with its own copy of the KV cache [W, L, H, T, dh]), in
    one parallel region when there are several, the bare worker when there is one. The
    ternary tiles are ``width`` bytes wide (0: portable) and take kept inputs in pairs
    (word np.int16: vpmaddubsw) or quads (np.int32: vpdpbusd)."""
    n, n_workers = tokens.shape[0], k_cache.shape[0]
    codes, wts = model[1], model[2]
    n_slots = STAGES * n * codes[0].shape[0]
    counters = np.empty(2 * n_slots, np.int64)  # claimed, then done, per product
    for i in range(2 * n_slots):  # not np.zeros: in _spread it would be a parallel region
        counters[i] = 0
    # outputs of every product; one worker reads each right after writing it, so one row per
    # group will do, several must keep all (a fast worker may be a whole product ahead)
    rows = n_slots if n_workers > 1 else STAGES
    n_int = max([4 * c.shape[1] * c.shape[3] for c in codes])
    n_float = max([FLOAT_SPLIT * w.shape[1] * w.shape[3] if w.shape[2] else 0 for w in wts])
    sync = (counters, np.empty((rows, n_int), np.int32), np.empty((rows, n_float), np.float32),
            np.empty((rows, tok_emb.shape[1]), np.float32),
            (np.int64(0), n_workers))  # typed as in _spread: one compiled _worker serves both
    logits = np.empty((n_workers, n, tok_emb.shape[0]), np.float32)
    words = np.empty((n_workers, _widest(tok_emb, model) // 2 + 2), word)
    if n_workers == 1:
        _worker(width, tokens, pos0, tok_emb, final_norm, model, k_cache[0], v_cache[0], sync,
                logits[0], words[0])
    else:
        _spread(width, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache, sync, logits,
                words)
    return logits[0]


# One cached entry per SIMD level, each passing its width as a literal and its q words' type
# (a new process then loads the forward from the cache instead of typing it again).
@njit(cache=True)
def _forward_portable(tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache):
    return _forward(0, np.int16, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache)


@njit(cache=True)
def _forward_avx2(tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache):
    return _forward(32, np.int16, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache)


@njit(cache=True)
def _forward_avx512(tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache):
    return _forward(64, np.int16, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache)


@njit(cache=True)
def _forward_avx512vnni(tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache):
    return _forward(64, np.int32, tokens, pos0, tok_emb, final_norm, model, k_cache, v_cache)


# Bytes of packed projection weights (2-bit codes or float32 rows) from which Decoder uses two
# workers. Per token, 1 worker / 2 (paired medians of 40 runs of 50 tokens; minisparse train's
# d 128, 4 layers unless said): ternary + sparse 0.5 (0.2 MB) 1.00, ternary (0.2 MB) 1.01,
# d 192, 6 layers ternary + sparse (0.7 MB) 1.07, d 256, 8 layers ternary + sparse (1.6 MB)
# 1.33, float sparse 0.5 (3.3 MB) 1.21, float (3.3 MB) 1.30 (206 -> 160 us).
WORKERS_FROM = 1 << 19
_ENTRY = {"portable": _forward_portable, "avx2": _forward_avx2, "avx512": _forward_avx512,
          "avx512vnni": _forward_avx512vnni}
_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down")
_GROUPS = ((0, 3), (3, 4), (4, 6), (6, 7))  # _KINDS that read one input: q k v, o, up gate, down
_TAUS = ("attn_in", "attn_o", "ffn_in", "ffn_down")  # SPEC 11: one threshold per group


class Decoder:
    """A packed float32 model's weights stacked per group of projections that read one input,
    its KV cache, and ``step(token) -> logits [V]`` (the next position of the sequence).

    Ternary codes of a group sit side by side, codes[g] [L, P, D_in, n Q / P] (one kept input
    reads n Q / P contiguous bytes of each column part, ``_split_columns``: one stream for q,
    k and v instead of three); float weights are wts[g] [L, n, D_in, D_out] (for ternary
    models empty but for D_out)."""

    def __init__(self, model, workers=None):
        """workers: how many share a token (default: 2 where the cores and the weights make
        it pay, see WORKERS_FROM); the ternary codes are split in as many column parts."""
        c = model.config
        self.config = c
        p = dict(model.named_parameters())
        blocks = range(c.n_layers)
        packed = [[p[f"blocks.{i}.{kind}"].packed for kind in _KINDS] for i in blocks]
        d_out = [c.d_model] * 4 + [c.ffn_hidden] * 2 + [c.d_model]
        if c.bits is not None:
            codes = tuple(np.stack([np.concatenate([pl.ternary.codes for pl in row[a:b]], axis=1)
                                    for row in packed]) for a, b in _GROUPS)
            wts = tuple(np.zeros((c.n_layers, b - a, 0, d_out[a]), np.float32)
                        for a, b in _GROUPS)
            self.scales = np.array([[pl.ternary.scale for pl in row] for row in packed])
        else:
            codes = (np.zeros((c.n_layers, 0, 0), np.uint8),) * 4
            wts = tuple(np.stack([[pl.wt for pl in row[a:b]] for row in packed])
                        for a, b in _GROUPS)
            self.scales = np.ones((c.n_layers, 7))
        if config.DISABLE_JIT:  # interpreted, prange is a plain loop: the workers would take
            workers = 1         # turns, and the second read stage buffers the first moved on from
        elif workers is None:  # a second worker pays off once a token reads enough weights
            big = sum(a.nbytes for a in codes + wts) >= WORKERS_FROM
            workers = min(2, get_num_threads()) if big else 1
        level = simd_level()
        codes = tuple(_split_columns(g, workers if level != "portable" else 1) for g in codes)
        self.codes, self.wts = codes, wts
        self.tok_emb = p["tok_emb"].data
        norms = np.stack([[p[f"blocks.{i}.attn_norm"].data, p[f"blocks.{i}.ffn_norm"].data]
                          for i in blocks])
        self.final_norm = p["norm"].data
        threshold = c.sparsify == "threshold"
        taus = np.array([[p[f"blocks.{i}.tau.{t}"].data if threshold else 0 for t in _TAUS]
                         for i in blocks], np.float32)
        sel = THRESHOLD if threshold else BLOCK if c.block else TOPK if c.sparsity else ALL
        n, m = c.block or (0, 1)
        sparse = tuple((sel, k_for(d, sparsity=c.sparsity) if sel == TOPK else d, n, m)
                       for d in (c.d_model, c.ffn_hidden))
        self._model = (norms, codes, wts, self.scales, taus, model.rope_cos, model.rope_sin,
                       c.n_heads, sparse, c.rescale == "l2", c.ffn_act == "relu2", c.norm_eps)
        # one KV cache per worker (each writes its own; they stay equal)
        shape = (workers, c.n_layers, c.n_heads, c.context, c.d_head)
        self.k_cache, self.v_cache = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.length = 0
        self._entry = _ENTRY[level]

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
        logits = self._entry(tokens, self.length, self.tok_emb, self.final_norm, self._model,
                             self.k_cache, self.v_cache)
        self.length += tokens.shape[0]
        return logits


def _split_columns(codes, parts):
    """A group's codes [L, D_in, C] stored as [L, P, D_in, C / P]: P column parts, each a
    whole array, so the worker that claims a part's tiles reads its bytes of a kept row next
    to those of the rows around it, not every P-th run of a long row (the hardware
    prefetchers follow the denser stream: a token of the 50.3M model 1.05-1.08x faster in
    paired runs). P = 1 unless C is a multiple of 64 P (whole AVX-512 tiles in every part)."""
    n_layers, d_in, cols = codes.shape
    if cols % (parts * 64):
        parts = 1
    return np.ascontiguousarray(codes.reshape(n_layers, d_in, parts, cols // parts)
                                .transpose(0, 2, 1, 3))


def decoder_for(model) -> Decoder | None:
    """A Decoder for a packed float32 model whose config the compiled step covers, else None
    (the caller then keeps the engine path)."""
    c = model.config
    params = dict(model.named_parameters())
    if c.ffn != "glu" or params["tok_emb"].data.dtype != np.float32:
        return None
    kinds = [params.get(f"blocks.{i}.{k}") for i in range(c.n_layers) for k in _KINDS]
    if any(w is None or getattr(w, "packed", None) is None or w.packed.source is not w.data
           for w in kinds):
        return None
    return Decoder(model)
