"""Explicit x86 vector instructions for the ternary product, chosen at run time by CPU feature.

The inner step is ``vpmaddubsw`` (unsigned bytes times signed bytes, adjacent pairs summed into
int16), the instruction bitnet.cpp's I2_S kernels are built on; LLVM's auto-vectoriser never
emits it for a plain loop. It reduces *adjacent byte pairs*, so two kept inputs i, j are taken
together: their code bytes (``PackedTernary`` rows, one row per input, so a dropped input's
codes are never read) are split into the four 2-bit planes, interleaved byte by byte
(c_i(o), c_j(o)), and multiplied by the broadcast pair (q_i, q_j):

    lane(o) = c_i(o) q_i + c_j(o) q_j  in [-512, 508],  c = t + 1 in {0, 1, 2}

A tile is W bytes of every kept row (W = 32: AVX2 ymm, 4W = 128 outputs; W = 64: AVX-512BW
zmm). Its eight int16 accumulators stay in registers over a pass's pairs (at most 64:
64 * 512 = 32768, no int16 overflow), then are added to int32 sums; Σ_i q_i is subtracted once
at the end. Both levels use the same ``PackedTernary`` layout as the portable kernel.
The byte unpack works inside 128-bit lanes, so lane l of accumulator (plane p, half h) holds
the output of byte j = 16 (l >> 3) + 8 h + (l & 7) of plane p (see ``lane_bytes``).

With AVX-512 VNNI (level "avx512vnni") the step is ``vpdpbusd``: four kept inputs are
interleaved (c_i, c_j, c_k, c_l)(o) and their four products added straight into an int32 lane,
so there is no int16 flush, and each plane is masked in place instead of shifted (it sums
4^p c: 4^3 * 2 = 128 still fits an unsigned byte; the sums are divided by 4^p at the end). Per
code byte that is about a third fewer vector instructions: tiles 1.37-1.46x faster on the
decode model's rows in cache (one thread), 1.04x on 4096x11008's, which wait on memory. The
dtype of the packed q words picks the kernel (``_groups``: int16 pairs, int32 quads).

Dispatch: ``simd_level()`` reads llvmlite's host CPU features once; MINISPARSE_SIMD =
portable | avx2 | avx512 | avx512vnni forces a path (an unsupported one is an error); the
default is the widest the CPU has (AVX-512BW measured faster than AVX2 on the 2-core Ice Lake
here, VNNI faster than both). The
intrinsics are only code generators: nothing here is compiled until a kernel of that level is
first called, so importing minisparse works on any CPU; ``NUMBA_DISABLE_JIT=1`` gets "portable".
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
from numba import config, njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

LEVELS = ("portable", "avx2", "avx512", "avx512vnni")
PREFETCH_AHEAD = 128  # bytes ahead in each code row (4096x11008, S = 0.5: 1.06-1.09x 256's)...
SHORT_ROW = 1024  # ...in rows of at least this many bytes (D_out >= 4096), else rows ahead
ROWS_PER_PASS = 32  # kept rows per pass over a run of tiles in short rows (fewer side by side)
LONG_ROWS_PER_PASS = 64  # ...in long ones (4096x11008, S = 0.5: 1.03-1.12x faster than 32; the
# decode model's short rows: 0.94x / 1.03x, so they keep 32). Pairs: half as many per int16
# flush, at most 64 (64 * 512 = 32768)
_FEATURES = {"avx2": ("avx2",), "avx512": ("avx2", "avx512f", "avx512bw"),
             "avx512vnni": ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni")}
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


def _row_loader(context, builder, codes_ty, codes, rows_ty, rows, col, vb):
    """load(r): the tile's bytes [col, col + vb.count) of code row rows[r], as vector vb.

    ROWS_PER_PASS rows are read side by side, more streams than the prefetchers follow, so
    each load also asks for bytes the loop reads later (a hint, never a fault): the row's
    bytes PREFETCH_AHEAD on or, in rows shorter than SHORT_ROW, this tile of the row
    ROWS_PER_PASS on, which the next pass reads (PREFETCH_AHEAD on is past a short row's end)."""
    from llvmlite import ir

    i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
    n_rows = cgutils.unpack_tuple(builder, rows.shape, 1)[0]
    last = builder.sub(n_rows, ir.Constant(i64, 1))
    short = builder.icmp_signed("<", cgutils.unpack_tuple(builder, codes.shape, 2)[1],
                                ir.Constant(i64, SHORT_ROW))

    def row_at(r):
        return builder.load(cgutils.get_item_pointer(context, builder, rows_ty, rows, [r],
                                                     wraparound=False))

    def code_at(row):
        return cgutils.get_item_pointer(context, builder, codes_ty, codes, [row, col],
                                        wraparound=False)

    def load(r):
        ptr = code_at(row_at(r))
        v = builder.load(builder.bitcast(ptr, vb.as_pointer()), align=1)
        with builder.if_else(short) as (then, otherwise):  # loop-invariant: unswitched
            with then:
                j = builder.add(r, ir.Constant(i64, ROWS_PER_PASS))
                later = code_at(row_at(builder.select(builder.icmp_signed("<", j, n_rows), j,
                                                      last)))
                builder.call(prefetch, [later, i32(0), i32(3), i32(1)])
            with otherwise:
                ahead = builder.gep(ptr, [ir.Constant(i64, PREFETCH_AHEAD)])
                builder.call(prefetch, [ahead, i32(0), i32(3), i32(1)])
        return v

    return load


def _tile_args(context, builder, sig, args):
    """A tile intrinsic's operands (width, codes, rows, words, start, end, col, out):
    ((type, array) of codes, rows, words and out; start, end, col)."""
    arrays = [(sig.args[i], context.make_array(sig.args[i])(context, builder, args[i]))
              for i in (1, 2, 3, 7)]
    return arrays, args[4], args[5], args[6]


def _tile_codegen(width):
    """LLVM IR of tile_sums for tiles of ``width`` bytes (see the module docstring)."""

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        arrays, start, end, col = _tile_args(context, builder, sig, args)
        (codes_ty, codes), (rows_ty, rows), (xp_ty, xp), (out_ty, out) = arrays
        i8, i16, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)
        vb, vw = ir.VectorType(i8, width), ir.VectorType(i16, width // 2)
        pmadd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vw, [vb, vb]), _PMADD[width])
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vw, None)) for _ in range(8)]
        three = ir.Constant(vb, [3] * width)
        lo = [j for b in range(0, width, 16) for i in range(8) for j in (b + i, width + b + i)]
        hi = [j + 8 for j in lo]
        load = _row_loader(context, builder, codes_ty, codes, rows_ty, rows, col, vb)
        with cgutils.for_range_slice(builder, start, end, ir.Constant(i64, 1)) as (n, _):
            two_n = builder.mul(n, ir.Constant(i64, 2))
            planes = [load(builder.add(two_n, ir.Constant(i64, m))) for m in range(2)]
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


