"""Graders for the lessons' exercises: ``grade(name, fn)`` -> True if ``fn`` does what was taught.

A grader first runs a few hand-picked cases, each named and tied to the SPEC rule it tests, and
for the first wrong one prints the input, what was expected, what ``fn`` returned and a hint
naming the rule. If they all pass and the conformance harness covers the op,
``oracle.harness.check`` then searches hundreds of generated cases (ties, half steps, tiny and
huge rows, float32 and float64). A stub that raises NotImplementedError is reported as "not
implemented yet", never raised: a lesson runs top to bottom before the learner's answer exists.

  name          lesson  fn                                      checked against
  tanh          1       fn(x: Tensor) -> Tensor, an autograd op  np.tanh; central differences
  topk          2       fn(x, k) -> y = x ⊙ Topk(|x|)            topk_forward; harness "topk"
  ste_backward  2       fn(grad_y, mask, r, ste) -> grad_x       topk_backward; harness "sparsify"
  absmax        3       fn(x) -> (q int8, s [..., 1])            absmax_quantize; harness "absmax"
  absmean       3       fn(w) -> (t int8, s scalar)              absmean_ternarize; "absmean"
  sparse_gemv   5       fn(x, idx, wt) -> y, a Numba kernel      W[:, idx] @ x[idx], float64
  bitlinear     7       fn(x, w, k) -> y, torch tensors          oracle sparse_linear_*, bits=1.58
  threshold_mask 8      fn(x, tau) -> bool mask |x| > tau       threshold_mask (SPEC §11)
  calibrate_threshold 8 fn(values, sparsity) -> tau             calibrate_threshold (SPEC §11)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from .oracle import sparse_linear_backward, sparse_linear_forward
from .quant import absmax_quantize, absmean_ternarize
from .sparsity import calibrate_threshold, threshold_mask, topk_backward, topk_forward
from .tensor import Tensor


@dataclass(frozen=True)
class Case:
    """One hand-picked input: what it is, the arguments (by name, passed in order), the rule."""

    title: str
    args: dict
    hint: str


@dataclass(frozen=True)
class Exercise:
    """``run(fn, case) -> {output: array}`` calls the learner's function; ``reference(case)`` gives
    the same names; ``exact`` outputs must match bit for bit, the others to float rounding."""

    outputs: tuple
    run: object
    reference: object
    cases: tuple
    rules: dict  # output name -> the formula it must follow (printed with a failure)
    exact: tuple = ()
    harness: tuple | None = None  # (op, adapter: fn -> function in the harness' convention)
    needs: str = ""  # a module the exercise cannot run without (printed as a skip)
    extra_check: object = None  # fn -> message if fn is not the kind of function asked for
    rtol: float | None = None  # for non-exact outputs; None: float rounding of a few ulps


def _line(label, a):
    """label + the value, an array's later lines aligned under its first."""
    if not isinstance(a, np.ndarray):
        return f"{label}{a!r}"
    head = f"{label}{a.dtype} {a.shape} "
    body = np.array2string(a, precision=6, threshold=40, max_line_width=100 - len(head))
    return head + body.replace("\n", "\n" + " " * len(head))


def _differs(name, got, expected, exact, rtol):
    """None if ``got`` matches ``expected``, else what is wrong, in words."""
    if got is None:
        return f"{name} is None"
    got = np.asarray(got)
    if got.shape != expected.shape:
        return f"{name} has shape {got.shape}, expected {expected.shape}"
    if exact and got.dtype != expected.dtype:
        return f"{name} has dtype {got.dtype}, expected {expected.dtype}"
    if exact:
        return None if np.array_equal(got, expected) else f"{name} differs"
    if got.dtype.kind != "f":
        return f"{name} has dtype {got.dtype}, expected a float array"
    if rtol is None:  # a few ulps: sums in another order round differently
        rtol = 64 * np.finfo(np.float32 if expected.dtype == np.float32 else np.float64).eps
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    close = np.allclose(got, expected, rtol=rtol, atol=rtol * scale)
    return None if close else f"{name} differs (beyond float rounding)"


def _failure(name, case, problem, got, expected, rule):
    lines = [f"✗ {name}: {case.title}", "    input:"]
    lines += [_line(f"      {k} = ", v) for k, v in case.args.items()]
    lines.append(f"    {problem}")
    if expected is not None:
        lines.append(_line("      expected      ", expected))
        lines.append(_line("      you returned  ", got))
    lines.append(f"    hint: {case.hint}")
    if rule:
        lines.append(f"    rule: {rule}")
    return "\n".join(lines)


