"""Conformance harness: check an outside implementation against the reference.

``check(op, fn)`` runs hypothesis-generated cases -- ties at the K-th magnitude, all-equal rows,
K = 1 and K = D, x * s exactly on .5, tiny and huge magnitudes, odd shapes, float32 and
float64 -- through ``fn`` and the reference, and returns a ``Report`` naming the smallest failing
input it found, the largest error and its index. ``assert_conforms`` raises AssertionError with
that report (for test suites); ``minisparse check MODULE:FUNCTION --op OP`` prints it.

Calling convention per op: arrays positional, parameters by keyword, NumPy in and NumPy out,
outputs in the input dtype (codes int8); compared with ``oracle.compare`` and ``TOLERANCES``.

  topk          fn(x, k=K) -> y                          y = X ⊙ Topk(|X|), SPEC 1 tie rule
  block_topk    fn(x, n=N, m=M) -> y                     N:M block top-K, SPEC 2
  sparsify      fn(x, grad_y, k=K, rescale="none"|"l2", ste=bool) -> (y, grad_x)
                                                         y = r X ⊙ M; grad_x = r g or r M ⊙ g
  absmax        fn(x) -> (q, s)                          int8 codes, per-row scale [..., 1], SPEC 3
  absmean       fn(w) -> (t, s)                          ternary int8 codes, scalar scale, SPEC 4
  sparse_linear fn(x, w, grad_y, k=K|None, rescale=..., bits=None|1.58, ste=bool)
                -> (y, grad_x, grad_w)                   SPEC 5 with STE backward

x is [..., D] (0-2 leading axes; sparse_linear: at least one), w is [D_out, D_in].

Hypothesis strategies for these inputs live here too, so the package's own tests and the
harness draw from the same cases.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Verbosity, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..quant import absmax_quantize, absmean_ternarize
from ..sparsity import topk_backward, topk_forward
from .ops import sparse_linear_backward, sparse_linear_forward, sparse_linear_magnitudes
from .tolerances import Mismatch, compare

FLOAT_DTYPES = (np.float32, np.float64)

# ---- strategies -------------------------------------------------------------------------------

# Row magnitudes: tiny (below the 1e-5 floor of SPEC 3-4), ordinary and huge. Squares stay
# finite (SPEC 1's l2 rescale squares the entries), so float32 stops at 1e15.
MAGNITUDES = {
    np.float32: (1e-30, 1e-6, 1e-3, 1.0, 7.0, 1e3, 1e15),
    np.float64: (1e-150, 1e-30, 1e-6, 1e-3, 1.0, 7.0, 1e3, 1e15, 1e150),
}
# Kinds of rows: hypothesis floats; a few values with many (sign-blind) ties; all entries of
# equal magnitude; and x * s landing exactly on .5 (SPEC 3: row max 127 * 2^j, entries n/2 * 2^j).
KINDS = ("floats", "ties", "equal", "half")
_TIES = (0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0)


def _width(dtype):
    return 8 * np.dtype(dtype).itemsize


@st.composite
def feature_arrays(draw, dtype=None, d=None, lead=None, kinds=KINDS, max_d=24, magnitudes=None):
    """Float arrays [*lead, D] (lead: 0-2 axes of 1-4 if not given) of one of KINDS, each row at
    its own magnitude."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if dtype is None else np.dtype(dtype).type
    if lead is None:
        lead = draw(st.lists(st.integers(1, 4), max_size=2))
    shape = (*lead, draw(st.integers(1, max_d)) if d is None else d)
    kind = draw(st.sampled_from(kinds))
    if kind == "floats":
        elements = st.floats(-1, 1, width=_width(dtype), allow_subnormal=False)
        x = draw(hnp.arrays(dtype, shape, elements=elements))
    elif kind == "ties":
        x = draw(hnp.arrays(dtype, shape, elements=st.sampled_from(_TIES)))
    elif kind == "equal":
        signs = draw(hnp.arrays(bool, shape))
        x = np.where(signs, 1.0, -1.0).astype(dtype) * dtype(draw(st.sampled_from((0.5, 1, 3))))
    else:  # "half": with the row max 127, s = 127 / 127 = 1 exactly, so x * s = n + 1/2
        x = draw(hnp.arrays(dtype, shape, elements=st.integers(-253, 253).map(lambda n: n / 2)))
        x[..., draw(st.integers(0, shape[-1] - 1))] = 127.0
    if kind == "half":  # powers of two keep x * s exact
        scales = st.integers(-20, 20).map(lambda j: 2.0**j)
    else:
        scales = st.sampled_from([float(dtype(m)) for m in magnitudes or MAGNITUDES[dtype]])
    return x * draw(hnp.arrays(dtype, (*shape[:-1], 1), elements=scales))


