"""NumPy's order of a float sum, in compiled code: ``pairwise_sum(a) == np.add.reduce(a)`` bit
for bit (float32 stays float32), so a compiled op can round as the NumPy reference does.

NumPy sums a contiguous row pairwise (numpy/_core/src/umath/loops_utils.h):

    n < 8:     a[0] + a[1] + ... in order (from 0)
    n <= 128:  eight running sums r_j = a[j] + a[j + 8] + ..., then
               ((r_0 + r_1) + (r_2 + r_3)) + ((r_4 + r_5) + (r_6 + r_7)), then the n % 8 left
    else:      the sum of the first n2 = n // 2 - (n // 2) % 8 plus the sum of the rest

The eight independent sums also make it fast: a sequential float32 sum is one chain of
dependent adds (0.9 us for 512 values here); this takes 0.34 us.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK = 128  # NumPy's PW_BLOCKSIZE


@njit(cache=True, inline="always")
def _halves(n):
    """Where NumPy splits a sum of n > BLOCK values: the first n // 2 - (n // 2) % 8 of them."""
    half = n // 2
    return half - half % 8


@njit(cache=True)
def pairwise_sum(a):
    """Σ a of a 1-D float array in NumPy's order. The recursion runs on an explicit stack
    (Numba's cache cannot hold a recursive function): frame i is the sum of a[lo : lo + n],
    at stage 0 (nothing summed), 1 (its first half being summed) or 2 (its second half)."""
    frames = np.empty((64, 3), np.int64)  # lo, n, stage; depth <= log2(n / BLOCK) + 1
    firsts = np.empty(64, a.dtype)  # a frame's first-half sum while its second half runs
    frames[0, 0], frames[0, 1], frames[0, 2] = 0, a.shape[0], 0
    depth, done = 1, a.dtype.type(0)  # done: the value of the frame that returned last
    while depth:
        top = depth - 1
        lo, n, stage = frames[top, 0], frames[top, 1], frames[top, 2]
        if n <= BLOCK:
            done = _block_sum(a, lo, n)
            depth -= 1
        elif stage < 2:
            if stage == 1:
                firsts[top] = done
            half = _halves(n)
            frames[top, 2] = stage + 1
            frames[depth, 0] = lo if stage == 0 else lo + half
            frames[depth, 1] = half if stage == 0 else n - half
            frames[depth, 2] = 0
            depth += 1
        else:
            done = firsts[top] + done
            depth -= 1
    return done


@njit(cache=True, inline="always")
def _block_sum(a, lo, n):
    # Σ a[lo : lo + n] for n <= BLOCK, as NumPy sums it
    if n < 8:
        res = a.dtype.type(0)
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, lo + n):
        res += a[i]
    return res
