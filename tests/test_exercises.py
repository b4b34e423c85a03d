"""The lessons' exercise graders: every solution in lessons/solutions passes, and the classic wrong
answers fail with a message that names the case and the rule a beginner broke."""

import math

import numpy as np
import pytest
from numba import njit

from lessons.solutions import lesson1, lesson2, lesson3, lesson5, lesson8
from minisparse.exercises import EXERCISES, grade
from minisparse.tensor import Tensor

SOLUTIONS = {"tanh": lesson1.tanh, "topk": lesson2.topk, "ste_backward": lesson2.ste_backward,
             "absmax": lesson3.absmax, "absmean": lesson3.absmean,
             "sparse_gemv": lesson5.sparse_gemv, "threshold_mask": lesson8.threshold_mask,
             "calibrate_threshold": lesson8.calibrate_threshold}


def _bitlinear_solution():
    pytest.importorskip("torch", reason="the BitLinear exercise needs PyTorch")
    from lessons.solutions import lesson7

    return lesson7


def test_every_exercise_has_a_solution():
    assert set(EXERCISES) == {*SOLUTIONS, "bitlinear"}


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_solution_passes(name, capsys):
    assert grade(name, SOLUTIONS[name], max_examples=100) is True
    out = capsys.readouterr().out
    assert "✗" not in out and f"✓ {name}: all" in out, out


def test_bitlinear_solution_passes(capsys):
    assert grade("bitlinear", _bitlinear_solution().bitlinear) is True
    assert "✓ bitlinear: all 4 hand-picked cases pass" in capsys.readouterr().out


def test_unfinished_stub_is_reported_not_raised(capsys):
    def stub(x, k):
        raise NotImplementedError

    assert grade("topk", stub) is False
    assert "not implemented yet" in capsys.readouterr().out


def test_unknown_exercise_and_non_function_are_clear_errors():
    with pytest.raises(ValueError, match="unknown exercise 'top_k'.*topk"):
        grade("top_k", lesson2.topk)
    with pytest.raises(TypeError, match="fn must be a function"):
        grade("topk", 3)


# ---- wrong answers: (exercise, function, words the message must contain) ------------------------


def topk_threshold(x, k):  # keeps every entry tied with the k-th magnitude
    kth = -np.sort(-np.abs(x), axis=-1)[..., k - 1 : k]
    return x * (np.abs(x) >= kth)


def topk_float32_ranks(x, k):  # ranks in float32: right on the lesson's rows, wrong on float64
    return lesson2.topk(x, k) if x.dtype == np.float32 else x * (lesson2.topk(
        x.astype(np.float32), k) != 0)


def ste_always_masked(grad_y, mask, r, ste):
    return grad_y * r * mask


def ste_forgets_r(grad_y, mask, r, ste):
    return grad_y if ste else grad_y * mask


def absmax_half_away(x):  # round half away from zero (C's round, school rounding)
    q, s = lesson3.absmax(x)
    v = x * s
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8), s


def absmax_one_scale(x):  # one scale for the whole tensor instead of one per row
    s = 127 / np.maximum(np.abs(x).max(), 1e-5) * np.ones((*x.shape[:-1], 1), x.dtype)
    return np.rint(x * s).astype(np.int8), s