@st.composite
def rows_and_k(draw, **kwargs):
    """(x [..., D], K) with K = 1, K = D or anything between; x from ``feature_arrays``."""
    x = draw(feature_arrays(**kwargs))
    d = x.shape[-1]
    return x, draw(st.one_of(st.just(1), st.just(d), st.integers(1, d)))


@st.composite
def rows_and_block(draw, **kwargs):
    """(x [..., D], (N, M)) with M dividing D and 1 <= N <= M."""
    m = draw(st.integers(1, 8))
    n = draw(st.one_of(st.just(1), st.just(m), st.integers(1, m)))
    x = draw(feature_arrays(d=m * draw(st.integers(1, 4)), **kwargs))
    return x, (n, m)


def _grads(dtype, shape):
    return hnp.arrays(dtype, shape, elements=st.floats(-1, 1, width=_width(dtype)))


@st.composite
def _topk_cases(draw):
    x, k = draw(rows_and_k())
    return {"x": x, "k": k}


@st.composite
def _block_cases(draw):
    x, (n, m) = draw(rows_and_block())
    return {"x": x, "n": n, "m": m}


@st.composite
def _sparsify_cases(draw):
    rescale = draw(st.sampled_from(["none", "l2"]))
    x, k = draw(rows_and_k())
    return {"x": x, "grad_y": draw(_grads(x.dtype, x.shape)), "k": k, "rescale": rescale,
            "ste": draw(st.booleans())}


@st.composite
def _linear_cases(draw):
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    moderate = (1e-6, 1e-3, 1.0, 1e3)  # keeps the matmul far from overflow
    x = draw(feature_arrays(dtype, lead=lead, max_d=16, magnitudes=moderate))
    w = draw(feature_arrays(dtype, d=x.shape[-1], lead=(draw(st.integers(1, 6)),),
                            magnitudes=moderate))
    k = draw(st.one_of(st.none(), st.just(1), st.integers(1, x.shape[-1])))
    return {"x": x, "w": w, "grad_y": draw(_grads(dtype, (*lead, w.shape[0]))), "k": k,
            "rescale": draw(st.sampled_from(["none", "l2"])),
            "bits": draw(st.sampled_from([None, 1.58])), "ste": draw(st.booleans())}


# ---- the ops: calling convention, reference, tolerance kinds, must-run examples ----------------


@dataclass(frozen=True)
class _Op:
    inputs: tuple  # array arguments, passed positionally; every other case entry is a keyword
    outputs: tuple  # names of the results, in the order fn returns them
    reference: object  # case -> tuple of expected results
    kinds: object  # case -> tuple of tolerance kinds, one per output
    cases: object  # () -> hypothesis strategy of case dicts
    examples: tuple = ()  # cases always run first: the classic mistakes, deterministically
    scales: object = None  # case -> tuple of comparison scales (see tolerances.py), or None


def _f32(rows):
    return np.array(rows, np.float32)


def _topk_sparsify(c):
    y, mask, r = topk_forward(c["x"], k=c["k"], rescale=c["rescale"])
    return y, topk_backward(c["grad_y"], mask, r, c["ste"])


