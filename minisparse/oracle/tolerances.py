"""How close another implementation must come to the reference, per dtype, and the one
comparison rule that applies it (used by the harness, the golden-vector checks and the tests).

An entry passes when ``|got - expected| <= atol + rtol * scale``, with ``scale`` the largest
|entry| of the expected array -- or, for a matmul, of the same product taken over absolute
values (``|A| @ |B|``, the size of the terms summed), when the caller passes it: an output
that cancels to ~0 is then not held to a relative bound no summation order can meet.

Three kinds of result, by how much rounding the SPEC leaves open:

- ``exact``: no arithmetic, or arithmetic the SPEC fixes step by step. Top-K masks and outputs
  without rescale (a selection), int8 / ternary codes (SPEC 3-4 fix ``rint(x * s)`` in the input
  dtype), straight-through gradients without rescale (``g`` or ``M ⊙ g``).
- ``elementwise``: a short, fixed chain of roundings per entry, e.g. ``q / s`` vs ``q * (1 / s)``:
  the absmax scale ``127 / max(gamma, 1e-5)``, dequantized values. A few units in the last place.
- ``reduction``: a sum whose order is the implementation's choice: the l2 rescale factor ``r``
  and everything it multiplies, the absmean scale, matmul outputs and weight / input gradients.
  Sized for sums of up to a few thousand terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to the scale: max|expected|, or max(|A| @ |B|) for a matmul A @ B
    atol: float  # absolute floor: the smallest normal number, for all-(near-)zero arrays


def _table(tiny, elementwise, reduction):
    return {"exact": Tolerance(0.0, 0.0), "elementwise": Tolerance(elementwise, tiny),
            "reduction": Tolerance(reduction, tiny)}


# float32 eps = 1.2e-7, float64 eps = 2.2e-16: elementwise allows ~8 eps, reductions ~100 eps
# (float32) / ~5000 eps (float64, whose sums of thousands of terms lose more digits in ulps).
# float16 (eps 9.8e-4) and bfloat16 (eps 7.8e-3): ~4 eps elementwise; reductions ~10 eps, for
# kernels that accumulate in float32 and round the result once (as every sane one does).
TOLERANCES = {
    "float32": _table(float(np.finfo(np.float32).tiny), elementwise=1e-6, reduction=1e-5),
    "float64": _table(float(np.finfo(np.float64).tiny), elementwise=2e-15, reduction=1e-12),
    "float16": _table(float(np.finfo(np.float16).tiny), elementwise=4e-3, reduction=1e-2),
    "bfloat16": _table(2.0**-126, elementwise=4e-2, reduction=1e-1),
}


def tolerance(dtype, kind) -> Tolerance:
    """The Tolerance for ``kind`` ("exact" | "elementwise" | "reduction") results in ``dtype``."""
    table = TOLERANCES.get(dtype if isinstance(dtype, str) else np.dtype(dtype).name)
    if table is None or kind not in table:
        raise ValueError(f"tolerance: no entry for dtype {np.dtype(dtype).name} and kind {kind!r}; "
                         f"dtypes {list(TOLERANCES)}, kinds {list(TOLERANCES['float32'])}")
    return table[kind]


@dataclass(frozen=True)
class Mismatch:
    """Why ``got`` fails to match ``expected``: a wrong shape/dtype, or the largest error."""

    name: str
    reason: str
    max_error: float = float("nan")
    index: tuple | None = None
    expected_value: object = None
    got_value: object = None

    def __str__(self):
        if self.index is None:
            return f"output {self.name!r}: {self.reason}"
        return (f"output {self.name!r}: {self.reason}; largest error {self.max_error:.6g} at index "
                f"{self.index}: expected {self.expected_value!r}, got {self.got_value!r}")


def compare(name, got, expected, kind, scale=None) -> Mismatch | None:
    """None if ``got`` matches ``expected`` (same shape and dtype, within the ``kind`` tolerance
    of expected's dtype, relative to max(|expected|, |scale|)), else the Mismatch with the
    largest error. Compare codes with "exact"."""
    got = np.asarray(got)
    if got.dtype == object:
        return Mismatch(name, f"is not a numeric array (got {type(got.flat[0]).__name__} items)")
    if got.shape != expected.shape:
        return Mismatch(name, f"has shape {got.shape}, expected {expected.shape}")
    if got.dtype != expected.dtype:
        return Mismatch(name, f"has dtype {got.dtype}, expected {expected.dtype}")
    tol = tolerance(expected.dtype.name if expected.dtype.name in TOLERANCES else "float64",
                    kind)
    exp = expected.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, counted as an infinite error below
        err = np.abs(got.astype(np.float64) - exp)
    err = np.where(np.isnan(err), np.inf, err)  # NaN fails every bound
    magnitude = max((float(np.abs(a).max()) for a in (exp, scale) if a is not None and np.size(a)),
                    default=0.0)
    allowed = tol.atol + tol.rtol * magnitude
    bad = err > allowed
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
    return Mismatch(name, f"{int(bad.sum())} of {err.size} entries differ (tolerance: {kind}, "
                          f"allowed {allowed:.3g})", float(err[index]), index,
                    expected[index].item(), got[index].item())
