"""One token's side of a packed product, in compiled loops: the int8 codes (SPEC 3), the kept
inputs (top-K, SPEC 1; N:M blocks, SPEC 2; |A(x)| > tau, SPEC 11), SPEC 1's l2 factor, and
the int32 sums turned back into floats (SPEC 5). ``PackedLinear.gemv`` and the compiled decode
step (``decode.py``) both use them; each equals the NumPy reference operation for operation
(tested in tests/test_decode.py), in loops that vectorise where the NumPy path pays a
temporary array or a Python call per step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .topk import _row_indices

# How a projection chooses its kept inputs (an int, so one compiled function serves them all)
ALL, TOPK, BLOCK, THRESHOLD = 0, 1, 2, 3


@njit(cache=True, inline="always")
def _abs_max(x):
    """max |x| of a float32 / float64 row as the largest sign-cleared bit pattern (ordered like
    the value for floats >= 0; an integer max vectorises, a float max is a chain of compares;
    a NaN's pattern is above inf's, so a NaN comes out as np.abs(x).max() does)."""
    if x.itemsize == 4:
        bits = x.view(np.int32)
        top = np.int32(0)
        for j in range(bits.shape[0]):
            top = max(top, bits[j] & np.int32(0x7FFFFFFF))
        return np.float64(np.int32(top).view(np.float32))
    wide = x.view(np.int64)
    top64 = np.int64(0)
    for j in range(wide.shape[0]):
        top64 = max(top64, wide[j] & np.int64(0x7FFFFFFFFFFFFFFF))
    return np.int64(top64).view(np.float64)


@njit(cache=True, inline="always")
def quantize(x, q):
    """SPEC 3 for one row x [D] float32 / float64 (C order), in x's dtype: q[:] = clip(rint(x s),
    -128, 127), returns s = 127 / max(max|x|, 1e-5) -- the reference's operations, in loops
    that vectorise (1.7 us -> ~0.15 us at D = 512, float32): max|x| by ``_abs_max``, rint as
    (y + M) - M with M = 1.5 * 2^(mantissa bits) (round-half-to-even, exact for |y| < 2^22 in
    float32; here |y| <= 127). Training's ``quantize_rows`` and a decode step both use it."""
    f = x.dtype.type
    magic = f(12582912.0) if x.itemsize == 4 else f(6755399441055744.0)
    s = f(127) / max(f(_abs_max(x)), f(1e-5))
    for j in range(x.shape[0]):
        r = (x[j] * s + magic) - magic
        q[j] = np.int8(np.int32(min(max(r, f(-128)), f(127))))
    return s


@njit(cache=True, inline="always")
def _count16(mag, v, equal):
    """#{j : mag[j] >= v} (== v when equal) for uint8 mag of under 65,536 entries, summed in
    uint16: LLVM then vectorises 32 to a 512-bit register (int64 sums: 8, 4x slower)."""
    count = np.uint16(0)
    for j in range(mag.shape[0]):
        count = np.uint16(count + np.uint16((mag[j] == v) if equal else (mag[j] >= v)))
    return np.int64(count)


@njit(cache=True, inline="always")
def _count(mag, v):
    """#{j : mag[j] >= v} over any length: ``_count16`` in blocks of 65,535."""
    total = 0
    for b in range(0, mag.shape[0], 65535):
        total += _count16(mag[b:b + 65535], v, False)
    return total


@njit(cache=True, inline="always")
def top_codes(q, k, idx):
    """idx[:k] = the ascending positions of the k largest |q| of int8 codes q (SPEC 1: ties to
    the lower index). |q| is in [0, 128], kept as bytes: a binary search over it, each step one
    vectorised count of #{|q| >= v}, finds the k-th largest t (the last count short of k is
    #{|q| > t}); everything above t is kept, and the first entries equal to t, found 64 at a
    time. The byte flags then turn into positions in one loop with no branch (half the
    entries are kept, at random). At D = 512 / 1280: 0.46 / 1.03 us (int64 counts and a
    scan for the ties: 1.06 / 2.1 us)."""
    d = q.shape[0]
    mag = np.empty(d, np.uint8)
    for j in range(d):
        mag[j] = np.uint8(abs(np.int32(q[j])))
    t, step, above = 0, 128, 0
    while step:  # the largest t with #{|q| >= t} >= k
        count = _count(mag, np.uint8(t + step))
        if count >= k:
            t += step
        else:  # counts short of k fall as v does: the last is v = t + 1's
            above = count
        step //= 2
    top = np.uint8(t)
    ties, last = k - above, 0  # the first ties entries equal to t get in: those before last
    while last + 64 <= d:
        equal = _count16(mag[last:last + 64], top, True)
        if equal >= ties:
            break
        ties -= equal
        last += 64
    while ties:
        ties -= mag[last] == top
        last += 1
    for j in range(d):  # |q| -> kept (1) or not (0)
        mag[j] = np.uint8((mag[j] > top) | ((mag[j] == top) & (j < last)))
    n = 0
    for j in range(d):
        idx[n] = j
        n += mag[j]
    return n


