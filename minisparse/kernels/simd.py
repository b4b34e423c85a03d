"""Explicit x86 vector instructions for the ternary product, chosen at run time by CPU feature.

The inner step is ``vpmaddubsw`` (unsigned bytes times signed bytes, adjacent pairs summed into
int16), the instruction bitnet.cpp's I2_S kernels are built on; LLVM's auto-vectoriser never
emits it for a plain loop. It reduces *adjacent byte pairs*, so two kept inputs i, j are taken
together: their code bytes (``PackedTernary`` rows, one row per input, so a dropped input's
codes are never read) are split into the four 2-bit planes, interleaved byte by byte
(c_i(o), c_j(o)), and multiplied by the broadcast pair (q_i, q_j):

    lane(o) = c_i(o) q_i + c_j(o) q_j  in [-512, 508],  c = t + 1 in {0, 1, 2}

A tile is W bytes of every kept row (W = 32: AVX2 ymm, 4W = 128 outputs; W = 64: AVX-512BW
zmm). Its eight int16 accumulators stay in registers over PAIRS_PER_FLUSH pairs (at most 64:
64 * 512 = 32768, no int16 overflow), then are added to int32 sums; Σ_i q_i is subtracted once
at the end. Both levels use the same ``PackedTernary`` layout as the portable kernel.
The byte unpack works inside 128-bit lanes, so lane l of accumulator (plane p, half h) holds
the output of byte j = 16 (l >> 3) + 8 h + (l & 7) of plane p (see ``lane_bytes``).

Dispatch: ``simd_level()`` reads llvmlite's host CPU features once; MINISPARSE_SIMD =
portable | avx2 | avx512 forces a path (an unsupported one is an error); the default is the
widest the CPU has (AVX-512BW measured faster than AVX2 on the 2-core Ice Lake here). The
intrinsics are only code generators: nothing here is compiled until a kernel of that level is
first called, so importing minisparse works on any CPU; ``NUMBA_DISABLE_JIT=1`` gets "portable".
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from numba import config, njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic

LEVELS = ("portable", "avx2", "avx512")
PREFETCH_AHEAD = 256  # bytes ahead in each code row...
SHORT_ROW = 1024  # ...in rows of at least this many bytes (D_out >= 4096), else pairs ahead
PAIRS_PER_FLUSH = 16  # pairs per int16 flush (<= 64: 64 * 512 = 32768); fewer rows side by side
_FEATURES = {"avx2": ("avx2",), "avx512": ("avx2", "avx512f", "avx512bw")}
_WIDTH = {"avx2": 32, "avx512": 64}  # bytes of each code row per tile
_PMADD = {32: "llvm.x86.avx2.pmadd.ub.sw", 64: "llvm.x86.avx512.pmaddubs.w.512"}


@lru_cache(maxsize=1)
def host_levels() -> tuple:
    """The SIMD levels this CPU runs (always "portable"), from llvmlite's host features."""
    if config.DISABLE_JIT:  # interpreted: no intrinsics
        return ("portable",)
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return ("portable",) + tuple(
        level for level, need in _FEATURES.items() if all(features.get(f, False) for f in need))


def simd_level() -> str:
    """The path the ternary kernels take: MINISPARSE_SIMD if set, else the host's best."""
    forced = os.environ.get("MINISPARSE_SIMD", "").strip().lower()
    if not forced:
        return host_levels()[-1]
    if forced not in LEVELS:
        raise ValueError(f"MINISPARSE_SIMD must be one of {LEVELS}, got {forced!r}")
    if forced not in host_levels():
        raise ValueError(f"MINISPARSE_SIMD={forced}: this CPU (or NUMBA_DISABLE_JIT) runs only "
                         f"{host_levels()}")
    return forced


@njit(cache=True)
def lane_bytes(width):
    """int [2, width // 2]: the code byte of the tile behind lane l of an (any plane, half h)
    accumulator, after vpunpck{l,h}bw (which interleaves inside 128-bit lanes)."""
    half = width // 2
    lanes = np.empty((2, half), np.int64)
    for h in range(2):
        for lane in range(half):
            lanes[h, lane] = 16 * (lane >> 3) + 8 * h + (lane & 7)
    return lanes


