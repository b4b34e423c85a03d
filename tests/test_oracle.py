"""The functional oracle (SPEC 10): integer-code form, layer reference vs the autograd ops,
tolerance table and comparison rule, input checks, and the stable API surface."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import feature_arrays, linear_kwargs

from minisparse import oracle
from minisparse.linear import sparse_linear
from minisparse.tensor import Tensor

MODERATE = (1e-6, 1e-3, 1.0, 1e3)  # row magnitudes that keep a matmul far from overflow


@st.composite
def layer_inputs(draw):
    """(x [..., 8], w [D_out, 8]) of one dtype, rows with ties, equal values and own scales."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    x = draw(feature_arrays(dtype, d=8, lead=lead, magnitudes=MODERATE))
    w = draw(feature_arrays(dtype, d=8, lead=(draw(st.integers(1, 5)),), magnitudes=MODERATE))
    return x, w


@given(layer_inputs(), linear_kwargs())
def test_integer_code_form_equals_dequantized_form(inputs, kwargs):
    x, w = inputs
    kwargs = {k: v for k, v in kwargs.items() if k not in ("bits", "ste")}
    y_int = oracle.sparse_linear_int(x, w, **kwargs)
    y = oracle.sparse_linear_forward(x, w, bits=1.58, **kwargs)
    scale = oracle.sparse_linear_forward(np.abs(x), np.abs(w), bits=1.58, **kwargs)
    assert y_int.dtype == x.dtype
    assert oracle.compare("y_int", y_int, y, "reduction", scale) is None  # to float rounding