def _grade_case(ex, name, fn, case):
    """None if fn gets the case right, else the printed explanation."""
    try:
        got = ex.run(fn, case)
    except NotImplementedError:  # the learner's stub: ``grade`` reports it as unfinished
        raise
    except Exception as e:  # a crash on valid input is a wrong answer, explained like one
        return _failure(name, case, f"your function raised {type(e).__name__}: {e}", None, None,
                        "")
    expected = ex.reference(case)
    for out in ex.outputs:
        problem = _differs(out, got.get(out), expected[out], out in ex.exact, ex.rtol)
        if problem:
            return _failure(name, case, problem, got.get(out), expected[out], ex.rules.get(out))
    return None


def grade(name, fn, *, max_examples=200) -> bool:
    """Grade the learner's ``fn`` for exercise ``name`` (see the module docstring) and print the
    verdict; True if every hand-picked case and the harness' generated cases agree.
    ``max_examples``: how many cases the harness generates (fewer: faster, less thorough)."""
    if name not in EXERCISES:
        raise ValueError(f"grade: unknown exercise {name!r}; choose one of {sorted(EXERCISES)}")
    if not callable(fn):
        raise TypeError(f"grade: fn must be a function, got {type(fn).__name__}")
    ex = EXERCISES[name]
    if ex.needs and importlib.util.find_spec(ex.needs) is None:
        print(f"- {name}: skipped, {ex.needs} is not installed (pip install {ex.needs})")
        return False
    for case in ex.cases:
        try:
            failure = _grade_case(ex, name, fn, case)
        except NotImplementedError:
            print(f"… {name}: not implemented yet — fill in the function above and run this "
                  f"cell again.")
            return False
        if failure:
            print(failure)
            return False
    if ex.extra_check is not None and (problem := ex.extra_check(fn)):
        print(f"✗ {name}: {problem}")
        return False
    print(f"✓ {name}: all {len(ex.cases)} hand-picked cases pass")
    if ex.harness is None:
        return True
    from .oracle import harness  # loads hypothesis: only when a grader needs it

    op, adapter = ex.harness
    report = harness.check(op, adapter(fn), max_examples=max_examples)
    if not report.passed:
        print(f"✗ {name}: the conformance harness found a failing case\n{report}")
        print("    rules: " + "\n           ".join(f"{k}: {v}" for k, v in ex.rules.items()))
        return False
    print(f"✓ {name}: {report}")
    return True


def _f32(rows):
    return np.array(rows, np.float32)


# ---- lesson 1: an autograd op -------------------------------------------------------------------