def _tile_codegen(width):
    """LLVM IR of tile_sums for tiles of ``width`` bytes (see the module docstring)."""

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        _, codes_ty, rows_ty, xp_ty, _, _, _, out_ty = sig.args
        args = args[1:]
        codes = context.make_array(codes_ty)(context, builder, args[0])
        rows = context.make_array(rows_ty)(context, builder, args[1])
        xp = context.make_array(xp_ty)(context, builder, args[2])
        out = context.make_array(out_ty)(context, builder, args[6])
        start, end, col = args[3], args[4], args[5]
        i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
        vb, vw = ir.VectorType(i8, width), ir.VectorType(i16, width // 2)
        pmadd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vw, [vb, vb]), _PMADD[width])
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vw, None)) for _ in range(8)]
        three = ir.Constant(vb, [3] * width)
        lo = [j for b in range(0, width, 16) for i in range(8) for j in (b + i, width + b + i)]
        hi = [j + 8 for j in lo]
        n_rows = cgutils.unpack_tuple(builder, rows.shape, 1)[0]
        last = builder.sub(n_rows, ir.Constant(i64, 1))
        short = builder.icmp_signed("<", cgutils.unpack_tuple(builder, codes.shape, 2)[1],
                                    ir.Constant(i64, SHORT_ROW))
        with cgutils.for_range_slice(builder, start, end, ir.Constant(i64, 1)) as (n, _):
            two_n = builder.mul(n, ir.Constant(i64, 2))
            planes = []
            for m in range(2):
                r = builder.load(cgutils.get_item_pointer(
                    context, builder, rows_ty, rows, [builder.add(two_n, ir.Constant(i64, m))],
                    wraparound=False))
                ptr = cgutils.get_item_pointer(context, builder, codes_ty, codes, [r, col],
                                               wraparound=False)
                v = builder.load(builder.bitcast(ptr, vb.as_pointer()), align=1)
                planes.append(v)
                # 128 rows are read side by side, more streams than the prefetchers follow:
                # ask for the row's bytes PREFETCH_AHEAD on (a hint, never a fault) or, in
                # rows shorter than SHORT_ROW, for this tile of the row 2 PAIRS_PER_FLUSH on,
                # which the next call reads (PREFETCH_AHEAD on is past a short row's end).
                with builder.if_else(short) as (then, otherwise):  # loop-invariant: unswitched
                    with then:
                        j = builder.add(two_n, ir.Constant(i64, 2 * PAIRS_PER_FLUSH + m))
                        j = builder.select(builder.icmp_signed("<", j, n_rows), j, last)
                        later = builder.load(cgutils.get_item_pointer(
                            context, builder, rows_ty, rows, [j], wraparound=False))
                        builder.call(prefetch, [cgutils.get_item_pointer(
                            context, builder, codes_ty, codes, [later, col], wraparound=False),
                            i32(0), i32(3), i32(1)])
                    with otherwise:
                        ahead = builder.gep(ptr, [ir.Constant(i64, PREFETCH_AHEAD)])
                        builder.call(prefetch, [ahead, i32(0), i32(3), i32(1)])
            pair = builder.load(cgutils.get_item_pointer(context, builder, xp_ty, xp, [n],
                                                         wraparound=False))
            xv = builder.insert_element(ir.Constant(vw, None), pair, ir.Constant(i64, 0))
            xv = builder.bitcast(builder.shuffle_vector(xv, xv, ir.Constant(
                ir.VectorType(ir.IntType(32), width // 2), [0] * (width // 2))), vb)
            # Interleave the two rows' bytes once: the shift and mask of each plane act byte by
            # byte, so they commute with the shuffle (2 shuffles per pair, not 8).
            order_ty = ir.VectorType(ir.IntType(32), width)
            mixed = [builder.shuffle_vector(planes[0], planes[1], ir.Constant(order_ty, order))
                     for order in (lo, hi)]
            for p in range(4):
                for h in range(2):
                    plane = builder.lshr(mixed[h], ir.Constant(vb, [2 * p] * width)) if p \
                        else mixed[h]
                    if p < 3:
                        plane = builder.and_(plane, three)
                    acc = accs[2 * p + h]
                    builder.store(builder.add(builder.load(acc), builder.call(pmadd, [plane, xv])),
                                  acc)
        base = cgutils.get_item_pointer(context, builder, out_ty, out, [ir.Constant(i64, 0)],
                                        wraparound=False)
        for a, acc in enumerate(accs):
            ptr = builder.gep(base, [ir.Constant(i64, a * (width // 2))])
            builder.store(builder.load(acc), builder.bitcast(ptr, vw.as_pointer()), align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def tile_sums(typingctx, width, codes, rows, xpairs, start, end, col, out):
    """out[16 a + l] = Σ_{n in [start, end)} lane l of accumulator a = 2 p + h (int16;
    end - start <= 64) over the pairs (rows[2n], rows[2n + 1]) weighted by xpairs[n], on the
    tile of bytes [col, col + width) of codes [D_in, Q] (uint8, C order); width a literal."""
    if not isinstance(width, types.IntegerLiteral):
        raise errors.RequireLiteralValue("tile_sums: width must be a compile-time constant")
    body = _tile_codegen(width.literal_value)
    sig = types.void(width, codes, rows, xpairs, start, end, col, out)
    return sig, lambda context, builder, sig, args: body(context, builder, sig, args)


@njit(cache=True, inline="always")
def _pairs(q, idx, rows, xpairs):
    """(rows[:2P] int64, xpairs[:P] int16, Σ q_idx), written into the given buffers (at least
    K + 1 and (K + 1) // 2 long): kept inputs two by two; an odd last input is paired with
    itself at weight 0. xpairs[n] = q_i in the low byte, q_j in the high one."""
    k = idx.shape[0]
    n_pairs = (k + 1) // 2
    rows, xpairs = rows[:2 * n_pairs], xpairs[:n_pairs]
    q_sum = 0
    for n in range(n_pairs):
        i = idx[2 * n]
        j = idx[min(2 * n + 1, k - 1)]
        qi = np.int32(q[i])
        qj = np.int32(q[j]) if 2 * n + 1 < k else np.int32(0)
        rows[2 * n], rows[2 * n + 1] = i, j
        xpairs[n] = np.int16((qj << 8) | (qi & 0xFF))
        q_sum += qi + qj
    return rows, xpairs, q_sum


@njit(cache=True, inline="always")
def _scatter(sums, col, width, q, q_sum, lanes, d_out, y):
    """y[p Q + col + byte] = tile sum - Σ q for the tile's outputs below d_out (Q = 2 n)."""
    half = width // 2
    for p in range(4):
        for h in range(2):
            for lane in range(half):
                o = p * q + col + lanes[h, lane]
                if o < d_out:
                    y[o] = sums[(2 * p + h) * half + lane] - q_sum


@njit(cache=True, inline="always")
def _tiles(width, codes, rows, xpairs, c0, c1, scratch, sums):
    """int32 sums[c - c0] = tile c's sums over every kept pair, for tiles c in [c0, c1).

    Pairs outermost, a few at a time: 32 rows are read front to back, tile after tile (a
    tile-outer order jumps a row ahead per access, missing the TLB each time, and more rows
    side by side are more streams than the hardware prefetchers follow)."""
    n_pairs = xpairs.shape[0]
    sums[:c1 - c0] = 0
    for s in range(0, n_pairs, PAIRS_PER_FLUSH):
        e = min(s + PAIRS_PER_FLUSH, n_pairs)
        for c in range(c0, c1):
            tile_sums(width, codes, rows, xpairs, s, e, c * width, scratch)
            acc = sums[c - c0]
            for a in range(4 * width):
                acc[a] += scratch[a]


@njit(cache=True, inline="always")
def _pairs_alloc(q, idx):
    """``_pairs`` into new buffers (a whole GEMV call; the decode step brings its own)."""
    k = idx.shape[0]
    return _pairs(q, idx, np.empty(k + 1, np.int64), np.empty((k + 1) // 2, np.int16))


@njit(cache=True)
def _gemv_serial(width, q, idx, codes, d_out, lanes):
    rows, xpairs, q_sum = _pairs_alloc(q, idx)
    n_cols = codes.shape[1]
    n_tiles = n_cols // width
    sums = np.empty((n_tiles, 4 * width), np.int32)
    _tiles(width, codes, rows, xpairs, 0, n_tiles, np.empty(4 * width, np.int16), sums)
    y = np.empty(d_out, np.int32)
    for c in range(n_tiles):
        _scatter(sums[c], c * width, width, n_cols, q_sum, lanes, d_out, y)
    return y


@njit(parallel=True, cache=True)
def _gemv_parallel(width, q, idx, codes, d_out, lanes, parts):
    # Threads split the outputs (tiles): each reads every kept row's bytes of its tiles and
    # writes its own outputs, so there are no partial sums to add. One parallel region.
    rows, xpairs, q_sum = _pairs_alloc(q, idx)
    n_cols = codes.shape[1]
    n_tiles = n_cols // width
    sums = np.empty((n_tiles, 4 * width), np.int32)
    y = np.empty(d_out, np.int32)
    for t in prange(parts):
        c0, c1 = t * n_tiles // parts, (t + 1) * n_tiles // parts
        _tiles(width, codes, rows, xpairs, c0, c1, np.empty(4 * width, np.int16), sums[c0:c1])
        for c in range(c0, c1):
            _scatter(sums[c], c * width, width, n_cols, q_sum, lanes, d_out, y)
    return y


def simd_gemv_int(q, idx, codes, d_out, level, parts=1):
    """int32 [d_out] = Σ_{i in idx} q_i t_oi exactly on a SIMD level ("avx2" | "avx512"), for
    PackedTernary codes [D_in, Q]; parts > 1 splits the outputs between that many threads.
    AVX-512 takes 64-byte tiles when Q is a multiple of 64, else the 32-byte AVX2 tiles."""
    # The width must be a compile-time constant inside the kernels (it picks the vector type):
    # these entry points pass it as a literal, one compiled (and cached) kernel per width.
    width = 64 if level == "avx512" and codes.shape[1] % 64 == 0 else 32
    entry = (_ENTRY_64 if width == 64 else _ENTRY_32)[parts > 1]
    return entry(q, idx, codes, d_out, parts)


@njit(cache=True)
def _serial_32(q, idx, codes, d_out, parts):
    return _gemv_serial(32, q, idx, codes, d_out, lane_bytes(32))


@njit(cache=True)
def _serial_64(q, idx, codes, d_out, parts):
    return _gemv_serial(64, q, idx, codes, d_out, lane_bytes(64))


@njit(cache=True)
def _parallel_32(q, idx, codes, d_out, parts):
    return _gemv_parallel(32, q, idx, codes, d_out, lane_bytes(32), parts)


@njit(cache=True)
def _parallel_64(q, idx, codes, d_out, parts):
    return _gemv_parallel(64, q, idx, codes, d_out, lane_bytes(64), parts)


_ENTRY_32, _ENTRY_64 = (_serial_32, _parallel_32), (_serial_64, _parallel_64)
