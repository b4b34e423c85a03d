"""The fused causal attention (kernels/attention.py) against the reference composition of
``model.Attention`` (reshape, RoPE, scaled scores, causal mask, softmax, P V), forward and
backward, and against finite differences."""

import math

import numba
import numpy as np
import pytest
from gradcheck import gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st

from minisparse.functions import masked_fill, softmax
from minisparse.kernels.attention import causal_attention
from minisparse.model import GPT, GPTConfig, rope, rope_tables
from minisparse.tensor import Tensor


def reference(q, k, v, cos, sin, n_heads):
    """model.Attention's composition of engine ops, positions 0..T-1."""
    B, T, d = q.shape
    dh = d // n_heads
    q, k, v = (t.reshape(B, T, n_heads, dh).transpose(1, 2) for t in (q, k, v))
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    att = softmax(masked_fill((q * (1.0 / math.sqrt(dh))) @ k.transpose(-1, -2), future,
                              -np.inf), axis=-1)
    return (att @ v).transpose(1, 2).reshape(B, T, d)


def tables(t, h, dh, dtype):
    """RoPE's cos, sin [t, dh] for h heads of dh columns, positions 0..t-1."""
    config = GPTConfig(vocab_size=5, d_model=h * dh, n_layers=1, n_heads=h, context=t,
                       ffn_hidden=16)
    return rope_tables(config, np.arange(t), dtype)


@st.composite
def problems(draw, scales=(0.1, 1.0, 8.0)):
    """q, k, v [B, T, d], cos, sin [T, dh], n_heads, cotangent: T and dh not multiples of 8;
    scale 8 makes peaked softmax rows."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b, t, h = draw(st.integers(1, 3)), draw(st.integers(1, 19)), draw(st.integers(1, 3))
    dh = 2 * draw(st.integers(1, 9))
    cos, sin = tables(t, h, dh, np.float64)
    scale = draw(st.sampled_from(scales))
    q, k, v, g = (rng.standard_normal((b, t, h * dh)) * scale for _ in range(4))
    return q, k, v, cos, sin, h, g


def outputs(op, q, k, v, cos, sin, n_heads, g):
    """(O, dq, dk, dv) of ``op`` with cotangent g."""
    ts = [Tensor(a.copy(), requires_grad=True) for a in (q, k, v)]
    out = op(*ts, cos, sin, n_heads)
    out.backward(g)
    return [out.data] + [t.grad for t in ts]


@settings(max_examples=60)
@given(problems())
def test_fused_attention_equals_the_reference_composition(case):
    fused, ref = outputs(causal_attention, *case), outputs(reference, *case)
    for a, b, name in zip(fused, ref, ("out", "dq", "dk", "dv"), strict=True):
        assert a.dtype == np.float64
        # absolute error in units of the array's largest entry: peaked rows cancel in dP - rowsum
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * (np.abs(b).max() + 1),
                                   err_msg=name)


@settings(max_examples=20)
@given(problems(scales=(0.1, 1.0)))  # peaked rows cancel (dP - rowsum) below float32's grain
def test_fused_attention_in_float32_stays_within_float32_rounding(case):
    *arrays, h, g = case
    arrays = [a.astype(np.float32) for a in arrays]
    fused = outputs(causal_attention, *arrays, h, g.astype(np.float32))
    exact = outputs(reference, *(a.astype(np.float64) for a in arrays), h, g)
    for a, b, name in zip(fused, exact, ("out", "dq", "dk", "dv"), strict=True):
        assert a.dtype == np.float32
        scale = np.abs(b).max() + 1
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_fused_attention_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    b, t, h, dh = 2, 5, 2, 4
    cos, sin = tables(t, h, dh, np.float64)
    q, k, v = (rng.standard_normal((b, t, h * dh)) for _ in range(3))
    gradcheck(lambda q, k, v: causal_attention(q, k, v, cos, sin, h), q, k, v)


def test_fused_attention_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(0)
    b, t, h, dh = 3, 13, 4, 6
    cos, sin = tables(t, h, dh, np.float32)
    case = [rng.standard_normal((b, t, h * dh)).astype(np.float32) for _ in range(4)]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = outputs(causal_attention, *case[:3], cos, sin, h, case[3])
        numba.set_num_threads(before)
        many = outputs(causal_attention, *case[:3], cos, sin, h, case[3])
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fused_attention_names_mismatched_shapes():
    x = Tensor(np.zeros((1, 4, 8)))
    cos = np.ones((4, 4))
    with pytest.raises(ValueError, match=r"causal_attention: q, k, v must be \[B, T, d\]"):
        causal_attention(x, Tensor(np.zeros((1, 3, 8))), x, cos, cos, 2)
    with pytest.raises(ValueError, match=r"cos, sin \[T, d / n_heads\] = \(4, 4\)"):
        causal_attention(x, x, x, np.ones((4, 2)), cos, 2)


def test_numba_model_trains_through_the_fused_attention_like_the_reference():
    config = dict(vocab_size=11, d_model=16, n_layers=2, n_heads=2, context=9, sparsity=0.5)
    idx = np.random.default_rng(1).integers(0, 11, (3, 9))
    losses, grads = [], []
    for backend in ("numpy", "numba"):
        model = GPT(config, np.random.default_rng(0), dtype=np.float64, backend=backend)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(float(loss.data))
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name], g, rtol=1e-8, atol=1e-12, err_msg=name)
