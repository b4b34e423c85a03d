"""Ternary weights at 2 bits per weight, int8 activations, integer accumulation (SPEC 3-5).

Two layouts of the same codes c = t + 1: "inputs" (below), for products over a sparse input,
and "outputs" (``i2s.py``, bitnet.cpp's I2_S), faster when every input is kept. The packer
picks one per projection (``pack_ternary(w, layout)``); ``ternary_gemv_int`` runs either.

Input-major layout (``PackedTernary.codes``, uint8 [D_in, Q], Q = 32 * ceil(D_out / 128)): like the
float path, one row per *input* i, so a sparse product reads only the rows of kept inputs.
Each weight is stored as the code c = t + 1 in {0, 1, 2}; byte b of a row holds the codes of
outputs b, Q + b, 2Q + b, 3Q + b in bit pairs 0-1, 2-3, 4-5, 6-7 (outputs past D_out hold c = 1,
t = 0). Four contiguous "planes" decode with one shift and one mask each, so the inner loop
vectorises over bytes. The product is integer-exact:

    Σ_i q_i t_oi = Σ_i q_i c_oi - Σ_i q_i,    then  y_o = that / (s_x s_w)   (SPEC 5)

The int8 codes q are widened to int16 lanes; partial sums stay in int16 for up to 128 rows
(q c in [-256, 254], so 128 of them stay in [-32768, 32512]) and are then flushed to int32:
an AVX2 register holds twice as many int16 lanes as int32 ones. The kernel reads each code row as
uint16 words (two bytes, eight codes), so a code decodes with one shift and one mask in an int16
lane, without widening bytes first; the eight word-planes are put back in output order at the end.
The loop does enough arithmetic per byte that the hardware prefetcher falls behind on cold
weights, so the next four rows are prefetched while the current four are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import config, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant import absmean_ternarize
from .i2s import pack_rows, rows_gemv_int, unpack_rows
from .simd import simd_gemv_int, simd_level
from .token import quantize
from .topk import PARALLEL_MIN_SIZE

PARALLEL_MIN_CODES = 1 << 23  # K * D_out below this: one thread (see sparse_matmul.py)
LAYOUTS = ("inputs", "outputs")  # codes [D_in, Q] (skip dropped inputs) | [D_out, 32 B] (I2_S)
_INT16_ROWS = 128  # rows summed in int16 before a flush to int32


def _prefetch_codegen(context, builder, sig, args):
    # llvm.prefetch(ptr, rw=0 read, locality=3 keep in all levels, cache=1 data): one
    # prefetcht0 on x86, which retires at once, where a plain load of a missing line would stall.
    from llvmlite import ir

    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
    return context.get_dummy_value()


if config.DISABLE_JIT:
    def prefetch(a, i):
        """No-op in interpreted mode."""
else:
    @intrinsic
    def prefetch(typingctx, a, i):
        """Hint the cache line holding a[i] (1-D array) into cache; never changes a result."""
        return types.void(a, i), _prefetch_codegen


@njit(cache=True, inline="always")
def _prefetch_row(row):
    """Prefetch every 64-byte line of a 1-D row."""
    step = max(1, 64 // row.itemsize)
    for j in range(0, row.shape[0], step):
        prefetch(row, j)


@dataclass(frozen=True)
class PackedTernary:
    """Ternary codes of W [D_out, D_in] at 2 bits per weight in one of LAYOUTS, scale s_w."""

    codes: np.ndarray  # uint8 [D_in, Q] ("inputs") or [D_out, 32 ceil(D_in / 128)] ("outputs")
    scale: float  # s_w = 1 / max(mean|W|, 1e-5): W ≈ t / s_w (SPEC 4)
    shape: tuple  # (D_out, D_in)
    layout: str = "inputs"


def pack_ternary(w: np.ndarray, layout: str = "inputs") -> PackedTernary:
    """W [D_out, D_in] float -> t = absmean_ternarize(W) (SPEC 4), packed at 2 bits per weight:
    layout "inputs" (one row per input, for sparse inputs) or "outputs" (I2_S, dense inputs)."""
    if layout not in LAYOUTS:
        raise ValueError(f"pack_ternary: layout must be one of {LAYOUTS}, got {layout!r}")
    t, s = absmean_ternarize(w)
    d_out, d_in = t.shape
    if layout == "outputs":
        return PackedTernary(pack_rows(t), float(s), (d_out, d_in), layout)
    q = 32 * -(-d_out // 128)
    c = np.ones((d_in, 4 * q), np.uint8)
    c[:, :d_out] = (t.T + 1).astype(np.uint8)
    c = c.reshape(d_in, 4, q)
    codes = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
    return PackedTernary(np.ascontiguousarray(codes), float(s), (d_out, d_in))


def unpack_ternary(p: PackedTernary) -> np.ndarray:
    """PackedTernary -> t int8 [D_out, D_in] in {-1, 0, 1} (the inverse of pack_ternary)."""
    d_out, d_in = p.shape
    if p.layout == "outputs":
        return unpack_rows(p.codes, d_in)
    planes = [(p.codes >> (2 * s)) & 3 for s in range(4)]  # each [D_in, Q]
    c = np.concatenate(planes, axis=1)[:, :d_out]
    return (c.astype(np.int8) - 1).T.copy()


@njit(cache=True, inline="always")
def _add_rows(acc, r0, x0, r1, x1, r2, x2, r3, x3):
    """int16 acc[2s + h, w] += Σ_{m<4} x_m c(r_m[w], 2s + 8h); c(v, j) = (v >> j) & 3.

    r0..r3 are code rows read as uint16 words: word w holds bytes 2w (low) and 2w + 1 (high), so
    row 2s + h of acc sums outputs sQ + 2w + h. Decoding a word needs one shift and one mask per
    code and no widening of bytes to int16 lanes; four rows per pass load and store acc once per
    four rows of codes."""
    a0, a1, a2, a3, a4, a5, a6, a7 = acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]
    for w in range(r0.shape[0]):
        v0, v1, v2, v3 = r0[w], r1[w], r2[w], r3[w]
        a0[w] += x0 * (v0 & 3) + x1 * (v1 & 3) + x2 * (v2 & 3) + x3 * (v3 & 3)
        a1[w] += (x0 * ((v0 >> 8) & 3) + x1 * ((v1 >> 8) & 3) + x2 * ((v2 >> 8) & 3)
                  + x3 * ((v3 >> 8) & 3))
        a2[w] += (x0 * ((v0 >> 2) & 3) + x1 * ((v1 >> 2) & 3) + x2 * ((v2 >> 2) & 3)
                  + x3 * ((v3 >> 2) & 3))
        a3[w] += (x0 * ((v0 >> 10) & 3) + x1 * ((v1 >> 10) & 3) + x2 * ((v2 >> 10) & 3)
                  + x3 * ((v3 >> 10) & 3))
        a4[w] += (x0 * ((v0 >> 4) & 3) + x1 * ((v1 >> 4) & 3) + x2 * ((v2 >> 4) & 3)
                  + x3 * ((v3 >> 4) & 3))
        a5[w] += (x0 * ((v0 >> 12) & 3) + x1 * ((v1 >> 12) & 3) + x2 * ((v2 >> 12) & 3)
                  + x3 * ((v3 >> 12) & 3))
        a6[w] += (x0 * ((v0 >> 6) & 3) + x1 * ((v1 >> 6) & 3) + x2 * ((v2 >> 6) & 3)
                  + x3 * ((v3 >> 6) & 3))
        a7[w] += (x0 * ((v0 >> 14) & 3) + x1 * ((v1 >> 14) & 3) + x2 * ((v2 >> 14) & 3)
                  + x3 * ((v3 >> 14) & 3))


@njit(cache=True, inline="always")
def _code_sums(x16, idx, words, acc, out):
    """int32 out[2s + h, w] += Σ_{i in idx} x16[i] c_i(sQ + 2w + h) (see _add_rows); acc is
    int16 scratch of out's shape, flushed to out every _INT16_ROWS rows."""
    k, n = idx.shape[0], words.shape[1]
    for g in range(0, k, _INT16_ROWS):
        end = min(k, g + _INT16_ROWS)
        for j in range(8):
            for w in range(n):
                acc[j, w] = 0
        for p in range(g, end - 3, 4):  # four rows per pass, no branch inside (it halves speed)
            if p + 8 <= k:  # the next four rows, while these are computed
                for m in range(4, 8):
                    _prefetch_row(words[idx[p + m]])
            i0, i1, i2, i3 = idx[p], idx[p + 1], idx[p + 2], idx[p + 3]
            _add_rows(acc, words[i0], x16[i0], words[i1], x16[i1], words[i2], x16[i2],
                      words[i3], x16[i3])
        p = end - (end - g) % 4
        if p < end:  # 1-3 rows left: padded with the last one, weighted by x = 0
            i = [idx[min(p + m, end - 1)] for m in range(4)]
            xs = [x16[i[m]] if p + m < end else np.int16(0) for m in range(4)]
            _add_rows(acc, words[i[0]], xs[0], words[i[1]], xs[1], words[i[2]], xs[2],
                      words[i[3]], xs[3])
        for j in range(8):
            for w in range(n):
                out[j, w] += acc[j, w]