_DPBUSD = {32: "llvm.x86.avx512.vpdpbusd.256", 64: "llvm.x86.avx512.vpdpbusd.512"}


def _quad_codegen(width):
    """LLVM IR of quad_sums for tiles of ``width`` bytes (see its docstring)."""

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        arrays, start, end, col = _tile_args(context, builder, sig, args)
        (codes_ty, codes), (rows_ty, rows), (xq_ty, xq), (sums_ty, sums) = arrays
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vb, vw = ir.VectorType(i8, width), ir.VectorType(i16, width // 2)
        vd = ir.VectorType(i32, width // 4)
        dpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vd, [vd, vd, vd]), _DPBUSD[width])
        base = builder.bitcast(cgutils.get_item_pointer(
            context, builder, sums_ty, sums, [ir.Constant(i64, 0)], wraparound=False),
            vd.as_pointer())
        accs = [cgutils.alloca_once_value(builder, builder.load(
            builder.gep(base, [ir.Constant(i64, a)]), align=4)) for a in range(16)]
        masks = [ir.Constant(vb, [3 << 2 * p] * width) for p in range(4)]
        # vpunpck{l,h}bw, then vpunpck{l,h}wd of the two results: four rows' bytes side by
        # side, inside 128-bit lanes (lane_bytes(width, 4) says which byte each lane holds)
        half = width // 2
        byte_lo = [j for b in range(0, width, 16) for i in range(8) for j in (b + i, width + b + i)]
        word_lo = [j for b in range(0, half, 8) for i in range(4) for j in (b + i, half + b + i)]
        byte_orders = [ir.Constant(ir.VectorType(i32, width), [j + h for j in byte_lo])
                       for h in (0, 8)]
        word_orders = [ir.Constant(ir.VectorType(i32, half), [j + h for j in word_lo])
                       for h in (0, 4)]
        load = _row_loader(context, builder, codes_ty, codes, rows_ty, rows, col, vb)
        with cgutils.for_range_slice(builder, start, end, ir.Constant(i64, 1)) as (n, _):
            four_n = builder.mul(n, ir.Constant(i64, 4))
            r = [load(builder.add(four_n, ir.Constant(i64, m))) for m in range(4)]
            quad = builder.load(cgutils.get_item_pointer(context, builder, xq_ty, xq, [n],
                                                         wraparound=False))
            xv = builder.insert_element(ir.Constant(vd, None), quad, ir.Constant(i64, 0))
            xv = builder.shuffle_vector(xv, xv, ir.Constant(vd, [0] * (width // 4)))
            two = [[builder.bitcast(builder.shuffle_vector(a, b, order), vw)
                    for order in byte_orders] for a, b in ((r[0], r[1]), (r[2], r[3]))]
            fours = [builder.bitcast(builder.shuffle_vector(two[0][h], two[1][h], order), vb)
                     for h in range(2) for order in word_orders]
            for p in range(4):  # plane p masked in place: 4^p c <= 128 still fits a u8
                for h, four in enumerate(fours):
                    plane = builder.bitcast(builder.and_(four, masks[p]), vd)
                    acc = accs[4 * p + h]
                    builder.store(builder.call(dpbusd, [builder.load(acc), plane, xv]), acc)
        for a, acc in enumerate(accs):
            builder.store(builder.load(acc), builder.gep(base, [ir.Constant(i64, a)]), align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def quad_sums(typingctx, width, codes, rows, xquads, start, end, col, sums):
    """sums[(4 p + h) width / 4 + l] += Σ_{n in [start, end)} 4^p × (lane l of accumulator
    (p, h)) over the quads rows[4n .. 4n + 3] weighted by the four int8 of xquads[n], on the
    tile [col, col + width) of codes [D_in, Q] (int32, in place): vpdpbusd (AVX-512 VNNI)
    multiplies four kept inputs' u8 codes by their s8 q and adds the four products into an
    int32 lane in one instruction, with no int16 flush; plane p is masked, not shifted, so
    it sums 4^p c (c 4^p <= 128: still a u8). width a literal."""
    if not isinstance(width, types.IntegerLiteral):
        raise errors.RequireLiteralValue("quad_sums: width must be a compile-time constant")
    body = _quad_codegen(width.literal_value)
    sig = types.void(width, codes, rows, xquads, start, end, col, sums)
    return sig, lambda context, builder, sig, args: body(context, builder, sig, args)


@njit(cache=True, inline="always")
def _groups(q, idx, rows, words):
    """(rows[:G n] int64, words[:n], Σ q_idx), written into the given buffers (at least K + 3
    and (K + 3) // 2 long): the kept inputs G at a time, G = words.itemsize (int16 words: the
    pairs of vpmaddubsw; int32: the quads of vpdpbusd). Word n holds the group's q as bytes,
    the first input's in the low byte; a last group short of G repeats its last input at
    weight 0."""
    k = idx.shape[0]
    g = words.itemsize
    n = (k + g - 1) // g
    rows, words = rows[:g * n], words[:n]
    q_sum = 0
    for w in range(n):
        word = 0
        for m in range(g):
            j = g * w + m
            qj = np.int64(q[idx[j]]) if j < k else np.int64(0)
            rows[j] = idx[min(j, k - 1)]
            word |= (qj & 0xFF) << (8 * m)
            q_sum += qj
        words[w] = word  # the low 8 G bits
    return rows, words, q_sum


@njit(cache=True)
def lane_bytes(width, group):
    """int [group, width // group]: the code byte of the tile behind lane l of an accumulator
    (any plane, h) for kept inputs taken ``group`` at a time (2: int16 lanes, 4: int32):
    vpunpck{l,h}bw (and for quads vpunpck{l,h}wd) interleave inside 128-bit lanes, so lane l
    of h holds byte 16 (l // per) + per h + l % per, per = 16 / group."""
    per = 16 // group
    lanes = np.empty((group, width // group), np.int64)
    for h in range(group):
        for lane in range(width // group):
            lanes[h, lane] = 16 * (lane // per) + per * h + lane % per
    return lanes


@njit(cache=True, inline="always")
def _scatter(sums, col, q, q_sum, lanes, d_out, y):
    """y[p Q + col + byte] = tile sum / 4^p (quads: plane p was summed as 4^p c) - Σ q, for the
    tile's outputs below d_out (Q = q); accumulator (p, h) is sums[G p + h]."""
    group, n = lanes.shape
    for p in range(4):
        shift = 2 * p if group == 4 else 0
        for h in range(group):
            for lane in range(n):
                o = p * q + col + lanes[h, lane]
                if o < d_out:
                    y[o] = (sums[(group * p + h) * n + lane] >> shift) - q_sum


@njit(cache=True, inline="always")
def _rows_per_pass(codes):
    """ROWS_PER_PASS, or LONG_ROWS_PER_PASS for code rows of at least SHORT_ROW bytes."""
    return ROWS_PER_PASS if codes.shape[1] < SHORT_ROW else LONG_ROWS_PER_PASS


def _tiles(width, codes, rows, words, c0, c1, scratch, sums):
    """int32 sums[c - c0] = tile c's sums over every kept group, for tiles c in [c0, c1);
    the words' dtype picks the kernel (int16 pairs: tile_sums, int32 quads: quad_sums)."""
    raise NotImplementedError("compiled only")


@overload(_tiles, prefer_literal=True)
def _tiles_impl(width, codes, rows, words, c0, c1, scratch, sums):
    # Groups outermost, _rows_per_pass rows at a time: they are read front to back, tile after
    # tile (a tile-outer order jumps a row ahead per access, missing the TLB each time, and
    # more rows side by side are more streams than the hardware prefetchers follow).
    if words.dtype.bitwidth == 32:
        def quads(width, codes, rows, words, c0, c1, scratch, sums):
            sums[:c1 - c0] = 0
            step = _rows_per_pass(codes) // 4
            for s in range(0, words.shape[0], step):
                e = min(s + step, words.shape[0])
                for c in range(c0, c1):
                    quad_sums(width, codes, rows, words, s, e, c * width, sums[c - c0])
        return quads

    def pairs(width, codes, rows, words, c0, c1, scratch, sums):
        sums[:c1 - c0] = 0
        step = _rows_per_pass(codes) // 2
        for s in range(0, words.shape[0], step):
            e = min(s + step, words.shape[0])
            for c in range(c0, c1):
                tile_sums(width, codes, rows, words, s, e, c * width, scratch)
                acc = sums[c - c0]
                for a in range(4 * width):
                    acc[a] += scratch[a]
    return pairs


@njit(cache=True, inline="always")
def _groups_alloc(q, idx, word):
    """``_groups`` into new buffers, the q words of word.dtype (a whole GEMV call; the decode
    step brings its own)."""
    k = idx.shape[0]
    return _groups(q, idx, np.empty(k + 3, np.int64), np.empty((k + 3) // 2, word.dtype))


@njit(cache=True)
def _gemv_serial(width, word, q, idx, codes, d_out):
    rows, words, q_sum = _groups_alloc(q, idx, word)
    n_cols = codes.shape[1]
    n_tiles = n_cols // width
    lanes = lane_bytes(width, words.itemsize)
    sums = np.empty((n_tiles, 4 * width), np.int32)
    _tiles(width, codes, rows, words, 0, n_tiles, np.empty(4 * width, np.int16), sums)
    y = np.empty(d_out, np.int32)
    for c in range(n_tiles):
        _scatter(sums[c], c * width, n_cols, q_sum, lanes, d_out, y)
    return y


@njit(parallel=True, cache=True)
def _gemv_parallel(width, word, q, idx, codes, d_out, parts):
    # Threads split the outputs (tiles): each reads every kept row's bytes of its tiles and
    # writes its own outputs, so there are no partial sums to add. One parallel region.
    rows, words, q_sum = _groups_alloc(q, idx, word)
    n_cols = codes.shape[1]
    n_tiles = n_cols // width
    lanes = lane_bytes(width, words.itemsize)
    sums = np.empty((n_tiles, 4 * width), np.int32)
    y = np.empty(d_out, np.int32)
    for t in prange(parts):
        c0, c1 = t * n_tiles // parts, (t + 1) * n_tiles // parts
        _tiles(width, codes, rows, words, c0, c1, np.empty(4 * width, np.int16), sums[c0:c1])
        for c in range(c0, c1):
            _scatter(sums[c], c * width, n_cols, q_sum, lanes, d_out, y)
    return y


# The q words of each level, as empty arrays of their dtype (int16: pairs, int32: quads): as an
# argument, a dtype itself costs ~11 us of dispatch per call, an array well under one.
WORDS = {"avx2": np.empty(0, np.int16), "avx512": np.empty(0, np.int16),
         "avx512vnni": np.empty(0, np.int32)}


def simd_gemv_int(q, idx, codes, d_out, level, parts=1):
    """int32 [d_out] = Σ_{i in idx} q_i t_oi exactly on a SIMD level ("avx2" | "avx512" |
    "avx512vnni"), for PackedTernary codes [D_in, Q]; parts > 1 splits the outputs between
    that many threads. AVX-512 takes 64-byte tiles when Q is a multiple of 64, else 32-byte
    ones; VNNI reads the kept inputs four at a time (vpdpbusd), the others two (vpmaddubsw)."""
    # The width must be a compile-time constant inside the kernels (it picks the vector type):
    # these entry points pass it as a literal, one compiled (and cached) kernel per width.
    width = 64 if level != "avx2" and codes.shape[1] % 64 == 0 else 32
    entry = (_ENTRY_64 if width == 64 else _ENTRY_32)[parts > 1]
    return entry(q, idx, codes, d_out, parts, WORDS[level])


@njit(cache=True)
def _serial_32(q, idx, codes, d_out, parts, word):
    return _gemv_serial(32, word, q, idx, codes, d_out)


@njit(cache=True)
def _serial_64(q, idx, codes, d_out, parts, word):
    return _gemv_serial(64, word, q, idx, codes, d_out)


@njit(cache=True)
def _parallel_32(q, idx, codes, d_out, parts, word):
    return _gemv_parallel(32, word, q, idx, codes, d_out, parts)


@njit(cache=True)
def _parallel_64(q, idx, codes, d_out, parts, word):
    return _gemv_parallel(64, word, q, idx, codes, d_out, parts)


_ENTRY_32, _ENTRY_64 = (_serial_32, _parallel_32), (_serial_64, _parallel_64)