def _central_difference(f, x, h=1e-6):
    """d f / d x_i for every i, by (f(x + h e_i) - f(x - h e_i)) / 2h (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        g[i] = (f(up) - f(down)) / (2 * h)
    return g


def _run_tanh(fn, case):
    x, c = case.args["x"], case.args["weights"]
    xt = Tensor(x.copy(), requires_grad=True)
    y = fn(xt)
    if not isinstance(y, Tensor):
        raise TypeError(f"fn must return a Tensor (from Tensor.from_op), got {type(y).__name__}")
    if not y.requires_grad:
        raise TypeError("the result does not require grad: build it with Tensor.from_op(data, "
                        "(x,), backward, 'tanh') so that backward() can reach x")
    (y * Tensor(c)).sum().backward()
    return {"y": y.data, "x.grad": xt.grad}


def _ref_tanh(case):
    # The yardstick of lesson 1: central differences of L = Σ c ⊙ tanh(x), in float64.
    x, c = case.args["x"], case.args["weights"]
    return {"y": np.tanh(x), "x.grad": _central_difference(lambda a: (np.tanh(a) * c).sum(), x)}


_rng = np.random.default_rng(16)
TANH = Exercise(
    outputs=("y", "x.grad"), run=_run_tanh, reference=_ref_tanh,
    rules={"y": "y = tanh(x), elementwise (np.tanh)",
           "x.grad": "the backward gets g = ∂L/∂y and returns (g * (1 - y²),): the chain rule"},
    cases=(
        Case("one number, L = tanh(x)", {"x": np.array(0.5), "weights": np.array(1.0)},
             "d tanh(x)/dx = 1 - tanh(x)², so at x = 0.5 the gradient is 1 - 0.4621² = 0.7864"),
        Case("a matrix, L = Σ c ⊙ tanh(x) with random weights c",
             {"x": _rng.standard_normal((3, 4)), "weights": _rng.standard_normal((3, 4))},
             "the upstream gradient g = c is not all ones here: multiply it in (chain rule)"),
        Case("saturated inputs", {"x": np.array([-30.0, -1.0, 0.0, 1.0, 30.0]),
                                  "weights": np.array([1.0, 2.0, 3.0, 4.0, 5.0])},
             "tanh flattens out far from 0: the gradient there is ~0, and 1 at x = 0"),
    ),
    rtol=1e-6,  # central differences agree with an exact gradient to ~1e-9 (lesson 1)
)


# ---- lesson 2: top-K with the tie rule, and the straight-through backward ----


TOPK = Exercise(
    outputs=("y",), exact=("y",),
    run=lambda fn, c: {"y": fn(c.args["x"].copy(), c.args["k"])},
    reference=lambda c: {"y": topk_forward(c.args["x"], k=c.args["k"])[0]},
    rules={"y": "y = x ⊙ Topk(|x|): keep the k largest |x| of each row (last axis), zero the "
                "rest; ties at the k-th magnitude go to the lower index (SPEC §1)"},
    cases=(
        Case("a typical row", {"x": _f32([0.1, -0.7, 0.4, 0.9, -0.2, 0.3]), "k": 3},
             "keep the 3 entries of largest |x| with their signs, set the others to 0"),
        Case("negative entries count by magnitude", {"x": _f32([0.5, -3, 1, 2]), "k": 2},
             "rank by |x|, not by x: -3 is the largest entry here"),
        Case("a tie at the k-th magnitude", {"x": _f32([3, 1, 1, 1, -1, 0.5]), "k": 3},
             "ties at the k-th magnitude: the lower index wins, so a row keeps exactly k "
             "entries (a `>= threshold` keeps every tied entry; np.argsort(-|x|, "
             "kind='stable') ranks ties by index)"),
        Case("k = 1 on a row of equal magnitudes", {"x": _f32([-2, 2, 2, -2]), "k": 1},
             "all four tie: only the first (index 0) is kept"),
        Case("k = D keeps everything", {"x": _f32([0.0, -1, 2]), "k": 3},
             "with k equal to the row length nothing is dropped: y = x"),
        Case("every row is its own top-K", {"x": _f32([[1, 5, 2], [9, 0, -8]]), "k": 1},
             "select along the last axis, row by row (5 in the first row, 9 in the second)"),
        Case("float64 stays float64", {"x": np.array([0.25, -0.5, 0.125]), "k": 2},
             "return the input's dtype (x * mask keeps it; np.zeros(...) alone is float64)"),
    ),
    harness=("topk", lambda fn: lambda x, k: fn(x, k)),
)


def _sparsify_adapter(fn):
    """The harness' "sparsify" op (forward and backward) with the learner's backward."""
    def sparsify(x, grad_y, k, rescale, ste):
        y, mask, r = topk_forward(x, k=k, rescale=rescale)
        return y, fn(grad_y, mask, r, ste)
    return sparsify


def _ste_case(title, g, mask, r, ste, hint):
    return Case(title, {"grad_y": _f32(g), "mask": np.array(mask, bool), "r": _f32(r),
                        "ste": ste}, hint)


STE_BACKWARD = Exercise(
    outputs=("grad_x",),
    run=lambda fn, c: {"grad_x": fn(**{k: (v.copy() if isinstance(v, np.ndarray) else v)
                                       for k, v in c.args.items()})},
    reference=lambda c: {"grad_x": topk_backward(**c.args)},
    rules={"grad_x": "straight-through (eq. 13): r · g; true gradient (eq. 12, ste=False): "
                     "r · M ⊙ g; r has one factor per row, shape [..., 1]"},
    cases=(
        _ste_case("the straight-through estimator", [1, 2, 3, 4], [1, 0, 1, 0], [1], True,
                  "with ste=True the whole gradient passes, dropped entries too: top-K is "
                  "treated as the identity in the backward"),
        _ste_case("the true (masked) gradient", [1, 2, 3, 4], [1, 0, 1, 0], [1], False,
                  "with ste=False the gradient is the derivative of x ⊙ M: zero where the "
                  "entry was dropped"),
        _ste_case("the l2 rescale factor", [1, -2, 3, 4], [1, 1, 0, 0], [2], True,
                  "the forward is r · (x ⊙ M), so the backward multiplies by the same r"),
        _ste_case("one factor per row", [[1, 1, 1], [1, 1, 1]], [[1, 0, 0], [0, 0, 1]],
                  [[2], [0.5]], False,
                  "r [..., 1] broadcasts along its row: row 0 by 2, row 1 by 0.5"),
    ),
    harness=("sparsify", _sparsify_adapter),
)


# ---- lesson 3: int8 absmax and ternary absmean codes ----


def _codes_and_scale(fn, x):
    q, s = fn(x.copy())
    return {"codes": q, "scale": np.asarray(s)}


ABSMAX = Exercise(
    outputs=("codes", "scale"), exact=("codes",),
    run=lambda fn, c: _codes_and_scale(fn, c.args["x"]),
    reference=lambda c: dict(zip(("codes", "scale"), absmax_quantize(c.args["x"]), strict=True)),
    rules={"codes": "q = rint(x · s) as int8: round half to even (np.rint), clip to "
                    "[-128, 127]; s = 127 / max(max|x|, 1e-5) for each row",
           "scale": "s = 127 / max(max|x|, 1e-5) per row, shape [..., 1] (keepdims), the "
                    "input's dtype (SPEC §3)"},
    cases=(
        Case("a typical row", {"x": _f32([[1.0, -0.3, 0.25, 0.0]])},
             "the largest |x| maps to ±127, the rest in proportion"),
        Case("x · s exactly on .5", {"x": _f32([[127, 2.5, -2.5, 0.5, -0.5, 3.5]])},
             "here s = 1 and half steps round half to even: 2.5 → 2, -2.5 → -2, 0.5 → 0, "
             "3.5 → 4 (np.rint), not away from zero (np.floor(x + 0.5) and friends)"),
        Case("one scale per row (token)", {"x": _f32([[1, 0.3, -0.7], [100, 30, -50]])},
             "max|x| over the last axis only (keepdims=True): each token gets its own scale"),
        Case("an all-zero row", {"x": _f32([[0, 0, 0]])},
             "the 1e-5 floor: s = 127 / max(0, 1e-5) = 1.27e7 and the codes are 0, no "
             "division by zero"),
    ),
    harness=("absmax", lambda fn: fn),
)

ABSMEAN = Exercise(
    outputs=("codes", "scale"), exact=("codes",),
    run=lambda fn, c: _codes_and_scale(fn, c.args["w"]),
    reference=lambda c: dict(zip(("codes", "scale"), absmean_ternarize(c.args["w"]),
                                 strict=True)),
    rules={"codes": "t = clip(rint(w · s), -1, 1) as int8, half to even, with s = 1 / "
                    "max(mean|w|, 1e-5) over the whole matrix",
           "scale": "s = 1 / max(mean|w|, 1e-5): ONE scalar for the whole matrix (SPEC §4)"},
    cases=(
        Case("a typical matrix", {"w": _f32([[0.25, -0.5, 0.25], [0, 0.5, -1.5]])},
             "mean|w| = 0.5, so s = 2: w · s = [0.5, -1, 0.5, 0, 1, -3] → [0, -1, 0, 0, 1, -1] "
             "(0.5 rounds to 0: half to even; -3 clips to -1)"),
        Case("the scale comes from the mean |w|", {"w": _f32([[2, 0.4, -0.4, 0]])},
             "mean|w| = 0.7, s = 1/0.7: 0.4 · s = 0.57 → 1; a scale from max|w| (s = 0.5) "
             "would give 0.2 → 0"),
        Case("one scale for the whole matrix", {"w": _f32([[1, 1], [0.1, 0.1]])},
             "the mean is over every entry (0.55), not per row: the second row's small weights "
             "become 0"),
        Case("an all-zero matrix", {"w": _f32([[0, 0], [0, 0]])},
             "the 1e-5 floor: s = 1 / max(0, 1e-5) = 1e5, codes 0"),
    ),
    harness=("absmean", lambda fn: fn),
)


# ---- lesson 5: a sparse GEMV kernel in Numba ---------------------------------------------------


def _gemv_case(title, d_in, d_out, idx, hint, nan_rows=False, dtype=np.float32):
    rng = np.random.default_rng(d_in * 100 + d_out)
    x = rng.standard_normal(d_in).astype(dtype)
    wt = rng.standard_normal((d_in, d_out)).astype(dtype)
    idx = np.array(idx, np.int64)
    if nan_rows:  # rows of dropped inputs that a kernel must never read
        wt[np.setdiff1d(np.arange(d_in), idx)] = np.nan
    return Case(title, {"x": x, "idx": idx, "wt": wt}, hint)


def _ref_gemv(c):
    x, idx, wt = c.args["x"], c.args["idx"], c.args["wt"]
    y = wt[idx].astype(np.float64).T @ x[idx].astype(np.float64)  # Σ_p x[idx_p] wt[idx_p, :]
    return {"y": y.astype(wt.dtype)}


def _numba_compiled(fn):
    if not hasattr(fn, "py_func"):  # a numba dispatcher keeps the Python source as .py_func
        return "the answer is right, but it is plain Python: compile it with @numba.njit"
    return None


SPARSE_GEMV = Exercise(
    outputs=("y",),
    run=lambda fn, c: {"y": fn(*(v.copy() for v in c.args.values()))},
    reference=_ref_gemv,
    rules={"y": "y[o] = Σ_p x[idx[p]] · wt[idx[p], o]: loop over the kept inputs idx only, each "
                "adding one contiguous row of wt = W.T; return wt's dtype"},
    cases=(
        _gemv_case("a typical product", 8, 5, [1, 4, 6],
                   "every kept input i contributes x[i] · wt[i, :] — all K of them (does your "
                   "loop stop one short?)"),
        _gemv_case("reads only the kept rows", 8, 5, [0, 3, 7],
                   "the rows of the dropped inputs hold NaN here: a kernel that multiplies the "
                   "whole matrix (even by a zero) returns NaN — read wt[idx[p]] only",
                   nan_rows=True),
        _gemv_case("K = 1", 6, 4, [5], "a single kept input: y = x[i] · wt[i, :]"),
        _gemv_case("K = D, every input kept", 5, 3, [0, 1, 2, 3, 4],
                   "with every input kept the result is the dense product W @ x"),
        _gemv_case("float64 in, float64 out", 7, 6, [2, 3], "allocate the output with "
                   "wt's dtype (np.zeros(n, wt.dtype))", dtype=np.float64),
    ),
    extra_check=_numba_compiled,
)


# ---- lesson 7: a PyTorch BitLinear --------------------------------------------------------------


def _run_bitlinear(fn, c):
    import torch

    x = torch.from_numpy(c.args["x"].copy()).requires_grad_()
    w = torch.from_numpy(c.args["w"].copy()).requires_grad_()
    y = fn(x, w, c.args["k"])
    y.backward(torch.from_numpy(c.args["grad_y"]))
    return {"y": y.detach().numpy(),
            "x.grad": None if x.grad is None else x.grad.numpy(),
            "w.grad": None if w.grad is None else w.grad.numpy()}


def _ref_bitlinear(c):
    x, w, k, g = c.args["x"], c.args["w"], c.args["k"], c.args["grad_y"]
    grad_x, grad_w = sparse_linear_backward(g, x, w, k=k, bits=1.58, ste=True)
    return {"y": sparse_linear_forward(x, w, k=k, bits=1.58), "x.grad": grad_x, "w.grad": grad_w}


def _bitlinear_case(title, x, k, hint, d_out=3):
    rng = np.random.default_rng(7)
    x = _f32(x)
    w = rng.standard_normal((d_out, x.shape[-1])).astype(np.float32)
    g = rng.standard_normal((*x.shape[:-1], d_out)).astype(np.float32)
    return Case(title, {"x": x, "w": w, "k": k, "grad_y": g}, hint)


_x_typical = np.random.default_rng(3).standard_normal((2, 8))
BITLINEAR = Exercise(
    outputs=("y", "x.grad", "w.grad"), run=_run_bitlinear, reference=_ref_bitlinear,
    rules={"y": "y = topk(A(x)) @ Qw(w).T: A = int8 absmax per row (SPEC §3), then the top-k of "
                "the quantized activations (SPEC §1), Qw = ternary absmean (SPEC §4)",
           "x.grad": "straight-through: dL/dx = g @ Qw(w) — not masked by top-K, not through "
                     "the rounding",
           "w.grad": "straight-through: dL/dw = gᵀ @ topk(A(x)), the activations the forward "
                     "used"},
    cases=(
        _bitlinear_case("a typical layer, k = 4 of 8", _x_typical, 4,
                        "quantize x, keep its top-k, multiply by the ternarized weights; both "
                        "quantizers and the top-K pass the gradient straight through"),
        _bitlinear_case("no sparsity (k = None)", _x_typical, None,
                        "k = None: quantize only, keep every input"),
        _bitlinear_case("x · s exactly on .5", [[127, 2.5, -2.5, 0.5, -0.5, 3.5]], None,
                        "s = 1 here: torch.round rounds half to even like np.rint (2.5 → 2); "
                        "torch.floor(x * s + 0.5) does not"),
        _bitlinear_case("ties among the int8 codes", [[127, 3, 3, 3, -3, 1, 0, 0]], 2,
                        "top-K runs on the quantized activations, where ties are common: the "
                        "lower index wins (a stable sort of -|a|)"),
    ),
    needs="torch",
)


# ---- lesson 8: threshold sparsity (training-free, SPEC §11) -----------------------------------


THRESHOLD_MASK = Exercise(
    outputs=("mask",), exact=("mask",),
    run=lambda fn, c: {"mask": fn(c.args["x"].copy(), c.args["tau"])},
    reference=lambda c: {"mask": threshold_mask(c.args["x"], c.args["tau"])},
    rules={"mask": "M = |x| > tau, strict (an entry equal to tau is dropped), a bool array of "
                   "x's shape; one tau for every row, so rows keep different counts (SPEC §11)"},
    cases=(
        Case("a typical row", {"x": _f32([0.1, -0.7, 0.4, 0.9, -0.2, 0.3]), "tau": 0.25},
             "keep the entries whose magnitude |x| exceeds tau, negative ones too"),
        Case("entries equal to tau", {"x": _f32([0.5, -0.5, 0.25, 1.0]), "tau": 0.5},
             "the comparison is strict: |x| = tau is dropped (use >, not >=), so ties at the "
             "calibrated tau fall on the dropped side"),
        Case("tau = 0 drops only exact zeros", {"x": _f32([0.0, -0.0, 1e-8, -3.0]), "tau": 0.0},
             "with tau = 0 every nonzero entry is kept, however small; 0 and -0 are dropped"),
        Case("rows keep different counts", {"x": _f32([[1, 2, 3], [0.1, 0.2, 3]]), "tau": 0.5},
             "one tau for the whole tensor, no per-row K: row 0 keeps 3 entries, row 1 keeps 1"),
    ),
)


def _calibration_case(title, values, sparsity, hint):
    return Case(title, {"values": np.array(values, np.float64), "sparsity": sparsity}, hint)


CALIBRATE_THRESHOLD = Exercise(
    outputs=("tau",),
    run=lambda fn, c: {"tau": fn(c.args["values"].copy(), c.args["sparsity"])},
    reference=lambda c: {"tau": np.asarray(calibrate_threshold(c.args["values"],
                                                               c.args["sparsity"]))},
    rules={"tau": "sort |values| ascending a_1 <= ... <= a_n, j = floor(S · n) (one float64 "
                  "product), tau = a_j, 1-indexed (a[j - 1] in Python); tau = 0 if j = 0 "
                  "(SPEC §11)"},
    cases=(
        _calibration_case("ten values, S = 0.5",
                          [0.3, 0.1, 0.8, 0.5, 1.0, 0.2, 0.7, 0.4, 0.9, 0.6], 0.5,
                          "j = floor(0.5 · 10) = 5 and tau = a_5, the 5th smallest = 0.5: "
                          "a_j is 1-indexed, so in Python it is a[j - 1], not a[j]"),
        _calibration_case("S · n is not an integer", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 0.5,
                          "j = floor(0.5 · 7) = floor(3.5) = 3, tau = a_3 = 0.3: round down "
                          "(math.floor), not up (ceil) or to nearest"),
        _calibration_case("j = 0", [0.5, 0.1, 0.9], 0.2,
                          "j = floor(0.2 · 3) = 0: tau = 0 (drop only exact zeros); a[j - 1] "
                          "with j = 0 would be a[-1], the largest value"),
        _calibration_case("negative values count by magnitude", [-0.9, 0.2, -0.1, 0.5], 0.5,
                          "sort |values|: [0.1, 0.2, 0.5, 0.9], j = 2, tau = 0.2"),
        _calibration_case("S · n in float64, exactly as written", np.arange(1, 101) / 100, 0.29,
                          "0.29 * 100 is 28.999999999999996 in float64, so j = 28 and tau = "
                          "0.28: compute one product and floor it, no rounding or epsilon"),
    ),
)


EXERCISES = {"tanh": TANH, "topk": TOPK, "ste_backward": STE_BACKWARD, "absmax": ABSMAX,
             "absmean": ABSMEAN, "sparse_gemv": SPARSE_GEMV, "bitlinear": BITLINEAR,
             "threshold_mask": THRESHOLD_MASK, "calibrate_threshold": CALIBRATE_THRESHOLD}
