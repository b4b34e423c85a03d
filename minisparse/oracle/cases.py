"""The cases the conformance harness draws: the inputs on which real kernels go wrong.

Arrays are made by NumPy from a drawn seed, a size, a kind and a magnitude -- never entry by
entry -- so hypothesis shrinks a failure to seed 0 at the smallest failing size: a small,
*typical* (random-looking) input rather than a degenerate one like x = [0.].

- **Sizes** come from a ladder of powers of two and their neighbours, 1 to 4096, where tiled
  kernels change code path (a tail after the last full tile, a second tile, a second pass);
  one axis may be big while the others stay small, so a case stays cheap (``BUDGET`` entries).
- **Kinds** of rows (``ROW_KINDS``): random normals; few values with many sign-blind ties;
  *code ties* (distinct floats that quantize to the same int8 code, so a top-K mask taken
  before quantization keeps a different entry than one taken on A(X)); half steps (row max
  127 · 2^j, entries (n + ½) · 2^j: x·s is exactly n + ½ with 127 / γ, rounded half to even,
  but γ is no power of two, so 127 · (1 / γ) may round a whole row's halves the other way:
  boundary flips, SPEC 3);
  entries at exactly γ/2 for a non-power-of-two γ (legitimate boundary flips); rows that are
  mostly exact zeros; rows of one magnitude. (SPEC 4's exact halves, which must round half to
  even, are the weights' "half" kind: mean|W| a power of two.)
- **Magnitudes** per row: 1, tiny (below SPEC 3-4's 1e-5 floor), huge (squares overflow),
  or a mix of all of them in one array (per-row scales must stay per row).
- **dtypes**: float64, float32, float16 and bfloat16 (bfloat16 through ml_dtypes or torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

# powers of two and +-1 up to 4096: kernels branch at these sizes
LADDER = tuple(sorted({n for p in range(13) for n in (2**p - 1, 2**p, 2**p + 1)} - {0, 4097}))
BUDGET = 1 << 14  # entries per drawn array: a big axis goes with small others
ROW_KINDS = ("normal", "ties", "code_ties", "half", "gamma_half", "zeros", "equal")
MAGNITUDE_MODES = ("one", "mixed", "tiny", "huge")
WEIGHT_KINDS = ("normal", "half", "ties", "tiny")
DTYPES = ("float64", "float32", "float16", "bfloat16")


def numpy_dtype(name):
    """The NumPy dtype of a harness dtype name; bfloat16 needs the ml_dtypes package."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("dtype bfloat16 needs the ml_dtypes package (pip install "
                             "ml_dtypes), or check a torch function") from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return np.dtype(name)


def finfo(dtype):
    """np.finfo, also for ml_dtypes' bfloat16 (which NumPy does not know as a float)."""
    if np.dtype(dtype).kind == "f":
        return np.finfo(dtype)
    import ml_dtypes

    return ml_dtypes.finfo(dtype)


def compute_dtype(dtype):
    """The dtype the reference computes in: the input's, float32 for float16 / bfloat16 (its
    results rounded back to the input dtype; SPEC's rules compare within that dtype's ulps)."""
    return np.dtype(dtype) if np.dtype(dtype) in (np.float32, np.float64) else np.dtype(np.float32)


@dataclass(frozen=True)
class Controls:
    """What ``check`` draws: dtypes, the size range of every axis, and parameters held fixed
    (e.g. {"bits": 1.58, "rescale": "none"}: only those values are drawn)."""

    dtypes: tuple = ("float32", "float64")
    min_size: int = 1
    max_size: int = 4096
    fixed: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.dtypes, str):
            object.__setattr__(self, "dtypes", (self.dtypes,))
        if not self.dtypes:
            raise ValueError("check: dtypes must name at least one dtype")
        for name in self.dtypes:
            numpy_dtype(name)
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"check: need 1 <= min_size <= max_size, got {self.min_size}, "
                             f"{self.max_size}")

    def param(self, name, strategy):
        """The fixed value of parameter ``name`` if there is one, else ``strategy``."""
        return st.just(self.fixed[name]) if name in self.fixed else strategy


def sizes(ctl, low=1, high=4096, cap=None):
    """An axis size: the ladder within [low, high], the controls' range and ``cap``, or now and
    then any integer there. Shrinks towards the smallest."""
    lo = max(low, ctl.min_size)
    hi = min(high, ctl.max_size, cap if cap is not None else high)
    if lo > hi:  # the controls leave nothing in range: the closest legal size
        return st.just(max(min(lo, high), low))
    ladder = [n for n in LADDER if lo <= n <= hi] or [lo]
    return st.one_of(st.sampled_from(ladder), st.integers(lo, hi))


