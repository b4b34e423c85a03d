"""Output-major ternary codes (bitnet.cpp's I2_S layout) for products over *every* input.

The input-major layout of ``ternary.py`` lets a sparse product skip the rows of dropped inputs,
but its vector step needs shuffles to pair two inputs' bytes. When every input is kept (a
projection without top-K) the codes are better stored per *output*:

    codes uint8 [D_out, 32 B], B = ceil(D_in / 128) blocks of 128 inputs;
    byte j of block b of row o holds c = t + 1 for inputs 128 b + j + 32 p in bit pair p.

Plane p of a block (one shift, one mask) is then 32 codes for the 32 *contiguous* inputs
x[128 b + 32 p : 128 b + 32 p + 32], so one ``vpmaddubsw(plane, x slice)`` (unsigned codes times
signed int8 codes, adjacent pairs summed into int16) does 32 weights with no shuffle at all:

    y_o = Σ_i c_oi q_i - Σ_i q_i  (exact; inputs past D_in have q = 0).

Each pmaddubsw lane is in [-512, 508], four planes per block: BLOCKS_PER_FLUSH = 16 blocks keep
an int16 lane in [-32768, 32512]; then ``vpmaddwd`` with ones widens them into int32 sums, and
each row's lanes are added once at the end. AVX2 takes 4 rows at a time (4 ymm accumulators);
AVX-512BW puts the same block of two rows into one zmm (4 rows in 2 accumulators), with the x
slice repeated in both halves, so any D_out and block count work on both widths. With AVX-512
VNNI ("avx512vnni") the step is ``vpdpbusd``: four adjacent products straight into int32, each
plane masked in place (it sums 4^p c q; divided by 4^p at the end) instead of shifted, no int16
flush: 1.10-1.18x faster than vpmaddubsw on 1024x4096 to 4096x11008 with the codes in cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from .simd import _DPBUSD, _PMADD

BLOCK = 128  # inputs per block (32 bytes per row)
BLOCKS_PER_FLUSH = 16  # 16 blocks * 4 planes * 512 = 32768: int16 holds [-32768, 32512]
ROWS = 4  # output rows per kernel call
# A group of rows spans a few KB, so the hardware prefetchers (which stop at 4 KB pages) keep
# restarting: ask for the codes PREFETCH_ROWS rows ahead while this group is computed.
PREFETCH_ROWS = 8
_PMADDWD = {32: "llvm.x86.avx2.pmadd.wd", 64: "llvm.x86.avx512.pmaddw.d.512"}


def pack_rows(t: np.ndarray) -> np.ndarray:
    """t int [D_out, D_in] in {-1, 0, 1} -> codes uint8 [D_out, 32 B] (layout above)."""
    d_out, d_in = t.shape
    n_blocks = -(-d_in // BLOCK)
    c = np.ones((d_out, n_blocks * BLOCK), np.uint8)  # padding: c = 1 (t = 0)
    c[:, :d_in] = t + 1
    c = c.reshape(d_out, n_blocks, 4, 32)
    codes = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return np.ascontiguousarray(codes.reshape(d_out, n_blocks * 32))


def unpack_rows(codes: np.ndarray, d_in: int) -> np.ndarray:
    """codes uint8 [D_out, 32 B] -> t int8 [D_out, D_in] (the inverse of pack_rows)."""
    d_out = codes.shape[0]
    c = codes.reshape(d_out, -1, 1, 32) >> (2 * np.arange(4, dtype=np.uint8)[:, None]) & 3
    return (c.reshape(d_out, -1)[:, :d_in].astype(np.int8) - 1)


def _rows_codegen(width, vnni):
    """LLVM IR of row_sums for vectors of ``width`` bytes (see the module docstring); vnni:
    vpdpbusd into one int32 accumulator per plane, each plane masked in place (4^p c)."""

    def codegen(context, builder, sig, args):
        from llvmlite import ir

        _, _, codes_ty, x_ty, _, out_ty = sig.args
        _, _, codes_a, x_a, first, out_a = args
        codes = context.make_array(codes_ty)(context, builder, codes_a)
        x = context.make_array(x_ty)(context, builder, x_a)
        out = context.make_array(out_ty)(context, builder, out_a)
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        vb, vw, vd = (ir.VectorType(t, width // n) for t, n in ((i8, 1), (i16, 2), (i32, 4)))
        v32 = ir.VectorType(i8, 32)
        if vnni:  # only the instructions of the kernel asked for are declared
            dpbusd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vd, [vd, vd, vd]), _DPBUSD[width])
        else:
            pmadd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vw, [vb, vb]), _PMADD[width])
            pmaddwd = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vd, [vw, vw]), _PMADDWD[width])
        per = width // 32  # rows side by side in one vector
        n_rows, row_bytes = cgutils.unpack_tuple(builder, codes.shape, 2)
        n_blocks = builder.udiv(row_bytes, i64(32))
        last = builder.sub(n_rows, i64(1))
        row_ptrs = []
        for g in range(ROWS):  # rows past the end repeat the last one (the caller drops them)
            r = builder.add(first, i64(g))
            r = builder.select(builder.icmp_signed("<", r, n_rows), r, last)
            row_ptrs.append(cgutils.get_item_pointer(context, builder, codes_ty, codes,
                                                     [r, i64(0)], wraparound=False))
        x0 = cgutils.get_item_pointer(context, builder, x_ty, x, [i64(0)], wraparound=False)
        n_acc = ROWS // per
        acc32 = [cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(n_acc)]
        acc16 = [cgutils.alloca_once_value(builder, ir.Constant(vw, None)) for _ in range(n_acc)]
        planes32 = [[cgutils.alloca_once_value(builder, ir.Constant(vd, None)) for _ in range(4)]
                    for _ in range(n_acc)] if vnni else []  # [accumulator][plane]
        three = ir.Constant(vb, [3] * width)
        masks = [ir.Constant(vb, [3 << 2 * p] * width) for p in range(4)]
        ones = ir.Constant(vw, [1] * (width // 2))
        both = ir.Constant(ir.VectorType(i32, width), list(range(width)))
        twice = ir.Constant(ir.VectorType(i32, width), list(range(32)) * per)

        def load32(ptr, offset):
            return builder.load(builder.bitcast(builder.gep(ptr, [offset]), v32.as_pointer()),
                                align=1)

        prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0")
        ahead = builder.mul(row_bytes, i64(PREFETCH_ROWS))
        step = i64(BLOCKS_PER_FLUSH)
        with cgutils.for_range_slice(builder, i64(0), n_blocks, step) as (c0, _):
            for a in acc16 if not vnni else ():  # (VNNI sums into int32: no int16 flush)
                builder.store(ir.Constant(vw, None), a)
            c1 = builder.add(c0, step)
            c1 = builder.select(builder.icmp_signed("<", c1, n_blocks), c1, n_blocks)
            with cgutils.for_range_slice(builder, c0, c1, i64(1)) as (b, _):
                xs = []
                for p in range(4):
                    v = load32(x0, builder.add(builder.mul(b, i64(BLOCK)), i64(32 * p)))
                    xs.append(v if per == 1 else builder.shuffle_vector(v, v, twice))
                offset = builder.mul(b, i64(32))
                for r in row_ptrs:  # the same block PREFETCH_ROWS rows on (see PREFETCH_ROWS)
                    builder.call(prefetch, [builder.gep(r, [builder.add(offset, ahead)]),
                                            i32(0), i32(3), i32(1)])
                for a, acc in enumerate(acc16):
                    v = load32(row_ptrs[per * a], offset)
                    if per == 2:
                        v = builder.shuffle_vector(v, load32(row_ptrs[per * a + 1], offset), both)
                    if vnni:  # plane p masked in place sums 4^p c q, straight into int32
                        for p, sp in enumerate(planes32[a]):
                            plane = builder.bitcast(builder.and_(v, masks[p]), vd)
                            builder.store(builder.call(dpbusd, [
                                builder.load(sp), plane, builder.bitcast(xs[p], vd)]), sp)
                        continue
                    s = builder.load(acc)
                    for p in range(4):
                        plane = builder.lshr(v, ir.Constant(vb, [2 * p] * width)) if p else v
                        if p < 3:
                            plane = builder.and_(plane, three)
                        s = builder.add(s, builder.call(pmadd, [plane, xs[p]]))
                    builder.store(s, acc)
            for a16, a32 in zip(acc16, acc32, strict=True) if not vnni else ():
                builder.store(builder.add(builder.load(a32), builder.call(
                    pmaddwd, [builder.load(a16), ones])), a32)
        for a, planes in enumerate(planes32):  # acc32 = Σ_p plane p's sums / 4^p (exact)
            total = builder.load(planes[0])
            for p in range(1, 4):
                total = builder.add(total, builder.ashr(builder.load(planes[p]),
                                                        ir.Constant(vd, [2 * p] * (width // 4))))
            builder.store(total, acc32[a])
        base = cgutils.get_item_pointer(context, builder, out_ty, out, [i64(0)],
                                        wraparound=False)
        for a, acc in enumerate(acc32):
            v = builder.load(acc)
            for h in range(per):
                total = builder.extract_element(v, i64(8 * h))
                for lane in range(8 * h + 1, 8 * h + 8):
                    total = builder.add(total, builder.extract_element(v, i64(lane)))
                builder.store(total, builder.gep(base, [i64(per * a + h)]))
        return context.get_dummy_value()

    return codegen


@intrinsic
def row_sums(typingctx, width, vnni, codes, x, first, out):
    """int32 out[g] = Σ_i c_{first+g, i} x_i for g < ROWS (rows past the end repeat the last
    one), on codes uint8 [D_out, 32 B] (C order) and x int8 [128 B]; width and vnni (vpdpbusd
    instead of vpmaddubsw) literals."""
    if not isinstance(width, types.IntegerLiteral) or not isinstance(vnni, types.BooleanLiteral):
        raise errors.RequireLiteralValue("row_sums: width and vnni must be constants")
    body = _rows_codegen(width.literal_value, vnni.literal_value)
    return types.void(width, vnni, codes, x, first, out), body


@njit(cache=True, inline="always")
def _padded_input(q, idx, n_blocks):
    """(x int8 [128 B], Σ x): q at the kept inputs idx, 0 elsewhere and past D_in."""
    x = np.empty(n_blocks * BLOCK, np.int8)
    for i in range(x.shape[0]):  # a loop: np.zeros in a parallel kernel is a region of its own
        x[i] = 0
    q_sum = 0
    for i in idx:
        x[i] = q[i]
        q_sum += np.int64(q[i])
    return x, q_sum


@njit(cache=True, inline="always")
def _simd_rows(width, vnni, codes, x, q_sum, r0, r1, y):
    """y[o] = Σ_i c_oi x_i - Σ x for rows o in [r0, r1), ROWS at a time."""
    sums = np.empty(ROWS, np.int32)
    for o in range(r0, r1, ROWS):
        row_sums(width, vnni, codes, x, o, sums)
        for g in range(min(ROWS, r1 - o)):
            y[o + g] = sums[g] - q_sum


@njit(cache=True, inline="always")
def _portable_rows(codes, x, q_sum, r0, r1, y):
    """The same sums as _simd_rows in plain loops (the path without AVX2, e.g. ARM64): int32
    lane sums per byte position j, which LLVM vectorises over j, added up once per row."""
    x32 = x.astype(np.int32)
    lanes = np.empty(32, np.int32)
    for o in range(r0, r1):
        row = codes[o]
        lanes[:] = 0
        for b in range(row.shape[0] // 32):
            xb = x32[BLOCK * b:BLOCK * (b + 1)]
            rb = row[32 * b:32 * (b + 1)]
            for j in range(32):
                c = np.int32(rb[j])
                lanes[j] += (xb[j] * (c & 3) + xb[32 + j] * ((c >> 2) & 3)
                             + xb[64 + j] * ((c >> 4) & 3) + xb[96 + j] * (c >> 6))
        y[o] = lanes.sum() - q_sum


def _rows(width, vnni, codes, x, q_sum, r0, r1, y):
    """_portable_rows (width 0) or _simd_rows (width 32 or 64): as written when interpreted
    (NUMBA_DISABLE_JIT, always width 0), picked while typing by the overload below."""
    if width == 0:
        _portable_rows(codes, x, q_sum, r0, r1, y)
    else:
        _simd_rows(width, vnni, codes, x, q_sum, r0, r1, y)


@overload(_rows, prefer_literal=True)
def _rows_impl(width, vnni, codes, x, q_sum, r0, r1, y):
    # Chosen while typing, so the portable entry points never type (or compile) an intrinsic.
    if not isinstance(width, types.IntegerLiteral):
        raise errors.RequireLiteralValue("_rows: width must be a compile-time constant")
    if width.literal_value == 0:
        return lambda width, vnni, codes, x, q_sum, r0, r1, y: _portable_rows(codes, x, q_sum,
                                                                              r0, r1, y)
    return lambda width, vnni, codes, x, q_sum, r0, r1, y: _simd_rows(width, vnni, codes, x,
                                                                      q_sum, r0, r1, y)


@njit(cache=True)
def _rows_serial(width, vnni, q, idx, codes):
    x, q_sum = _padded_input(q, idx, codes.shape[1] // 32)
    y = np.empty(codes.shape[0], np.int32)
    _rows(width, vnni, codes, x, q_sum, 0, codes.shape[0], y)
    return y


@njit(parallel=True, cache=True)
def _rows_parallel(width, vnni, q, idx, codes, parts):
    # Threads split the output rows (whole ROWS groups): each reads its own rows' codes and
    # writes its own outputs. One parallel region.
    x, q_sum = _padded_input(q, idx, codes.shape[1] // 32)
    d_out = codes.shape[0]
    y = np.empty(d_out, np.int32)
    groups = -(-d_out // ROWS)
    for t in prange(parts):
        r0 = min(d_out, ROWS * (t * groups // parts))
        r1 = min(d_out, ROWS * ((t + 1) * groups // parts))
        _rows(width, vnni, codes, x, q_sum, r0, r1, y)
    return y


def rows_gemv_int(q, idx, codes, level, parts=1):
    """int32 [D_out] = Σ_{i in idx} q_i t_oi exactly, for output-major codes [D_out, 32 B] on a
    SIMD level (simd.LEVELS); parts > 1 splits the rows between threads. Every row of codes
    is read: dropped inputs only get q = 0."""
    return _ENTRIES[level][parts > 1](q, idx, codes, parts)


# The width and vnni pick the instructions, so they must be compile-time constants: one
# compiled (and cached) entry point per level.
@njit(cache=True)
def _serial_portable(q, idx, codes, parts):
    return _rows_serial(0, False, q, idx, codes)


@njit(cache=True)
def _serial_avx2(q, idx, codes, parts):
    return _rows_serial(32, False, q, idx, codes)


@njit(cache=True)
def _serial_avx512(q, idx, codes, parts):
    return _rows_serial(64, False, q, idx, codes)


@njit(cache=True)
def _serial_vnni(q, idx, codes, parts):
    return _rows_serial(64, True, q, idx, codes)


@njit(cache=True)
def _parallel_portable(q, idx, codes, parts):
    return _rows_parallel(0, False, q, idx, codes, parts)


@njit(cache=True)
def _parallel_avx2(q, idx, codes, parts):
    return _rows_parallel(32, False, q, idx, codes, parts)


@njit(cache=True)
def _parallel_avx512(q, idx, codes, parts):
    return _rows_parallel(64, False, q, idx, codes, parts)


@njit(cache=True)
def _parallel_vnni(q, idx, codes, parts):
    return _rows_parallel(64, True, q, idx, codes, parts)


_ENTRIES = {"portable": (_serial_portable, _parallel_portable),
            "avx2": (_serial_avx2, _parallel_avx2),
            "avx512": (_serial_avx512, _parallel_avx512),
            "avx512vnni": (_serial_vnni, _parallel_vnni)}
