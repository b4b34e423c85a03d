"""SPEC 3's boundary flips: which code differences are legitimate, and a search over them.

Where the reference's v = X·s lies within 8 ulps (of the input dtype) of a half-integer, another
legitimate evaluation order may round to the neighbouring code: a *boundary flip*, counted apart
from mismatches. Not where every step is exact (γ, or SPEC 4's α, a power of two and v exactly
k + ½): there the code must round half to even. SPEC 4's ternary codes flip at |W·s| = ½.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..quant import absmax_quantize, absmean_ternarize
from .cases import finfo

WINDOW_ULPS = 8
MAX_FLIPS_SEARCHED = 6  # per row: 2^6 subsets of independent flips at most
MAX_SCALE_VARIANTS = 64  # per row: roundings of another evaluation of the scale


def _ulp(v, dtype):
    """The spacing of ``dtype`` floats at |v| (v computed in float32/64)."""
    mant = finfo(dtype).nmant
    _, e = np.frexp(np.abs(v).astype(np.float64))
    return np.ldexp(1.0, e - 1 - mant)


def _is_power_of_two(a):
    m, _ = np.frexp(np.asarray(a, np.float64))
    return m == 0.5


def absmax_boundaries(x, dtype=None):
    """(bool [..., D] of boundary entries, the lower code floor(v), v = X·s) for SPEC 3's codes of
    x (computed in x's dtype, or in float32 for float16/bfloat16 inputs given as ``dtype``)."""
    _, s = absmax_quantize(x)
    v = x * s
    gamma = np.abs(x).max(axis=-1, keepdims=True)
    return _near_half(v, dtype or x.dtype, _is_power_of_two(np.maximum(gamma, 1e-5))), v


def absmean_boundaries(w, dtype=None):
    """As ``absmax_boundaries`` for SPEC 4's ternary codes (flips only at |W·s| = ½)."""
    _, s = absmean_ternarize(w)
    v = w * s
    alpha = max(float(np.abs(w).mean()), 1e-5)
    near = _near_half(v, dtype or w.dtype, _is_power_of_two(alpha))
    return near & (np.abs(v) < 1), v


def _near_half(v, dtype, exact_scale):
    dist = np.abs(v - (np.floor(v) + 0.5))
    near = dist <= WINDOW_ULPS * _ulp(v, dtype)
    return near & ~(exact_scale & (dist == 0))  # exact halves must round half to even


def legal_codes(got, expected, boundary, v, low, high):
    """(bool mask of entries where got differs illegally, number of boundary flips): a code may
    differ from the reference only by a flip to the other neighbour of v at a boundary entry."""
    got = np.asarray(got).astype(np.int64)
    expected = expected.astype(np.int64)
    other = np.clip(np.where(expected == np.clip(np.floor(v), low, high), np.floor(v) + 1,
                             np.floor(v)), low, high).astype(np.int64)
    flip = boundary & (got != expected) & (got == other)
    return (got != expected) & ~flip, int(flip.sum())


def row_variants(codes, boundary, v, low, high):
    """For one row (or one matrix: SPEC 4 has one scale): code arrays reachable by boundary
    flips (the reference's first), with the number of flips each makes. First every rounding
    of another evaluation of the scale, s·(1 + t) for small t (the boundary entries whose |v|
    lies between |v|/(1 + t) and the half flip together: one variant per gap between their
    relative distances to the half, nearest t first), then every subset of the first
    MAX_FLIPS_SEARCHED boundary entries (flips of independent upstream roundings)."""
    yield codes, 0
    seen = {codes.tobytes()}
    where = np.flatnonzero(boundary)
    if where.size == 0:
        return
    a = np.abs(v[where]).astype(np.float64)
    sign, base = np.sign(v[where]), np.floor(a)
    rel = (base + 0.5 - a) / a  # |v|·(1 + t) crosses its half exactly when t > rel
    cuts = np.unique(rel)
    ts = np.concatenate([[cuts[0] - abs(cuts[0]) - 1e-300], (cuts[:-1] + cuts[1:]) / 2,
                         [cuts[-1] + abs(cuts[-1]) + 1e-300]])
    for t in sorted(ts, key=abs)[:MAX_SCALE_VARIANTS]:
        variant = codes.copy()
        variant[where] = np.clip(sign * (base + (t > rel)), low, high)
        if variant.tobytes() not in seen:
            seen.add(variant.tobytes())
            yield variant, int((variant != codes).sum())
    where = where[:MAX_FLIPS_SEARCHED]
    other = np.clip(np.where(codes[where] == np.clip(np.floor(v[where]), low, high),
                             np.floor(v[where]) + 1, np.floor(v[where])), low, high)
    for n in range(1, len(where) + 1):
        for chosen in itertools.combinations(range(len(where)), n):
            variant = codes.copy()
            variant[where[list(chosen)]] = other[list(chosen)]
            if variant.tobytes() not in seen:
                seen.add(variant.tobytes())
                yield variant, n