@njit(cache=True, inline="always")
def select(a, q, sel, k, block_n, block_m, tau, idx):
    """How many inputs of a [D] (float32, A(x)) are kept, their ascending positions in idx:
    all, the top-k |a| (SPEC 1; on the codes q when given, the same order), the block_n
    largest of each block_m (SPEC 2, ties to the lower index), or |a| > tau (SPEC 11)."""
    d = a.shape[0]
    if sel == TOPK and k < d:
        if q.shape[0] > 0:
            return top_codes(q, k, idx)
        kept = _row_indices(a, a.view(np.int32), 31, k)
        idx[:k] = kept
        return k
    n = 0
    if sel == BLOCK:
        for b in range(0, d, block_m):
            for j in range(b, b + block_m):
                before = 0  # entries ahead of j in (-|a|, index) order
                for i in range(b, b + block_m):
                    before += abs(a[i]) > abs(a[j]) or (abs(a[i]) == abs(a[j]) and i < j)
                if before < block_n:
                    idx[n] = j
                    n += 1
        return n
    for j in range(d):
        if sel != THRESHOLD or abs(a[j]) > tau:
            idx[n] = j
            n += 1
    return n


@njit(cache=True, inline="always")
def l2_factor(a, kept):
    """SPEC 1's r = ||a|| / max(||a ⊙ M||, 1e-12) as sparsity._rescale_factor computes it: both
    norms of a / max|a| (no overflow), in float32."""
    m = np.float32(0)
    for j in range(a.shape[0]):
        m = max(m, abs(a[j]))
    div = m if m > 0 else np.float32(1)
    total = np.float32(0)
    for j in range(a.shape[0]):
        u = a[j] / div
        total += u * u
    part = np.float32(0)
    for j in kept:
        u = a[j] / div
        part += u * u
    norm, kept_norm = np.sqrt(total), np.sqrt(part)
    if m * kept_norm < np.float32(1e-12):
        return m * norm / np.float32(1e-12)
    return norm / kept_norm


@njit(cache=True, inline="always")
def ternary_inputs(x, sel, k, block_n, block_m, tau, l2, q, a, idx):
    """(s, count, r) for one token x [D] float32 of a ternary product: q [D] = its int8
    codes, s their scale (SPEC 3), idx[:count] the kept inputs chosen on A(x) = q / s (stored
    in a [D] when the rule needs the values: N:M, threshold or l2), r SPEC 1's factor (1
    unless l2). sel: ALL | TOPK | BLOCK | THRESHOLD (as ``select``)."""
    s = quantize(x, q)
    if sel == BLOCK or sel == THRESHOLD or l2:  # top-K (or all) needs only the codes
        for j in range(x.shape[0]):  # A(x) = q / s, as the reference
            a[j] = np.float32(q[j]) / s
    count = select(a, q, sel, k, block_n, block_m, tau, idx)
    r = l2_factor(a, idx[:count]) if l2 else np.float32(1)
    return s, count, r


EXACT_KEPT = 1 << 17  # kept inputs whose sums always fit float32: |Σ q t| <= 128 K <= 2^24


@njit(cache=True, inline="always")
def rescale_sums(acc, s, scale, r, out, kept):
    """out[:] = float32(acc / (s scale)) * r: SPEC 5's y = Σ q t / (s_x s_w) times SPEC 1's r,
    the divisor s_x s_w taken in float32 and the division in float64, as NumPy divides int32
    sums by a float32 scalar. When every |acc| <= 2^24 the sums are exact in float32, and a
    float32 division rounds as the float64 one rounded to float32 (53 >= 2 * 24 + 2 bits:
    rounding a quotient twice is then harmless), with twice the lanes per vector and a faster
    divide. ``kept`` inputs were summed: with |q| <= 128 and |t| <= 1, up to EXACT_KEPT of
    them need no look at the sums (a pass fewer); more, and every |acc| is checked."""
    div = s * np.float32(scale)
    top = np.int64(0)
    if kept > EXACT_KEPT:
        for b in range(out.shape[0]):
            top = max(top, abs(np.int64(acc[b])))
    if top <= 1 << 24:
        for b in range(out.shape[0]):
            out[b] = (np.float32(acc[b]) / div) * r
        return
    wide = np.float64(div)
    for b in range(out.shape[0]):
        out[b] = np.float32(acc[b] / wide) * r


@njit(cache=True)
def token_inputs(x, sel, k, tau, l2, q, a, idx):
    """``ternary_inputs`` for a call from Python (no N:M: PackedLinear skips blocks)."""
    return ternary_inputs(x, sel, k, 0, 1, tau, l2, q, a, idx)


@njit(cache=True)
def token_outputs(acc, s, scale, r, kept):
    """float32 [D_out] = acc / (s_x s_w) * r (``rescale_sums``, sums of ``kept`` inputs) for
    a call from Python."""
    out = np.empty(acc.shape[0], np.float32)
    rescale_sums(acc, s, scale, r, out, kept)
    return out