def rows_of(rng, shape, kind, dtype, magnitude):
    """An array ``shape`` [..., D] of ``kind`` rows (``ROW_KINDS``), each row at its own
    magnitude for ``magnitude`` "mixed", in ``dtype``; arithmetic in float64, then one rounding
    (power-of-two scales keep the exact half steps exact)."""
    d = shape[-1]
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "ties":
        x = rng.choice([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0], shape)
    elif kind == "code_ties":  # codes c from a few values, floats c + u with |u| < 0.45
        x = rng.choice([-6, -3, -2, 0, 2, 3, 6], shape) + rng.uniform(-0.45, 0.45, shape)
        _put_max(rng, x, 127.0)
        x = x * rng.uniform(0.6, 1.7)  # a non-power-of-two unit: codes stay c
    elif kind == "half":  # row max 127: s = 1 exactly and x * s = n + 1/2
        x = rng.integers(-127, 127, shape) + 0.5
        _put_max(rng, x, 127.0)
    elif kind == "gamma_half":  # entries at gamma/2: x * s within ulps of 63.5
        gamma = rng.uniform(1.01, 1.99)
        x = rng.uniform(-gamma / 3, gamma / 3, shape)
        x = np.where(rng.random(shape) < 0.3, np.sign(rng.standard_normal(shape)) * gamma / 2, x)
        _put_max(rng, x, gamma)
    elif kind == "zeros":
        x = np.where(rng.random(shape) < 0.7, 0.0, rng.standard_normal(shape))
    elif kind == "equal":
        x = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * rng.choice([0.5, 1.0, 3.0])
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    if d == 0:
        return x.astype(dtype)
    return (x * _scales(rng, (*shape[:-1], 1), dtype, magnitude, exact=kind == "half")
            ).astype(dtype)


def _put_max(rng, x, value):
    """Put +-value at one random position of every row."""
    cols = rng.integers(0, x.shape[-1], (*x.shape[:-1], 1))
    np.put_along_axis(x, cols, value * np.where(rng.random(cols.shape) < 0.5, -1, 1), axis=-1)


def _scales(rng, shape, dtype, mode, exact):
    """Per-row factors for a magnitude mode; powers of two when ``exact``."""
    info = finfo(dtype)
    top = min(float(np.log2(float(info.max))) - 10, 400)  # huge: squares overflow, finite values
    bottom = max(float(np.log2(float(info.tiny))) + 2, -40)  # tiny: below the 1e-5 floor
    exponents = {"one": (0, 0), "tiny": (bottom, max(bottom, -17)), "huge": (top - 8, top),
                 "mixed": (bottom, top), "moderate": (-10, 10)}[mode]
    e = rng.uniform(*exponents, shape)
    return 2.0 ** np.round(e) if exact else 2.0**e


@st.composite
def arrays(draw, ctl, shape, dtype, kinds=ROW_KINDS, magnitudes=MAGNITUDE_MODES):
    """One array from (seed, kind, magnitude): the unit every case is built from."""
    kind = draw(ctl.param("kind", st.sampled_from(kinds)))
    magnitude = draw(ctl.param("magnitude", st.sampled_from(magnitudes)))
    seed = draw(st.integers(0, 2**32 - 1))
    return rows_of(np.random.default_rng(seed), shape, kind, dtype, magnitude)


def weights_of(rng, shape, kind, dtype):
    """A weight matrix [D_out, D_in]: normal, ties, tiny (mean|W| below SPEC 4's 1e-5 floor,
    where the floor sets the scale), or SPEC 4's exact half case (mean|W| = α a power of two and
    entries at ±α/2, which round to 0 half to even)."""
    if kind == "half":  # pairs (0.5, 1.5) have mean 1: mean|W| = 1 exactly, scaled by 2^j
        flat = np.resize([0.5, 1.5], int(np.prod(shape)))
        if flat.size % 2:
            flat[-1] = 1.0
        w = rng.permutation(flat) * np.where(rng.random(flat.size) < 0.5, -1, 1)
        return (w.reshape(shape) * 2.0 ** rng.integers(-8, 8)).astype(dtype)
    if kind == "ties":
        return rng.choice([0.0, 0.25, -0.25, 1.0, -1.0], shape).astype(dtype)
    if kind == "tiny":
        return (rng.standard_normal(shape) * _scales(rng, (), dtype, "tiny", False)).astype(dtype)
    return (rng.standard_normal(shape) * 2.0 ** rng.uniform(-12, 12)).astype(dtype)


@st.composite
def weights(draw, ctl, shape, dtype):
    kind = draw(ctl.param("w_kind", st.sampled_from(WEIGHT_KINDS)))
    return weights_of(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), shape, kind, dtype)


def grads(draw, shape, dtype):
    """dL/d(output): random normals from a drawn seed."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal(shape).astype(dtype)
