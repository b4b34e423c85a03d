"""The engine: gradients vs central differences, accumulation, deep graphs, no_grad, dtypes,
and errors that name the op, the argument and the shapes."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minisparse.tensor import Tensor, no_grad, unbroadcast
from tests.gradcheck import gradcheck
from tests.strategies import axes, broadcastable_arrays, matmul_arrays, random_arrays, shapes

# ---- unbroadcast ------------------------------------------------------------------------------


@given(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=4), st.data())
def test_unbroadcast_sums_every_broadcast_copy(bs, data):
    shape, out_shape = bs.input_shapes[0], bs.result_shape
    g = data.draw(random_arrays(out_shape))
    # Reference: each element of `shape` receives the sum of g over the positions it fed.
    source = np.broadcast_to(np.arange(int(np.prod(shape))).reshape(shape), out_shape)
    expected = np.bincount(source.ravel(), weights=g.ravel(),
                           minlength=int(np.prod(shape))).reshape(shape)
    np.testing.assert_allclose(unbroadcast(g, shape), expected, rtol=1e-12, atol=1e-12)


# ---- gradients of every op (float64, central differences) ---------------------------------------


@pytest.mark.parametrize("op", [
    lambda a, b: a + b,
    lambda a, b: a - b,
    lambda a, b: a * b,
    lambda a, b: a / (b * b + 1),  # denominator kept away from 0
    lambda a, b: (a * 2 - 1.5) * (3 - b) / 4 + (-a),  # scalars on either side, neg
])
@given(arrays=broadcastable_arrays())
def test_binary_grad_with_broadcasting(op, arrays):
    gradcheck(op, *arrays)


@given(random_arrays((2, 3), 0.5, 2.0), st.sampled_from([2, 3, 0.5, -1.5]))
def test_pow_grad(x, p):
    gradcheck(lambda a: a**p, x)


@given(matmul_arrays())
def test_matmul_grad_batched_and_broadcast(ab):
    gradcheck(lambda a, b: a @ b, *ab)


@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_matmul_grad_against_transposed_weight(batch, t, data):
    x = data.draw(random_arrays((batch, t, 4)))
    w = data.draw(random_arrays((5, 4)))
    gradcheck(lambda x, w: x @ w.T, x, w)  # the nn.Linear layout: Y = X @ W.T


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@given(data=st.data())
def test_reduction_grad(reduce, data):
    shape = data.draw(shapes(max_dims=3))
    axis = data.draw(axes(len(shape)))
    keepdims = data.draw(st.booleans())
    x = data.draw(random_arrays(shape))
    gradcheck(lambda a: getattr(a, reduce)(axis=axis, keepdims=keepdims), x)


def test_max_splits_gradient_among_ties():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 0.5, 0.5], [1, 0, 0]])


@given(shapes(min_dims=1, max_dims=4), st.data())
def test_reshape_and_permute_grad(shape, data):
    x = data.draw(random_arrays(shape))
    perm = data.draw(st.permutations(range(len(shape))))
    gradcheck(lambda a: a.permute(*perm).reshape(-1), x)
    gradcheck(lambda a: a.T.reshape(1, *reversed(shape)), x)


def test_transpose_swaps_two_axes_like_torch():
    x = Tensor(np.arange(24.0).reshape(2, 3, 4))
    assert x.transpose(-1, -2).shape == (2, 4, 3)
    assert x.transpose(2, 0, 1).shape == (4, 2, 3)  # a full permutation, as numpy
    assert x.transpose().shape == x.T.shape == (4, 3, 2)
    np.testing.assert_array_equal(x.transpose(0, 2).data, x.data.swapaxes(0, 2))
    gradcheck(lambda a: a.transpose(1, 2) * np.arange(12.0).reshape(4, 3), x.data)


@given(random_arrays((4, 5)))
def test_getitem_basic_slicing_grad(x):
    gradcheck(lambda a: a[1:3, ::2], x)
    gradcheck(lambda a: a[-1], x)
    gradcheck(lambda a: a[None, ..., 2:], x)


@given(random_arrays((5, 3)), st.lists(st.integers(-5, 4), min_size=1, max_size=8))
def test_getitem_gather_grad_adds_repeated_rows(x, rows):
    idx = np.array(rows)
    gradcheck(lambda a: a[idx], x)
    gradcheck(lambda a: a[idx.reshape(-1, 1), np.array([0, 2])], x)
    t = Tensor(x, requires_grad=True)
    t[idx].sum().backward()
    counts = np.bincount(idx % 5, minlength=5)
    np.testing.assert_array_equal(t.grad, np.repeat(counts[:, None], 3, axis=1))


def test_unbroadcast_rejects_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"unbroadcast: grad of shape \(2, 3\) is not a "
                                         r"broadcast of \(2,\)"):
        unbroadcast(np.ones((2, 3)), (2,))


def test_from_op_custom_op_contract():
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    # A float64, broadcast-shaped grad is summed and cast by the engine.
    y = Tensor.from_op(x.data * 2, (x,), lambda g: (np.ones((4, 2, 3)),), "custom")
    y.sum().backward()
    assert x.grad.dtype == np.float32 and (x.grad == 4).all()
    assert Tensor.from_op(x.data, (Tensor(x.data),), None, "const").requires_grad is False
    bad_shape = Tensor.from_op(x.data, (x,), lambda g: (np.ones(4),), "bad_shape")
    with pytest.raises(ValueError, match=r"backward of bad_shape: unbroadcast: grad of shape "
                                         r"\(4,\) is not a broadcast of \(2, 3\)"):
        bad_shape.sum().backward()
    bad_count = Tensor.from_op(x.data, (x,), lambda g: (g, g), "bad_count")
    with pytest.raises(ValueError, match=r"backward of bad_count: returned 2 grads for 1 parents"):
        bad_count.sum().backward()


# ---- accumulation, graph shape, no_grad ----------------------------------------------------------


def test_tensor_used_twice_accumulates():
    x = Tensor(np.array([1.0, -2.0, 3.0]), requires_grad=True)
    (x * x + x).sum().backward()  # d/dx = 2x + 1, through three uses of x
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    y = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (y + y).sum().backward()
    np.testing.assert_array_equal(y.grad, [2.0, 2.0])


def test_backward_twice_accumulates_and_zero_grad_resets():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    loss = (x * 3).sum()
    loss.backward()
    first = x.grad
    loss.backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])
    np.testing.assert_array_equal(first, [3.0, 3.0])  # the earlier array is not mutated
    x.zero_grad()
    assert x.grad is None
    loss.backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


def test_deep_graph_does_not_hit_recursion_limit():
    x = Tensor(np.array([1.0]), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001**5000])


def test_no_grad_builds_no_graph():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = (x * 2).sum()
    assert not y.requires_grad and y._parents == ()
    with pytest.raises(RuntimeError, match="backward: tensor does not require grad"):
        y.backward()
    assert (x * 2).requires_grad  # grad mode is restored on exit


def test_constants_do_not_get_grads():
    x = Tensor(np.ones(3), requires_grad=True)
    c = Tensor(np.full(3, 2.0))
    (x * c).sum().backward()
    assert c.grad is None and not (c * c).requires_grad


def test_backward_with_explicit_grad():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x).backward(np.array([1.0, 10.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 40.0])


def test_ndarray_on_the_left_defers_to_tensor():
    x = Tensor(np.ones(2, np.float32), requires_grad=True)
    y = np.array([1.0, 2.0]) * x
    assert isinstance(y, Tensor) and y.requires_grad and y.dtype == np.float32


# ---- dtypes ----------------------------------------------------------------------------------


def test_default_dtype_is_float32_and_float64_is_kept():
    assert Tensor([1, 2]).dtype == np.float32
    assert Tensor(2.5).dtype == np.float32
    assert Tensor(np.ones(2)).dtype == np.float64
    assert Tensor(np.ones(2, np.float16)).dtype == np.float32
    assert Tensor(np.arange(3)).dtype.kind == "i"  # int index data stays int


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ops_keep_the_dtype(dtype):
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 4)).astype(dtype), requires_grad=True)
    w = Tensor(rng.standard_normal((5, 4)).astype(dtype), requires_grad=True)
    y = (x @ w.T) * 0.5 + np.ones(5) - 1 / (x.mean(axis=-1, keepdims=True) ** 2 + 1.0)
    y = y.max(axis=0).reshape(-1)[np.array([0, 1, 1])] + np.arange(3)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype


# ---- errors name the op, the argument and the shapes ---------------------------------------------


def test_error_messages():
    a = Tensor(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"add: cannot broadcast a \(2, 3\) with b \(4,\)"):
        a + np.ones(4)
    with pytest.raises(ValueError, match=r"mul: cannot broadcast a \(2, 3\) with b \(2,\)"):
        a * Tensor(np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"sub: dtype mismatch, a is float32 \(2, 3\) and b is "
                                        r"float64"):
        a - Tensor(np.ones(3))
    with pytest.raises(ValueError, match=r"matmul: a \(2, 3\) has 3 columns but b \(2, 3\) has 2"):
        a @ a
    with pytest.raises(ValueError, match=r"matmul: both operands need ndim >= 2.*\(3,\)"):
        a @ Tensor(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"matmul: batch dims of a \(2, 2, 3\) and b \(3, 3, 1\)"):
        Tensor(np.ones((2, 2, 3))) @ Tensor(np.ones((3, 3, 1)))
    with pytest.raises(ValueError, match=r"sum: axis 2 is out of range for shape \(2, 3\)"):
        a.sum(axis=2)
    with pytest.raises(TypeError, match=r"mean: axis must be an int.*1.5.*\(2, 3\)"):
        a.mean(axis=1.5)
    with pytest.raises(ValueError, match=r"max: repeated axis"):
        a.max(axis=(1, -1))
    with pytest.raises(ValueError, match=r"reshape: cannot reshape tensor of shape \(2, 3\) "
                                         r"\(size 6\) into \(4,\)"):
        a.reshape(4)
    with pytest.raises(ValueError, match=r"permute: axes \(0, 0\) are not a permutation.*\(2, 3\)"):
        a.permute(0, 0)
    with pytest.raises(ValueError, match=r"transpose: axes \(0, 0, 1\) are not a permutation of "
                                         r"the 3 axes of shape \(2, 3, 4\)"):
        Tensor(np.ones((2, 3, 4))).transpose(0, 0, 1)
    with pytest.raises(TypeError, match=r"getitem: index arrays must be integer or bool, got "
                                        r"float64 \(2,\) \(tensor shape \(2, 3\)\)"):
        a[np.array([0.0, 1.0])]
    with pytest.raises(IndexError, match=r"getitem: .*\(tensor shape \(2, 3\)\)"):
        a[np.array([5])]
    with pytest.raises(TypeError, match=r"pow: exponent must be a Python scalar, got Tensor"):
        a ** Tensor(2.0)
    with pytest.raises(TypeError, match=r"Tensor: requires_grad needs a float dtype, got int"):
        Tensor(np.arange(3), requires_grad=True)
    x = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match=r"backward: grad must be given.*\(3,\)"):
        (x * 2).backward()
    with pytest.raises(ValueError, match=r"backward: grad shape \(2,\) does not match output "
                                         r"shape \(3,\)"):
        (x * 2).backward(np.ones(2))