@njit(cache=True, inline="always")
def _in_output_order(sums, x16, idx, d_out):
    """int32 y [d_out]: y[sQ + 2w + h] = Σ_t sums[t, 2s + h, w] - Σ_{i in idx} x16[i], i.e.
    the partial code sums of every thread added, put in output order, and t = c - 1 applied."""
    n = sums.shape[2]
    q_sum = 0
    for i in idx:
        q_sum += x16[i]
    y = np.empty(d_out, np.int32)
    for j in range(8):
        base = (j // 2) * 2 * n + j % 2  # output of word 0 in plane row j: sQ + h, Q = 2n
        for w in range(min(n, (d_out - base + 1) // 2)):
            total = sums[0, j, w]
            for t in range(1, sums.shape[0]):
                total += sums[t, j, w]
            y[base + 2 * w] = total - q_sum
    return y


@njit(cache=True)
def _ternary_serial(x16, idx, words, d_out):
    shape = (8, words.shape[1])
    sums = np.zeros((1, *shape), np.int32)
    _code_sums(x16, idx, words, np.empty(shape, np.int16), sums[0])
    return _in_output_order(sums, x16, idx, d_out)


@njit(parallel=True, cache=True)
def _ternary_parallel(x16, idx, words, d_out, parts):
    # Split the kept rows between threads (each streams whole rows, in order, into its own
    # int32 sums), then add the partial sums: as in sparse_matmul._gemv_parallel, one parallel
    # region only, so the zeroing and the final sum are loops, not array expressions.
    k, n = idx.shape[0], words.shape[1]
    sums = np.empty((parts, 8, n), np.int32)
    for t in prange(parts):
        o = sums[t]
        for j in range(8):
            for w in range(n):
                o[j, w] = 0
        _code_sums(x16, idx[t * k // parts:(t + 1) * k // parts], words,
                   np.empty((8, n), np.int16), o)
    return _in_output_order(sums, x16, idx, d_out)


def ternary_gemv_int(xq: np.ndarray, idx: np.ndarray, p: PackedTernary) -> np.ndarray:
    """int32 [D_out]: Σ_{i in idx} q_i t_oi exactly; xq int8 [D_in], idx int [K] (kept inputs).

    On x86 with AVX2 / AVX-512BW the vpmaddubsw kernels of ``simd.py`` / ``i2s.py`` run (with
    AVX-512 VNNI, vpdpbusd ones); elsewhere, or with MINISPARSE_SIMD=portable, the portable
    loops. The "outputs" layout reads every code (a dropped input only gets q = 0)."""
    level = simd_level()
    if p.layout == "outputs":
        parallel = p.shape[0] * p.shape[1] >= PARALLEL_MIN_CODES
        return rows_gemv_int(np.ascontiguousarray(xq), np.ascontiguousarray(idx, np.int64),
                             p.codes, level, get_num_threads() if parallel else 1)
    parallel = idx.shape[0] * p.shape[0] >= PARALLEL_MIN_CODES
    if level != "portable":
        return simd_gemv_int(np.ascontiguousarray(xq), np.ascontiguousarray(idx, np.int64),
                             p.codes, p.shape[0], level, get_num_threads() if parallel else 1)
    # Codes widened to int16 before the kernel: told that x fits in 8 bits, LLVM picks a
    # vectorisation of the inner loop that runs at half the speed.
    x16 = xq.astype(np.int16)
    words = np.ascontiguousarray(p.codes).view(np.uint16)  # [D_in, Q / 2], little-endian pairs
    if not parallel:
        return _ternary_serial(x16, idx, words, p.shape[0])
    return _ternary_parallel(x16, idx, words, p.shape[0], get_num_threads())


@njit(parallel=True, cache=True)
def _absmax_rows_parallel(x, q, s):
    for r in prange(x.shape[0]):
        s[r, 0] = quantize(x[r], q[r])


@njit(cache=True)
def _absmax_rows_serial(x, q, s):
    for r in range(x.shape[0]):
        s[r, 0] = quantize(x[r], q[r])


def quantize_rows(x: np.ndarray):
    """x [..., D] -> (q int8 [..., D], s [..., 1]): SPEC 3 absmax codes, equal to the reference."""
    rows = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    q, s = np.empty(rows.shape, np.int8), np.empty((rows.shape[0], 1), rows.dtype)
    run = _absmax_rows_serial if rows.size < PARALLEL_MIN_SIZE else _absmax_rows_parallel
    run(rows, q, s)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)