def test_integer_code_form_by_hand():
    x = np.array([[4.0, -2.0, 1.0, 0.0]])  # s_x = 127/4: q = [127, -64, 32, 0] (rint(31.75) = 32)
    w = np.array([[1.0, 1.0, -1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])  # mean|w| = 0.75: t = rint(w/.75)
    q, s_x = oracle.absmax_quantize(x)
    t, s_w = oracle.absmean_ternarize(w)
    assert q.tolist() == [[127, -64, 32, 0]] and t.tolist() == [[1, 1, -1, 0], [0, 1, 0, 1]]
    # top-2 keeps q[0], q[1]: y = [127 - 64, -64] / (s_x s_w)
    expected = np.array([[63.0, -64.0]]) / (s_x * s_w)
    np.testing.assert_allclose(oracle.sparse_linear_int(x, w, k=2), expected, rtol=1e-15)


@given(layer_inputs(), linear_kwargs())
def test_autograd_ops_match_the_oracle(inputs, kwargs):
    # The layer composed of autograd ops (forward and the engine's backward) against the
    # hand-written NumPy forward and backward of the oracle, in both dtypes.
    x, w = inputs
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    y = sparse_linear(xt, wt, backend="numpy", **kwargs)
    g = np.random.default_rng(0).standard_normal(y.shape).astype(x.dtype)
    y.backward(g)
    ste = kwargs.pop("ste")
    expected = (oracle.sparse_linear_forward(x, w, **kwargs),
                *oracle.sparse_linear_backward(g, x, w, ste=ste, **kwargs))
    scales = oracle.sparse_linear_magnitudes(g, x, w, ste=ste, **kwargs)
    for name, got, ref, scale in zip(("y", "grad_x", "grad_w"), (y.data, xt.grad, wt.grad),
                                     expected, scales, strict=True):
        assert oracle.compare(name, got, ref, "reduction", scale) is None, (name, got, ref)


def test_pure_functions_float64_and_no_mutation():
    rng = np.random.default_rng(3)
    x, w, g = rng.standard_normal((2, 8)), rng.standard_normal((3, 8)), rng.standard_normal((2, 3))
    before = [a.copy() for a in (x, w, g)]
    kwargs = dict(sparsity=0.5, bits=1.58, rescale="l2")
    y1 = oracle.sparse_linear_forward(x, w, **kwargs)
    grads = oracle.sparse_linear_backward(g, x, w, **kwargs)
    oracle.sparse_linear_int(x, w, sparsity=0.5)
    for a, b in zip((x, w, g), before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert y1.dtype == np.float64 and all(d.dtype == np.float64 for d in grads)
    np.testing.assert_array_equal(y1, oracle.sparse_linear_forward(x, w, **kwargs))


# ---- tolerances and the comparison rule ---------------------------------------------------------


def test_tolerance_table():
    assert set(oracle.TOLERANCES) == {"float16", "bfloat16", "float32", "float64"}
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
    for dtype, table in oracle.TOLERANCES.items():
        assert table["exact"] == oracle.Tolerance(0.0, 0.0)
        assert 0 < table["elementwise"].rtol < table["reduction"].rtol < 1e4 * eps[dtype]
        assert oracle.tolerance(dtype, "reduction") is table["reduction"]
        assert table["elementwise"].rtol >= 4 * eps[dtype]  # a few roundings always pass
    rtols = [oracle.TOLERANCES[d]["reduction"].rtol for d in ("float64", "float32", "float16",
                                                              "bfloat16")]
    assert rtols == sorted(rtols)
    with pytest.raises(ValueError, match="int32.*float32"):
        oracle.tolerance(np.int32, "exact")
    with pytest.raises(ValueError, match="'loose'"):
        oracle.tolerance(np.float32, "loose")


def test_compare_rule():
    ref = np.array([[100.0, 0.0], [-3.0, 1e-9]], np.float32)
    assert oracle.compare("y", ref.copy(), ref, "exact") is None
    # within rtol * max|ref| = 1e-5 * 100: an error of 5e-4 on a zero entry is allowed
    assert oracle.compare("y", ref + np.float32(5e-4), ref, "reduction") is None
    m = oracle.compare("y", ref + np.array([[0, 0], [0, 2e-3]], np.float32), ref, "reduction")
    assert m.index == (1, 1) and m.max_error == pytest.approx(2e-3, rel=1e-3)
    assert "1 of 4 entries differ" in str(m) and "at index (1, 1)" in str(m)
    nan = ref.copy()
    nan[0, 1] = np.nan
    assert oracle.compare("y", nan, ref, "reduction").index == (0, 1)
    assert "dtype float64, expected float32" in str(oracle.compare("y", ref.astype(float), ref,
                                                                   "exact"))
    assert "shape (4,), expected (2, 2)" in str(oracle.compare("y", ref.ravel(), ref, "exact"))
    s = np.float32(2.0)
    assert oracle.compare("s", np.asarray(s), np.asarray(s), "reduction") is None  # 0-d arrays
    codes = np.array([1, -1, 0], np.int8)
    assert oracle.compare("t", np.array([1, 0, 0], np.int8), codes, "exact").index == (1,)


# ---- input checks and the API surface -----------------------------------------------------------

X, W = np.ones((2, 4)), np.ones((3, 4))


@pytest.mark.parametrize("call, error, words", [
    (lambda: oracle.sparse_linear_forward(np.array([[np.nan, 1, 1, 1]]), W), ValueError,
     ["sparse_linear_forward", "x", "finite"]),
    (lambda: oracle.sparse_linear_forward(X, W.astype(np.float32)), TypeError,
     ["one float dtype", "float32", "float64"]),
    (lambda: oracle.sparse_linear_forward(X, np.ones((3, 5))), ValueError, ["(2, 4)", "(3, 5)"]),
    (lambda: oracle.sparse_linear_forward(X, W, bits=2), ValueError, ["bits", "2"]),
    (lambda: oracle.sparse_linear_forward(X, W, k=7), ValueError, ["k", "[1, 4]", "7"]),
    (lambda: oracle.sparse_linear_backward(np.ones((2, 2)), X, W), ValueError,
     ["grad_y", "(2, 3)", "(2, 2)"]),
    (lambda: oracle.sparse_linear_backward(np.full((2, 3), np.inf), X, W), ValueError,
     ["grad_y", "finite", "inf"]),
    (lambda: oracle.sparse_linear_int(X, W, block=(1, 3)), ValueError, ["M=3", "D=4"]),
    (lambda: oracle.ffn_forward(X, W, W, W.T, act="gelu"), ValueError, ["act", "gelu"]),
])
def test_invalid_arguments_raise_clear_errors(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_api_surface():
    for name in oracle.__all__:
        assert callable(getattr(oracle, name)) or name in ("FORMAT_VERSION", "TOLERANCES")
    assert {"gpt_forward", "gpt_loss_and_grads", "topk_forward", "topk_backward",
            "sparse_linear_int"} <= set(oracle.__all__)
    from minisparse.oracle import harness
    assert oracle.check is harness.check and oracle.assert_conforms is harness.assert_conforms
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        oracle.nope  # noqa: B018


def test_shipped_spec_is_the_team_contract():
    """The package ships SPEC.md for kernel authors; it must not drift from the contract."""
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "minisparse" / "oracle" / "SPEC.md"
    contract = Path(__file__).resolve().parents[2] / "shared" / "SPEC.md"
    if not contract.exists():
        pytest.skip("no shared/SPEC.md beside this checkout")
    assert shipped.read_text() == contract.read_text()


# ---- edge cases of the reference functions (issue 11, item 8) -----------------------------------


@pytest.mark.parametrize("dtype, big", [(np.float32, 1e20), (np.float64, 1e200),
                                        (np.float32, 3e38), (np.float64, 1e-300)])
def test_l2_rescale_is_overflow_and_underflow_safe(dtype, big):
    # SPEC 1: the norms of a finite row never give NaN or inf; r is the mathematical ratio
    x = np.array([[big, -0.5 * big, 0.25 * big, 0.0]], dtype)
    y, mask, r = oracle.topk_forward(x, k=2, rescale="l2")
    assert np.isfinite(r).all() and np.isfinite(y).all()
    exact = np.sqrt(1 + 0.25 + 0.0625) / np.sqrt(1 + 0.25)  # ||x|| / ||x ⊙ M||, scale-free
    if big * np.sqrt(1.25) >= 1e-12:
        assert r.item() == pytest.approx(exact, rel=4 * float(np.finfo(dtype).eps))
    else:  # the 1e-12 floor acts: r = ||x|| / 1e-12
        assert r.item() == pytest.approx(big * np.sqrt(1.3125) / 1e-12, rel=1e-12)


def test_reference_edge_cases_raise_clear_errors():
    with pytest.raises(ValueError, match="topk_backward: grad_y must be finite"):
        oracle.topk_backward(np.array([[np.nan, 1.0]]), np.ones((1, 2), bool), np.ones((1, 1)))
    with pytest.raises(ValueError, match="absmean_ternarize: w must not be empty"):
        oracle.absmean_ternarize(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="absmax_quantize: x must have at least one feature"):
        oracle.absmax_quantize(np.zeros((3, 0)))
    h, up, down = np.ones((2, 4)), np.ones((6, 4)), np.ones((4, 6))
    with pytest.raises(ValueError, match=r"gate \(1, 4\)"):
        oracle.ffn_forward(h, up, np.ones((1, 4)), down)  # would broadcast
    with pytest.raises(ValueError, match=r"down \(6, 4\)"):
        oracle.ffn_backward(np.ones((2, 4)), h, up, up, down.T)
