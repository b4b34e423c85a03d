"""The conformance harness: passes independent correct implementations, catches classic bugs."""

import dataclasses

import numpy as np
import pytest

from minisparse.linear import sparse_linear
from minisparse.oracle.harness import OPS, assert_conforms, check, load_function
from minisparse.tensor import Tensor

N = 40  # generated examples per check (the must-run examples come on top)


# ---- independent correct implementations -----------------------------------------------------


def argpartition_mask(x, k):
    """Top-K without a sort: np.argpartition finds the K-th |x|; then the tie fix by hand (keep
    every |x| above it, and the lowest-index entries equal to it until K are kept)."""
    a = np.abs(x)
    kth = np.take_along_axis(a, np.argpartition(-a, k - 1, axis=-1)[..., k - 1:k], axis=-1)
    above, tied = a > kth, a == kth
    room = k - above.sum(axis=-1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=-1) <= room))


def argpartition_topk(x, k):
    return np.where(argpartition_mask(x, k), x, 0)


def argpartition_block_topk(x, n, m):
    return argpartition_topk(x.reshape(*x.shape[:-1], -1, m), n).reshape(x.shape)


def argpartition_sparsify(x, grad_y, *, k, rescale, ste):
    mask = argpartition_mask(x, k)
    y = np.where(mask, x, 0)
    r = np.ones((*x.shape[:-1], 1), x.dtype)
    if rescale == "l2":  # SPEC 1: norms of the row over its max|x| (no overflow, no underflow)
        m = np.abs(x).max(axis=-1, keepdims=True)
        m = np.where(m > 0, m, 1)
        a, b = np.linalg.norm(x / m, axis=-1, keepdims=True), np.linalg.norm(y / m, axis=-1,
                                                                             keepdims=True)
        with np.errstate(over="ignore"):  # the branch np.where does not take may overflow
            r = np.where(m * b < 1e-12, m * a / x.dtype.type(1e-12), a / np.maximum(b, 1e-30))
    return r * y, r * grad_y if ste else np.where(mask, r * grad_y, 0)


def loop_absmax(x):
    """Row by row, with np.round (which also rounds half to even)."""
    rows = x.reshape(-1, x.shape[-1])
    q, s = np.empty(rows.shape, np.int8), np.empty((len(rows), 1), x.dtype)
    for i, row in enumerate(rows):
        s[i] = 127 / np.maximum(np.abs(row).max(), 1e-5)
        q[i] = np.clip(np.round(row * s[i]), -128, 127)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def sum_absmean(w):
    """mean|w| as a sum in the other order, then the SPEC 4 codes."""
    s = 1 / np.maximum(np.abs(w).ravel()[::-1].sum() / w.size, 1e-5)
    return np.clip(np.rint(w * s), -1, 1).astype(np.int8), s


def engine_linear(backend):
    """sparse_linear through the autograd engine: the NumPy ops, or the Numba kernels."""

    def fn(x, w, grad_y, *, k, rescale, bits, ste):
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        y = sparse_linear(xt, wt, k=k, rescale=rescale, bits=bits, ste=ste, backend=backend)
        y.backward(grad_y)
        return y.data, xt.grad, wt.grad

    return fn


@pytest.mark.parametrize("op, fn", [
    ("topk", argpartition_topk),
    ("block_topk", argpartition_block_topk),
    ("sparsify", argpartition_sparsify),
    ("absmax", loop_absmax),
    ("absmean", sum_absmean),
    ("sparse_linear", engine_linear("numpy")),
    ("sparse_linear", engine_linear("numba")),
], ids=["topk", "block_topk", "sparsify", "absmax", "absmean", "linear-numpy", "linear-numba"])
def test_independent_implementations_pass(op, fn):
    report = assert_conforms(op, fn, max_examples=N, seed=0)
    assert report.passed and report.cases_run >= N
    assert str(report).startswith(f"minisparse check {op}: OK")


# ---- classic mistakes, each caught with a readable report ------------------------------------


def keep_ge_kth(x, k):
    """Wrong: keeps every entry >= the K-th magnitude, so more than K on ties."""
    a = np.abs(x)
    return np.where(a >= -np.sort(-a, axis=-1)[..., k - 1:k], x, 0)


def round_half_away(w):
    """Wrong: rounds W * s half away from zero (C's round), not half to even (SPEC 4; at an
    exact half of SPEC 3 a legitimate 127 * (1 / γ) can flip the same way, so absmax cannot
    tell)."""
    s = 1 / np.maximum(np.abs(w).mean(), 1e-5)
    v = w * s
    return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -1, 1).astype(np.int8), s


def per_tensor_scale(x):
    """Wrong: one absmax scale for the whole tensor instead of one per token."""
    s = np.full((*x.shape[:-1], 1), 127 / np.maximum(np.abs(x).max(), 1e-5), x.dtype)
    return np.clip(np.rint(x * s), -128, 127).astype(np.int8), s


