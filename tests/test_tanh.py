"""kernels/tanh.py: tanh32 is the correctly rounded float32 tanh, compiled and interpreted."""

import numpy as np
from elementwise import calls, elementwise, interpreted, same_bits
from hypothesis import given
from hypothesis import strategies as st
from numba import config

from minisparse.kernels.tanh import tanh32

_tanh_all, _tanh = elementwise(tanh32)


def _correct(x):
    """float32 tanh correctly rounded: float64 tanh (error < 1 ulp of float64) rounded once."""
    return np.tanh(x.astype(np.float64)).astype(np.float32)


def test_tanh32_is_correctly_rounded_at_every_scale():
    rng = np.random.default_rng(0)
    scales = 10.0 ** np.arange(-8, 3)  # 1e-8 .. 100: the polynomial, the doublings, the clamp
    x = np.concatenate([rng.standard_normal(100_000) * s for s in scales]
                       + [rng.uniform(-10.5, 10.5, 200_000)]).astype(np.float32)
    ours = _tanh(x)
    wrong = ~same_bits(ours, _correct(x))
    assert not wrong.any(), f"tanh32 differs at {x[wrong][:5]}: {ours[wrong][:5]}"


def test_tanh32_special_values():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-38, 3e38, -3e38,
                  8.5, 10.0, -10.0], np.float32)
    ours = _tanh(x)
    assert same_bits(ours, _correct(x)).all(), ours
    assert np.signbit(ours[1]) and not np.signbit(ours[0])  # -0 stays -0
    assert ours[2] == 1 and ours[3] == -1 and np.isnan(ours[4])


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=64))
def test_tanh32_equals_the_rounded_float64_tanh_on_any_float32(values):
    x = np.array(values, np.float32)
    assert same_bits(_tanh(x), _correct(x)).all()


def test_tanh32_interpreted_equals_compiled():
    x = np.linspace(-12, 12, 241, dtype=np.float32)
    python = interpreted(tanh32, x)  # what NUMBA_DISABLE_JIT runs
    assert same_bits(python, _tanh(x)).all()


def test_compiled_tanh32_calls_no_libm_function():
    """What makes it fast anywhere: the loop holds plain arithmetic, no tanh / exp call."""
    if config.DISABLE_JIT:
        return  # interpreted: there is no generated code (covered by the test above)
    assert not calls(_tanh_all, _tanh, r"llvm\.(tanh|exp)|tanh|tanhf|exp|expf|expm1")
