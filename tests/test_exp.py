"""kernels/exp.py: exp32 is float64 exp rounded to float32, to one ulp, compiled and
interpreted."""

import numpy as np
from elementwise import calls, elementwise, interpreted, same_bits
from hypothesis import given
from hypothesis import strategies as st
from numba import config

from minisparse.kernels.exp import exp32

_exp_all, _exp = elementwise(exp32)


def _rounded(x):
    """float64 exp (error < 1 ulp of float64) rounded once to float32."""
    with np.errstate(over="ignore"):
        return np.exp(x.astype(np.float64)).astype(np.float32)


def _ulps(a, b):
    """|a - b| in float32 ulps (both finite and >= 0, or equal)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_exp32_is_the_rounded_float64_exp_over_its_whole_range():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-110, 90, 2_000_000), rng.uniform(-1, 1, 500_000),
                        rng.standard_normal(100_000) * 1e-6]).astype(np.float32)
    ours, want = _exp(x), _rounded(x)
    assert (_ulps(ours, want) <= 1).all()
    assert (~same_bits(ours, want)).sum() <= 2  # the float64 result is a few 1e-16 off


def test_exp32_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -110.0, -103.97, -87.5, 88.72, 88.73,
                  89.0, 1e30, -1e30, 1e-45], np.float32)
    ours = _exp(x)
    assert same_bits(ours, _rounded(x)).all(), ours
    assert ours[0] == 1 and ours[2] == np.inf and ours[3] == 0 and np.isnan(ours[4])


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=64))
def test_exp32_is_within_one_ulp_on_any_float32(values):
    x = np.array(values, np.float32)
    ours, want = _exp(x), _rounded(x)
    same = same_bits(ours, want)
    assert same[np.isnan(x) | np.isinf(want) | (want == 0)].all()
    assert (_ulps(ours, want)[~same] <= 1).all()


def test_exp32_interpreted_equals_compiled():
    x = np.concatenate([np.linspace(-115, 95, 421), [np.nan, np.inf, -np.inf]]).astype(np.float32)
    with np.errstate(over="ignore"):  # exp(95) rounds to inf in float32
        python = interpreted(exp32, x)  # what NUMBA_DISABLE_JIT runs
    assert same_bits(python, _exp(x)).all()


def test_compiled_exp32_calls_no_libm_function():
    """What makes it fast anywhere: the loop holds plain arithmetic, no exp call."""
    if config.DISABLE_JIT:
        return  # interpreted: there is no generated code (covered by the test above)
    assert not calls(_exp_all, _exp, r"llvm\.exp|exp|expf|numba_exp")