def absmean_max_scale(w):  # scale from max|W| (absmax) instead of mean|W|
    s = 1 / np.maximum(np.abs(w).max(), 1e-5)
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def absmean_per_row(w):
    s = 1 / np.maximum(np.abs(w).mean(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


@njit
def gemv_forgets_last_row(x, idx, wt):
    y = np.zeros(wt.shape[1], wt.dtype)
    for p in range(idx.shape[0] - 1):
        y += x[idx[p]] * wt[idx[p]]
    return y


@njit
def gemv_dense_masked(x, idx, wt):  # right numbers, but reads every row of W
    m = np.zeros_like(x)
    m[idx] = 1
    return (x * m) @ wt


def gemv_plain_python(x, idx, wt):
    return wt[idx].T @ x[idx]


def tanh_forgets_g(x):
    y = np.tanh(x.data)
    return Tensor.from_op(y, (x,), lambda g: (1 - y * y,), "tanh")


def tanh_uses_x(x):
    y = np.tanh(x.data)
    return Tensor.from_op(y, (x,), lambda g: (g * (1 - x.data ** 2),), "tanh")


def tanh_plain_numpy(x):
    return Tensor(np.tanh(x.data))


def mask_not_strict(x, tau):
    return np.abs(x) >= tau


def mask_of_values(x, tau):  # the sparsified x instead of the mask
    return x * (np.abs(x) > tau)


def calibrate_ceil(values, sparsity):
    a = np.sort(np.abs(values))
    j = math.ceil(sparsity * a.size)
    return 0.0 if j == 0 else float(a[j - 1])


def calibrate_zero_indexed(values, sparsity):  # a[j]: the (j+1)-th smallest
    a = np.sort(np.abs(values))
    return float(a[math.floor(sparsity * a.size)])


def calibrate_forgets_j0(values, sparsity):
    a = np.sort(np.abs(values))
    return float(a[math.floor(sparsity * a.size) - 1])


def calibrate_signed(values, sparsity):  # sorts the values, not their magnitudes
    a = np.sort(values)
    j = math.floor(sparsity * a.size)
    return 0.0 if j == 0 else float(a[j - 1])


def calibrate_epsilon(values, sparsity):  # "fixes" float64 rounding in S * n
    a = np.sort(np.abs(values))
    j = math.floor(sparsity * a.size + 1e-9)
    return 0.0 if j == 0 else float(a[j - 1])


WRONG = [
    ("topk", topk_threshold, ["a tie at the k-th magnitude", "lower index wins", "expected",
                              "you returned", "x = float32 (6,)"]),
    ("topk", topk_float32_ranks, ["conformance harness", "failing input", "float64"]),
    ("ste_backward", ste_always_masked, ["straight-through estimator", "whole gradient passes"]),
    ("ste_backward", ste_forgets_r, ["l2 rescale factor", "same r"]),
    ("absmax", absmax_half_away, ["exactly on .5", "half to even", "codes differs"]),
    ("absmax", absmax_one_scale, ["one scale per row", "keepdims"]),
    ("absmean", absmean_max_scale, ["codes differs", "s = 1 / max(mean|w|, 1e-5)"]),
    ("absmean", absmean_per_row, ["over the whole matrix", "mean|w| = 0.5"]),
    ("sparse_gemv", gemv_forgets_last_row, ["a typical product", "stop one short"]),
    ("sparse_gemv", gemv_dense_masked, ["reads only the kept rows", "NaN"]),
    ("sparse_gemv", gemv_plain_python, ["@numba.njit"]),
    ("tanh", tanh_forgets_g, ["random weights c", "x.grad differs", "upstream gradient"]),
    ("tanh", tanh_uses_x, ["one number", "1 - tanh(x)²"]),
    ("tanh", tanh_plain_numpy, ["does not require grad", "Tensor.from_op"]),
    ("threshold_mask", mask_not_strict, ["entries equal to tau", "use >, not >=", "expected"]),
    ("threshold_mask", mask_of_values, ["mask has dtype float32, expected bool"]),
    ("calibrate_threshold", calibrate_ceil, ["not an integer", "not up (ceil)"]),
    ("calibrate_threshold", calibrate_zero_indexed, ["ten values", "a[j - 1], not a[j]"]),
    ("calibrate_threshold", calibrate_forgets_j0, ["j = 0", "a[-1], the largest"]),
    ("calibrate_threshold", calibrate_signed, ["count by magnitude", "sort |values|"]),
    ("calibrate_threshold", calibrate_epsilon, ["exactly as written", "28.999999999999996"]),
]


@pytest.mark.parametrize("name, fn, words", WRONG, ids=[w[1].__name__ for w in WRONG])
def test_wrong_answer_gets_a_useful_message(name, fn, words, capsys):
    assert grade(name, fn, max_examples=100) is False
    out = capsys.readouterr().out
    assert f"✗ {name}" in out, out
    for word in words:
        assert word in out, f"{word!r} missing from:\n{out}"


def test_bitlinear_wrong_answers_name_the_rule(capsys):
    lesson7 = _bitlinear_solution()
    import torch

    def masked_gradient(x, w, k):  # top-K's true gradient instead of the straight-through one
        y = lesson7.bitlinear(x, w, None)
        if k is None:
            return y
        a = lesson7.bitlinear(x, torch.eye(x.shape[-1], dtype=x.dtype), None).detach()
        keep = lesson7.bitlinear(a, torch.eye(x.shape[-1], dtype=x.dtype), k) != 0
        return lesson7.bitlinear(x * keep, w, None)

    def floor_rounding(x, w, k):
        s = 127 / x.detach().abs().amax(dim=-1, keepdim=True)
        xq = x + (torch.floor(x * s + 0.5) / s - x).detach()
        return lesson7.bitlinear(xq, w, k)

    assert grade("bitlinear", masked_gradient) is False
    out = capsys.readouterr().out
    assert "a typical layer" in out and "x.grad differs" in out and "straight-through" in out, out
    assert grade("bitlinear", floor_rounding) is False
    out = capsys.readouterr().out
    assert "exactly on .5" in out and "half to even" in out, out
