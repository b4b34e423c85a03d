"""The one gradient checker: engine gradients vs central finite differences, in float64."""

from __future__ import annotations

import numpy as np

from minisparse.tensor import Tensor


def numerical_grad(f, x, eps=1e-6):
    """Central-difference gradient of the scalar function ``f(ndarray) -> float`` at ``x``."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + eps
        up = f(x)
        x[i] = orig - eps
        down = f(x)
        x[i] = orig
        grad[i] = (up - down) / (2 * eps)
    return grad


def gradcheck(fn, *inputs, seed=0, eps=1e-6, rtol=1e-5, atol=1e-6):
    """Assert that the engine's gradient of ``fn(*Tensors) -> Tensor`` matches central
    differences for every input (float64 arrays). The output is reduced with a random
    cotangent ``w`` (L = sum(w * fn(...))) so every output element is checked, not just a sum."""
    inputs = [np.asarray(x, dtype=np.float64) for x in inputs]
    tensors = [Tensor(x, requires_grad=True) for x in inputs]
    out = fn(*tensors)
    assert out.dtype == np.float64, f"float64 inputs gave a {out.dtype} output"
    w = np.random.default_rng(seed).standard_normal(out.shape)
    (out * w).sum().backward()
    for k, t in enumerate(tensors):

        def loss(xk, k=k):
            args = [Tensor(x) for x in inputs]
            args[k] = Tensor(xk)
            return float((fn(*args).data * w).sum())

        expected = numerical_grad(loss, inputs[k], eps)
        got = np.zeros_like(inputs[k]) if t.grad is None else t.grad
        assert got.shape == inputs[k].shape, f"input {k}: grad shape {got.shape}"
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {k} {inputs[k].shape}")