def mask_in_ste(x, grad_y, *, k, rescale, ste):
    """Wrong: applies the mask to the gradient even when STE was asked for."""
    return argpartition_sparsify(x, grad_y, k=k, rescale=rescale, ste=False)


@pytest.mark.parametrize("op, fn, words", [
    ("topk", keep_ge_kth, ["output 'y'", "entries differ", "k = "]),
    ("absmean", round_half_away, ["output 't'", "expected 0, got"]),
    ("absmax", per_tensor_scale, ["output 'q'", "[100.", "expected 127, got 1"]),
    ("sparsify", mask_in_ste, ["output 'grad_x'", "ste = True", "expected 1.0, got 0.0"]),
], ids=["ge-kth", "half-away", "per-tensor", "mask-in-ste"])
def test_classic_mistakes_are_caught_with_a_readable_report(op, fn, words):
    report = check(op, fn, max_examples=N, seed=0)
    text = str(report)
    assert not report.passed and text.startswith(f"minisparse check {op}: FAILED")
    for word in ["failing input", "largest error", "at index", "expected =", "got      =", *words]:
        assert word in text, f"{word!r} not in the report:\n{text}"
    with pytest.raises(AssertionError, match="FAILED"):
        assert_conforms(op, fn, max_examples=N, seed=0)


@pytest.mark.parametrize("op, fn", [
    ("topk", keep_ge_kth), ("absmean", round_half_away), ("absmax", per_tensor_scale),
    ("sparsify", mask_in_ste)])
def test_generated_cases_alone_find_the_mistakes(op, fn, monkeypatch):
    # Without the must-run examples, hypothesis' own cases (ties, half steps, per-row
    # magnitudes) still find every mistake, and shrink it to a small input.
    monkeypatch.setitem(OPS, op, dataclasses.replace(OPS[op], examples=()))
    report = check(op, fn, max_examples=200, seed=0)
    assert not report.passed and report.mismatch is not None
    assert max(a.size for a in report.case.values() if isinstance(a, np.ndarray)) <= 12


def test_report_names_crashes_wrong_arity_and_dtype():
    def crash(x, k):
        raise RuntimeError("kernel launch failed")

    assert "fn raised RuntimeError: kernel launch failed" in str(check("topk", crash,
                                                                       max_examples=5))
    report = check("absmax", lambda x: np.zeros(x.shape, np.int8), max_examples=5)
    assert "must return a tuple ('q', 's'), got ndarray" in report.problem
    report = check("topk", lambda x, k: argpartition_topk(x, k).astype(np.float64),
                   max_examples=20)
    assert "has dtype float64, expected float32" in report.problem


def test_python_float_scale_is_accepted():
    def absmean_float_scale(w):
        t, s = sum_absmean(w)
        return t, float(s)

    # a Python float scale is taken in the op's dtype, not failed as a float64 array
    assert check("absmean", absmean_float_scale, max_examples=N).passed


def test_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown op 'top_k'.*'topk'"):
        check("top_k", argpartition_topk)
    with pytest.raises(TypeError, match="callable"):
        check("topk", 3)


def test_load_function(tmp_path, monkeypatch):
    path = tmp_path / "mykernel.py"
    path.write_text("def topk(x, k):\n    return x\n")
    assert load_function(f"{path}:topk").__name__ == "topk"
    monkeypatch.chdir(tmp_path)
    assert load_function("mykernel:topk").__name__ == "topk"
    assert load_function("numpy:linalg.norm") is np.linalg.norm
    for target, words in [("mykernel", "MODULE:FUNCTION"), ("no_such_mod:f", "cannot import"),
                          ("mykernel:nope", "no attribute 'nope'"),
                          (f"{tmp_path}/missing.py:f", "no such file")]:
        with pytest.raises(ValueError, match=words):
            load_function(target)


def test_cli_check(tmp_path, capsys):
    from minisparse.cli import CHECK_OPS, main

    assert CHECK_OPS.split(", ") == list(OPS)  # the --op help names every op
    path = tmp_path / "kernels_under_test.py"
    path.write_text("import numpy as np\n"
                    "def good(x, k):\n"
                    "    a = np.abs(x)\n"
                    "    return np.where(np.argsort(np.argsort(-a, axis=-1, kind='stable'),\n"
                    "                               axis=-1) < k, x, 0)\n"
                    "def bad(x, k):\n"
                    "    a = np.abs(x)\n"
                    "    return np.where(a >= -np.sort(-a, axis=-1)[..., k - 1:k], x, 0)\n")
    assert main(["check", f"{path}:good", "--op", "topk", "--max-examples", "20"]) == 0
    assert "minisparse check topk: OK" in capsys.readouterr().out
    assert main(["check", f"{path}:bad", "--op", "topk", "--max-examples", "20"]) == 1
    assert "largest error" in capsys.readouterr().out
    assert main(["check", f"{path}:good", "--op", "top_k"]) == 1
    assert "minisparse: error: check: unknown op 'top_k'" in capsys.readouterr().err
    assert main(["check", "good", "--op", "topk"]) == 1
    assert "MODULE:FUNCTION" in capsys.readouterr().err