def _linear_kwargs(c):
    return {"k": c["k"], "rescale": c["rescale"], "bits": c["bits"]}


def _linear(c):
    return (sparse_linear_forward(c["x"], c["w"], **_linear_kwargs(c)),
            *sparse_linear_backward(c["grad_y"], c["x"], c["w"], ste=c["ste"], **_linear_kwargs(c)))


def _linear_scales(c):
    return sparse_linear_magnitudes(c["grad_y"], c["x"], c["w"], ste=c["ste"], **_linear_kwargs(c))


def _exact_unless_l2(c):
    kind = "reduction" if c["rescale"] == "l2" else "exact"
    return kind, kind


OPS = {
    "topk": _Op(("x",), ("y",), lambda c: (topk_forward(c["x"], k=c["k"])[0],),
                lambda c: ("exact",), _topk_cases,
                ({"x": _f32([[3, 1, 1, 1, -1, 0.5]]), "k": 3},)),  # ties at the K-th |x|
    "block_topk": _Op(("x",), ("y",), lambda c: (topk_forward(c["x"], block=(c["n"], c["m"]))[0],),
                      lambda c: ("exact",), _block_cases,
                      ({"x": _f32([[1, -1, 1, 0, 2, 2, 2, 2]]), "n": 2, "m": 4},)),
    "sparsify": _Op(("x", "grad_y"), ("y", "grad_x"), _topk_sparsify, _exact_unless_l2,
                    _sparsify_cases,
                    ({"x": _f32([[1, -4, 2, 3]]), "grad_y": _f32([[1, 1, 1, 1]]), "k": 2,
                      "rescale": "none", "ste": True},)),  # STE: every entry gets g
    "absmax": _Op(("x",), ("q", "s"), lambda c: absmax_quantize(c["x"]),
                  lambda c: ("exact", "elementwise"), lambda: st.builds(dict, x=feature_arrays()),
                  ({"x": _f32([[127, 2.5, -2.5, 0.5, -0.5, 3.5]])},  # x * s on .5: half to even
                   {"x": _f32([[1, 0.3, -0.7], [100, 30, -50]])})),  # rows at their own scale
    "absmean": _Op(("w",), ("t", "s"), lambda c: absmean_ternarize(c["w"]),
                   lambda c: ("exact", "reduction"), lambda: st.builds(dict, w=feature_arrays()),
                   ({"w": _f32([[0.25, -0.5, 0.25], [0, 0.5, -1.5]])},)),  # w * s = 0.5 -> 0
    "sparse_linear": _Op(("x", "w", "grad_y"), ("y", "grad_x", "grad_w"), _linear,
                         lambda c: ("reduction",) * 3, _linear_cases, scales=_linear_scales),
}


# ---- running a check ------------------------------------------------------------------------


@dataclass
class Report:
    """The outcome of ``check``: passed, or the smallest failing case and what went wrong."""

    op: str
    passed: bool
    cases_run: int
    seed: int | None
    case: dict = field(default_factory=dict)  # the failing input: arrays and parameters
    problem: str = ""  # what went wrong, one line
    mismatch: Mismatch | None = None  # the largest error and its index, if outputs differed
    expected: np.ndarray | None = None
    got: np.ndarray | None = None

    def __str__(self):
        head = f"minisparse check {self.op}: "
        if self.passed:
            return head + f"OK, {self.cases_run} cases agree with the reference (seed {self.seed})"
        lines = [head + f"FAILED after {self.cases_run} cases (seed {self.seed})",
                 "  failing input (the smallest found):"]
        for name, value in self.case.items():
            if isinstance(value, np.ndarray):
                lines.append(f"    {name}: {value.dtype} {value.shape} = {_show(value, 6)}")
            else:
                lines.append(f"    {name} = {value!r}")
        lines.append(f"  {self.problem}")
        if self.expected is not None:
            lines.append(f"    expected = {_show(self.expected, 15)}")
            lines.append(f"    got      = {_show(self.got, 15)}")
        return "\n".join(lines)


def _show(a, indent):
    text = np.array2string(np.asarray(a), threshold=64, max_line_width=100 - indent,
                           precision=8)
    return text.replace("\n", "\n" + " " * indent)


class _CaseFailed(Exception):
    pass


def _run_case(op, fn, case):
    """(problem, mismatch, expected, got) for one case, or None if fn agrees with the reference."""
    args = [case[name].copy() for name in op.inputs]  # copies: fn may not write into ours
    kwargs = {k: v for k, v in case.items() if k not in op.inputs}
    try:
        result = fn(*args, **kwargs)
    except Exception as e:  # a crash on valid input is a failure like any other
        return f"fn raised {type(e).__name__}: {e}", None, None, None
    if len(op.outputs) > 1:
        if not isinstance(result, (tuple, list)) or len(result) != len(op.outputs):
            return (f"fn must return a tuple {op.outputs}, got {type(result).__name__}"
                    f"{f' of length {len(result)}' if isinstance(result, (tuple, list)) else ''}",
                    None, None, None)
    else:
        result = (result,)
    scales = op.scales(case) if op.scales else (None,) * len(op.outputs)
    for name, got, expected, kind, scale in zip(op.outputs, result, op.reference(case),
                                                op.kinds(case), scales, strict=True):
        expected = np.asarray(expected)
        if isinstance(got, (int, float)):  # a Python scalar (e.g. a scale): take the op's dtype
            got = np.asarray(got, dtype=expected.dtype)
        mismatch = compare(name, got, expected, kind, scale)
        if mismatch is not None:
            return str(mismatch), mismatch, expected, np.asarray(got)
    return None


def check(op_name, user_fn, *, max_examples=200, seed=0) -> Report:
    """Run ``user_fn`` on hypothesis-generated cases of ``op_name`` (see the module docstring for
    the calling convention) and compare with the reference -> Report (smallest failure found).

    ``seed`` fixes the cases drawn (None: fresh randomness each call)."""
    if op_name not in OPS:
        raise ValueError(f"check: unknown op {op_name!r}; choose one of {sorted(OPS)}")
    if not callable(user_fn):
        raise TypeError(f"check: user_fn must be callable, got {type(user_fn).__name__}")
    op = OPS[op_name]
    runs, failures = [0], []

    def run(case):
        runs[0] += 1
        outcome = _run_case(op, user_fn, case)
        if outcome is not None:
            failures.append((case, outcome))
            raise _CaseFailed

    test = given(case=op.cases())(run)
    for case in reversed(op.examples):  # decorators apply inside-out: keep the listed order
        test = example(case=case)(test)
    test = settings(max_examples=max_examples, deadline=None, database=None,
                    verbosity=Verbosity.quiet, report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck))(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Exception:  # _CaseFailed, or hypothesis' Flaky if fn is not deterministic
        if not failures:
            raise
    if not failures:
        return Report(op_name, True, runs[0], seed)
    case, (problem, mismatch, expected, got) = failures[-1]  # hypothesis replays the smallest last
    return Report(op_name, False, runs[0], seed, case, problem, mismatch, expected, got)


def assert_conforms(op_name, user_fn, **kwargs) -> Report:
    """``check`` for test suites: AssertionError with the readable report unless it passes."""
    report = check(op_name, user_fn, **kwargs)
    if not report.passed:
        raise AssertionError(str(report))
    return report


def load_function(target):
    """'package.module:function' or 'path/to/file.py:function' -> the function (for the CLI)."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION (e.g. mykernels:topk), got {target!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or not Path(module_name).is_file():
            raise ValueError(f"no such file: {module_name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        added = "" not in sys.path  # like `python -m`: modules in the working directory import
        if added:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import {module_name!r}: {e}") from None
        finally:
            if added:
                sys.path.remove("")
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
