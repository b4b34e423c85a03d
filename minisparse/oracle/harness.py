"""Conformance harness: check an outside implementation of a SPEC op against the reference.

``check(op, fn)`` runs the cases of ``cases.py`` -- sizes at kernel tile edges up to 4096, ties,
quantization-made ties, SPEC 3's exact halves, γ/2 entries, tiny and huge rows, four dtypes --
through ``fn`` and the reference and returns a ``Report``: the first failing input (shrunk to a
small typical one), the largest error and where it is, SPEC 3's boundary flips counted apart.
``assert_conforms`` raises AssertionError with that report; ``minisparse check MODULE:FN --op
OP`` prints it. A failure can be saved as ``.npz`` plus a runnable reproduction script.

Calling convention per op: arrays positional, parameters by keyword, outputs in the input dtype
(codes int8, ``bitlinear_int`` int32). ``fn`` may take and return NumPy arrays or torch tensors
(CPU or ``device="cuda"``); an ``nn.Module`` (class or instance) is called as ``module(x)``.

  k_for         fn(d, sparsity=S) -> K                   K = max(1, ceil((1 - S) d)), SPEC 1
  topk          fn(x, k=K) -> y                          y = X ⊙ Topk(|X|), SPEC 1 tie rule
  block_topk    fn(x, n=N, m=M) -> y                     N:M block top-K, SPEC 2
  sparsify      fn(x, grad_y, k=K, rescale="none"|"l2", ste=bool) -> (y, grad_x)
                (and block=(N, M) with k=None, if fn takes ``block``)
                                                         y = r X ⊙ M; grad_x = r g or r M ⊙ g
  threshold     fn(x, tau=τ) -> y                        y = X ⊙ (|X| > τ), SPEC 11 (strict)
  absmax        fn(x) -> (q, s)                          int8 codes, per-row scale [..., 1], SPEC 3
  absmean       fn(w) -> (t, s)                          ternary int8 codes, scalar scale, SPEC 4
  absmax_fake   fn(x) -> Q(x) = q / s                    fake-quant (dequantized) activations
  absmean_fake  fn(w) -> Qw(w) = t / s                   fake-quant (dequantized) weights
  sparse_linear fn(x, w, grad_y, k=K|None, rescale=..., bits=None|1.58, ste=bool)
                -> (y, grad_x, grad_w)                   SPEC 5 with STE backward
                (and block=(N, M) with k=None, if fn takes ``block``)
  bitlinear     fn(x, w) -> y = Q(X) @ Qw(W).T           BitNet b1.58 BitLinear, forward only;
                a Module class is built as Cls(D_in, D_out, bias=False) (or Cls(D_in, D_out)),
                its ``.weight`` set to w (an nn.Linear-like [D_out, D_in]), a bias zeroed
  bitlinear_int fn(q, t) -> int32 q @ t.T                the inference kernel: int8 codes
                                                         [..., D_in] x ternary [D_out, D_in]
  ffn           fn(h, up, gate, down, act="relu2"|"silu", k=K|None, rescale=..., bits=...) -> y
                                                         SPEC 6 GLU: down(up(h) * act(gate(h)))
  moe           fn(h, router, up, gate, down, top_experts=k_e, act=..., bits=...) -> (y, aux)
                h [N, d], router [E, d], up/gate [E, H, d], down [E, d, H]: SPEC 6's mixture of
                experts (gates p not renormalised) and its load-balancing loss E Σ f_e P_e

For sparse_linear and sparsify, a torch ``fn`` may instead return just ``y`` from autograd-enabled
inputs: the harness calls ``y.backward(grad_y)`` and reads the gradients.

x is [..., D] (0-2 leading axes; layers: at least one), w is [D_out, D_in].
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from ..quant import absmax_quantize, absmean_ternarize, dequantize
from ..sparsity import k_for, topk_backward, topk_forward
from . import cases as C
from .flips import (
    MAX_FLIPS_SEARCHED,
    absmax_boundaries,
    absmean_boundaries,
    legal_codes,
    row_variants,
)
from .ops import _act, linear_parts, sparse_linear_magnitudes
from .strategies import feature_arrays, rows_and_block, rows_and_k  # noqa: F401
from .tolerances import Mismatch, compare

# ---- drawing the cases of each op -----------------------------------------------------------


def _dtype(draw, ctl):
    return C.numpy_dtype(draw(st.sampled_from(ctl.dtypes)))


def _lead(draw, ctl, d, min_axes=0):
    """Leading axes (0-2, or ``min_axes``+) of 1-64 rows, their product within the budget."""
    n_axes = draw(st.integers(min_axes, 2))
    if n_axes == 0:
        return ()
    rows = draw(C.sizes(ctl, high=64, cap=max(1, C.BUDGET // d)))
    if n_axes == 1:
        return (rows,)
    inner = draw(st.sampled_from([n for n in (1, 2, 3, 4) if n <= rows] or [1]))
    return (max(1, rows // inner), inner)


def _k(draw, ctl, d):
    """K = 1, D, half of D or anything in between (K = 1 and D bring out off-by-ones)."""
    return draw(ctl.param("k", st.one_of(st.sampled_from([1, d, max(1, d // 2)]),
                                         st.integers(1, d))))


@st.composite
def _k_for_case(draw, ctl):
    # round widths (d = 10, 768, ...) and decimal ratios make (1 - S) d land near an integer,
    # where a product in another precision or order rounds to the other side of the ceiling
    d = draw(st.one_of(st.sampled_from([10, 20, 30, 100, 300, 768, 1000, 3072]), C.sizes(ctl)))
    # S = 1 - j/d rounded: (1 - S) d lands within ulps of the integer j, on either side
    s = draw(ctl.param("sparsity", st.one_of(
        st.sampled_from([0.0, 0.5, 0.7, 0.9, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 0.75, 0.99,
                         1 - 2**-20]),
        st.integers(1, d).map(lambda j: 1 - j / d).filter(lambda s: 0 <= s < 1),
        st.floats(0, 1, exclude_max=True))))
    return {"d": d, "sparsity": s}


@st.composite
def _x_case(draw, ctl, min_d=1, max_d=4096, lead_axes=0):
    dtype = _dtype(draw, ctl)
    d = draw(C.sizes(ctl, low=min_d, high=max_d))
    shape = (*_lead(draw, ctl, d, lead_axes), d)
    return draw(C.arrays(ctl, shape, dtype))


@st.composite
def _topk_case(draw, ctl):
    x = draw(_x_case(ctl))
    return {"x": x, "k": _k(draw, ctl, x.shape[-1])}


@st.composite
def _block(draw, ctl, d_choices=None):
    """(N, M): M from the ladder up to 64 (kernels unroll short blocks), N anything <= M."""
    m = draw(ctl.param("m", C.sizes(ctl, high=64)))
    n = draw(ctl.param("n", st.one_of(st.sampled_from([1, m, max(1, m // 2)]),
                                      st.integers(1, m))))
    return n, m


@st.composite
def _block_case(draw, ctl):
    n, m = draw(_block(ctl))
    dtype = _dtype(draw, ctl)
    blocks = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 33, 64]).filter(lambda b: b * m <= 4096))
    shape = (*_lead(draw, ctl, blocks * m), blocks * m)
    return {"x": draw(C.arrays(ctl, shape, dtype)), "n": n, "m": m}


@st.composite
def _sparsify_case(draw, ctl, blocks=True):
    use_block = blocks and draw(ctl.param("block", st.sampled_from([None, "drawn"]))) is not None
    if use_block:
        case = draw(_block_case(ctl))
        case["block"], case["k"] = (case.pop("n"), case.pop("m")), None
    else:
        case = draw(_topk_case(ctl))
    x = case.pop("x")
    return {"x": x, "grad_y": C.grads(draw, x.shape, x.dtype), **case,
            "rescale": draw(ctl.param("rescale", st.sampled_from(["none", "l2"]))),
            "ste": draw(ctl.param("ste", st.booleans()))}


@st.composite
def _threshold_case(draw, ctl):
    x = draw(_x_case(ctl))
    a = np.sort(np.abs(x.astype(np.float64)).ravel())
    tau = draw(st.one_of(st.sampled_from([a[len(a) // 2], 0.0, a[-1]]),  # ties exactly at tau
                         st.floats(0, float(a[-1]) if np.isfinite(a[-1]) else 1.0)))
    return {"x": x, "tau": float(x.dtype.type(tau))}


@st.composite
def _absmax_case(draw, ctl):
    return {"x": draw(_x_case(ctl))}


@st.composite
def _absmean_case(draw, ctl):
    dtype = _dtype(draw, ctl)
    d_in = draw(C.sizes(ctl))
    d_out = draw(C.sizes(ctl, cap=max(1, C.BUDGET // d_in)))
    return {"w": draw(C.weights(ctl, (d_out, d_in), dtype))}


def _layer_sizes(draw, ctl):
    """(lead, D_in, D_out): any one axis may be big, the others then small."""
    d_in = draw(C.sizes(ctl))
    d_out = draw(C.sizes(ctl, cap=max(1, C.BUDGET // d_in)))
    return _lead(draw, ctl, d_in, 1), d_in, d_out


LAYER_MAGNITUDES = ("one", "moderate", "tiny")  # products of two huge rows overflow


@st.composite
def _linear_case(draw, ctl, blocks=True):
    dtype = _dtype(draw, ctl)
    lead, d_in, d_out = _layer_sizes(draw, ctl)
    bits = draw(ctl.param("bits", st.sampled_from([None, 1.58])))
    x = draw(C.arrays(ctl, (*lead, d_in), dtype, magnitudes=LAYER_MAGNITUDES))
    case = {"x": x, "w": draw(C.weights(ctl, (d_out, d_in), dtype)),
            "grad_y": C.grads(draw, (*lead, d_out), dtype)}
    modes = ["k", "none", "block"] if blocks and ctl.fixed.get("block", 0) is not None else \
        ["k", "none"]
    mode = draw(ctl.param("sparse", st.sampled_from(modes)))
    k, block = None, None
    if mode == "k":
        k = _k(draw, ctl, d_in)
    elif mode == "block":
        divisors = [m for m in C.LADDER if m <= 64 and d_in % m == 0]
        m = draw(st.sampled_from(divisors))
        block = (draw(st.integers(1, m)), m)
    case.update(k=k, rescale=draw(ctl.param("rescale", st.sampled_from(["none", "l2"]))),
                bits=bits, ste=draw(ctl.param("ste", st.booleans())))
    if blocks:
        case["block"] = block
    return case


@st.composite
def _bitlinear_case(draw, ctl):
    dtype = _dtype(draw, ctl)
    lead, d_in, d_out = _layer_sizes(draw, ctl)
    d_in, d_out = ctl.fixed.get("d_in", d_in), ctl.fixed.get("d_out", d_out)  # a Module's shape
    x = draw(C.arrays(ctl, (*lead, d_in), dtype, magnitudes=LAYER_MAGNITUDES))
    return {"x": x, "w": draw(C.weights(ctl, (d_out, d_in), dtype))}


@st.composite
def _bitlinear_int_case(draw, ctl):
    lead, d_in, d_out = _layer_sizes(draw, ctl)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(-128, 128, (*lead, d_in))
    t = rng.integers(-1, 2, (d_out, d_in))
    if draw(st.booleans()):  # codes at -128 / 127 and t = sign(q): the sums at their largest
        q = rng.choice([-128, 127], (*lead, d_in))
        t[0] = np.sign(q.reshape(-1, d_in)[0])
    return {"q": q.astype(np.int8), "t": t.astype(np.int8)}


@st.composite
def _ffn_case(draw, ctl):
    dtype = _dtype(draw, ctl)
    d = draw(C.sizes(ctl, high=512))
    hidden = draw(C.sizes(ctl, high=512, cap=max(1, 4096 // d)))
    lead = _lead(draw, ctl, max(d, hidden), 1)
    h = draw(C.arrays(ctl, (*lead, d), dtype, magnitudes=LAYER_MAGNITUDES))
    w = [draw(C.weights(ctl, shape, dtype)) for shape in ((hidden, d), (hidden, d), (d, hidden))]
    sparse = draw(ctl.param("sparse", st.sampled_from(["k", "none"])))
    return {"h": h, "up": w[0], "gate": w[1], "down": w[2],
            "act": draw(ctl.param("act", st.sampled_from(["relu2", "silu"]))),
            "k": None if sparse == "none" else draw(st.integers(1, min(d, hidden))),
            "rescale": draw(ctl.param("rescale", st.sampled_from(["none", "l2"]))),
            "bits": draw(ctl.param("bits", st.sampled_from([None, 1.58])))}


@st.composite
def _moe_case(draw, ctl):
    dtype = _dtype(draw, ctl)
    n_experts = draw(ctl.param("n_experts", st.sampled_from([2, 3, 4, 8])))
    d, hidden = draw(st.sampled_from([4, 8, 16, 33])), draw(st.sampled_from([4, 9, 16]))
    tokens = draw(C.sizes(ctl, high=64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    router = rng.standard_normal((n_experts, d))
    if draw(st.booleans()):  # equal router rows: equal p, the lower index must win
        router[1] = router[0]
    bits = draw(ctl.param("bits", st.sampled_from([None, 1.58])))
    return {"h": draw(C.arrays(ctl, (tokens, d), dtype, kinds=("normal", "ties"),
                               magnitudes=("one",))),
            "router": router.astype(dtype),
            "up": rng.standard_normal((n_experts, hidden, d)).astype(dtype),
            "gate": rng.standard_normal((n_experts, hidden, d)).astype(dtype),
            "down": rng.standard_normal((n_experts, d, hidden)).astype(dtype),
            "top_experts": draw(ctl.param("top_experts", st.integers(1, n_experts))),
            "act": draw(ctl.param("act", st.sampled_from(["relu2", "silu"]))), "bits": bits}


# ---- references: computed in float32/64, results in the input dtype ---------------------------


def _in_compute_dtype(case):
    """Float arrays of ``case`` in the dtype the reference computes in (float16 / bfloat16 are
    exactly representable in float32)."""
    return {k: v.astype(C.compute_dtype(v.dtype)) if isinstance(v, np.ndarray)
            and v.dtype.kind not in "iub" else v for k, v in case.items()}


def _case_dtype(case, op):
    arrays = [case[name] for name in op.inputs if case[name].dtype.kind not in "iub"]
    return arrays[0].dtype if arrays else np.dtype(np.float64)


def _linear_kwargs(c):
    return {"k": c["k"], "block": c.get("block"), "rescale": c["rescale"], "bits": c["bits"]}


def _topk_sparsify(c):
    y, mask, r = topk_forward(c["x"], k=c["k"], block=c.get("block"), rescale=c["rescale"])
    return y, topk_backward(c["grad_y"], mask, r, c["ste"])


def _linear(c, x_codes=None, w_codes=None):
    z, mask, r, w_hat = linear_parts("check", c["x"], c["w"], x_codes=x_codes, w_codes=w_codes,
                                     **_linear_kwargs(c))
    grad_z = c["grad_y"] @ w_hat
    grad_x = grad_z if mask is None else topk_backward(grad_z, mask, r, c["ste"])
    d_out, d_in = c["w"].shape
    return z @ w_hat.T, grad_x, c["grad_y"].reshape(-1, d_out).T @ z.reshape(-1, d_in)


def _linear_scales(c):
    return sparse_linear_magnitudes(c["grad_y"], c["x"], c["w"], ste=c["ste"],
                                    **_linear_kwargs(c))


def _bitlinear(c, x_codes=None, w_codes=None):
    z, _, _, w_hat = linear_parts("check", c["x"], c["w"], bits=1.58, x_codes=x_codes,
                                  w_codes=w_codes)
    return (z @ w_hat.T,)


def _bitlinear_scales(c):
    return (_bitlinear({"x": np.abs(c["x"]), "w": np.abs(c["w"])})[0],)


def _ffn_parts(c, h_codes=None, f_codes=None):
    """The GLU of SPEC 6 -> (y, f) with optional codes for h (up/gate input) and f (down)."""
    kw = {"k": c["k"], "rescale": c["rescale"], "bits": c["bits"]}
    u = _proj(c["h"], c["up"], kw, h_codes)
    f = u * _act(c["act"], _proj(c["h"], c["gate"], kw, h_codes))[0]
    return _proj(f, c["down"], kw, f_codes), f


def _proj(x, w, kw, codes):
    z, _, _, w_hat = linear_parts("check", x, w, x_codes=codes, **kw)
    return z @ w_hat.T


def _ffn_scales(c):
    a = {**c, "h": np.abs(c["h"]), "up": np.abs(c["up"]), "gate": np.abs(c["gate"]),
         "down": np.abs(c["down"]), "act": "relu2"}
    return (np.abs(_ffn_parts(a)[0]) + np.abs(_ffn_parts(c)[0]),)


def _moe(c):
    from .gpt import moe_forward

    n_experts, d = c["router"].shape
    cfg = {"n_experts": n_experts, "top_experts": c["top_experts"], "ffn_act": c["act"],
           "bits": c["bits"], "block": None, "sparsity": 0.0, "rescale": "none"}
    p = {"router": c["router"]}
    for e in range(n_experts):
        p.update({f"experts.{e}.{n}": c[n][e] for n in ("up", "gate", "down")})
    y, aux, _ = moe_forward(c["h"][None], p, cfg, "", None)
    return y[0], np.asarray(aux, c["h"].dtype)


def _exact_unless_l2(c):
    kind = "reduction" if c["rescale"] == "l2" else "exact"
    return kind, kind


def _fake(quantizer):
    return lambda c: (dequantize(*quantizer(next(iter(c.values())))),)


# ---- the ops: calling convention, reference, tolerance kinds, must-run examples --------------


@dataclass(frozen=True)
class _Op:
    inputs: tuple  # array arguments, passed positionally; every other case entry is a keyword
    outputs: tuple  # names of the results, in the order fn returns them
    reference: object  # case -> tuple of expected results
    kinds: object  # case -> tuple of comparison kinds, one per output (see _compare_output)
    cases: object  # Controls -> hypothesis strategy of case dicts
    examples: tuple = ()  # (kind, spec) built first, in order: the classic mistakes
    scales: object = None  # case -> tuple of comparison scales (see tolerances.py), or None
    search: object = None  # codes searched for SPEC 3 boundary flips: "linear" | "ffn" | None


def _f32(rows):
    return np.array(rows, np.float32)


OPS = {
    "k_for": _Op((), ("k",), lambda c: (k_for(c["d"], sparsity=c["sparsity"]),),
                 lambda c: ("exact",), _k_for_case,
                 ({"d": 10, "sparsity": 0.7}, {"d": 3, "sparsity": 0.0})),  # 3.0000000000000004
    "topk": _Op(("x",), ("y",), lambda c: (topk_forward(c["x"], k=c["k"])[0],),
                lambda c: ("exact",), _topk_case,
                ({"x": _f32([[3, 1, 1, 1, -1, 0.5]]), "k": 3},  # ties at the K-th |x|
                 ("topk", dict(kind="ties", shape=(3, 33), k=16)),  # a tile edge with ties
                 ("topk", dict(kind="ties", shape=(2, 1025), k=400)),
                 ("topk", dict(kind="normal", shape=(5, 65), k=7, magnitude="mixed")))),
    "block_topk": _Op(("x",), ("y",), lambda c: (topk_forward(c["x"], block=(c["n"], c["m"]))[0],),
                      lambda c: ("exact",), _block_case,
                      ({"x": _f32([[1, -1, 1, 0, 2, 2, 2, 2]]), "n": 2, "m": 4},
                       ("block", dict(kind="normal", shape=(3, 64), n=2, m=4)),
                       ("block", dict(kind="ties", shape=(2, 96), n=16, m=32)))),
    "sparsify": _Op(("x", "grad_y"), ("y", "grad_x"), _topk_sparsify, _exact_unless_l2,
                    _sparsify_case,
                    ({"x": _f32([[1, -4, 2, 3]]), "grad_y": _f32([[1, 1, 1, 1]]), "k": 2,
                      "rescale": "none", "ste": True},  # STE: every entry gets g
                     ("sparsify", dict(kind="normal", shape=(3, 17), k=5, rescale="l2",
                                       ste=True)),
                     ("sparsify", dict(kind="ties", shape=(2, 40), k=9, rescale="l2",
                                       ste=False)),
                     ("sparsify", dict(kind="normal", shape=(4, 33), k=3, rescale="l2",
                                       ste=True, magnitude="huge")))),
    "threshold": _Op(("x",), ("y",),
                     lambda c: (np.where(np.abs(c["x"]) > c["tau"], c["x"], 0),),
                     lambda c: ("exact",), _threshold_case,
                     ({"x": _f32([[0.5, -0.5, 1, 0.25]]), "tau": 0.5},)),  # ties at tau dropped
    "absmax": _Op(("x",), ("q", "s"), lambda c: absmax_quantize(c["x"]),
                  lambda c: ("absmax_codes", "elementwise"), _absmax_case,
                  ({"x": _f32([[127, 2.5, -2.5, 0.5, -0.5, 3.5]])},  # x * s on .5: half to even
                   {"x": _f32([[1, 0.3, -0.7], [100, 30, -50]])},  # rows at their own scale
                   ("x", dict(kind="half", shape=(3, 129))),
                   ("x", dict(kind="normal", shape=(9, 65), magnitude="mixed")))),
    "absmean": _Op(("w",), ("t", "s"), lambda c: absmean_ternarize(c["w"]),
                   lambda c: ("absmean_codes", "reduction"), _absmean_case,
                   ({"w": _f32([[0.25, -0.5, 0.25], [0, 0.5, -1.5]])},  # w * s = 0.5 -> 0
                    ("w", dict(w_kind="half", shape=(17, 33))),
                    ("w", dict(w_kind="normal", shape=(9, 65))))),
    "absmax_fake": _Op(("x",), ("y",), _fake(absmax_quantize), lambda c: ("absmax_fake",),
                       _absmax_case, (("x", dict(kind="half", shape=(3, 129))),
                                      ("x", dict(kind="normal", shape=(9, 65),
                                                 magnitude="mixed")))),
    "absmean_fake": _Op(("w",), ("y",), _fake(absmean_ternarize), lambda c: ("absmean_fake",),
                        _absmean_case, (("w", dict(w_kind="half", shape=(17, 33))),
                                        ("w", dict(w_kind="normal", shape=(9, 65))))),
    "sparse_linear": _Op(("x", "w", "grad_y"), ("y", "grad_x", "grad_w"), _linear,
                         lambda c: ("reduction",) * 3, _linear_case,
                         (("linear", dict(kind="code_ties", shape=(3, 40), d_out=5, k=6,
                                          bits=1.58)),
                          ("linear", dict(kind="half", shape=(2, 65), d_out=9, k=None,
                                          bits=1.58)),
                          ("linear", dict(kind="normal", shape=(4, 2049), d_out=3, k=None,
                                          bits=None)),
                          ("linear", dict(kind="normal", shape=(3, 33), d_out=17, k=9,
                                          rescale="l2", bits=1.58, ste=False))),
                         scales=_linear_scales, search="linear"),
    "bitlinear": _Op(("x", "w"), ("y",), _bitlinear, lambda c: ("reduction",), _bitlinear_case,
                     (("bitlinear", dict(kind="half", shape=(3, 65), d_out=9)),
                      ("bitlinear", dict(kind="normal", shape=(2, 1025), d_out=17)),
                      ("bitlinear", dict(kind="normal", shape=(9, 33), d_out=3,
                                         magnitude="mixed", w_kind="half"))),
                     scales=_bitlinear_scales, search="linear"),
    "bitlinear_int": _Op(("q", "t"), ("y",),
                         lambda c: (c["q"].astype(np.int32) @ c["t"].T.astype(np.int32),),
                         lambda c: ("exact",), _bitlinear_int_case),
    "ffn": _Op(("h", "up", "gate", "down"), ("y",), lambda c: (_ffn_parts(c)[0],),
               lambda c: ("reduction",), _ffn_case,
               (("ffn", dict(kind="code_ties", shape=(3, 33), hidden=17, k=5, bits=1.58)),),
               scales=_ffn_scales, search="ffn"),
    "moe": _Op(("h", "router", "up", "gate", "down"), ("y", "aux"), _moe,
               lambda c: ("reduction", "reduction"), _moe_case, search="moe"),
}
OP_NAMES = tuple(OPS)


def _built_example(op_name, spec, ctl):
    """A must-run example from (builder, spec) under the controls, or None if they exclude it."""
    builder, spec = spec
    spec = dict(spec)
    if any(name in ctl.fixed and ctl.fixed[name] != value for name, value in spec.items()):
        return None
    dtype = C.numpy_dtype(ctl.dtypes[0])
    shape = spec.pop("shape")
    if any(not ctl.min_size <= n <= ctl.max_size for n in (*shape, spec.get("d_out", 1))):
        return None
    rng = np.random.default_rng(0)
    kind, magnitude = spec.pop("kind", "normal"), spec.pop("magnitude", "one")
    w_kind = spec.pop("w_kind", "normal")
    if builder == "w":
        return {"w": C.weights_of(rng, shape, w_kind, dtype)}
    x = C.rows_of(rng, shape, kind, dtype, magnitude)
    if builder == "x":
        return {"x": x}
    if builder in ("topk", "block"):
        return {"x": x, **spec}
    if builder == "sparsify":
        return {"x": x, "grad_y": rng.standard_normal(shape).astype(dtype), **spec}
    d_out = spec.pop("d_out", None)
    if builder == "ffn":
        hidden = spec.pop("hidden")
        d = shape[-1]
        return {"h": x, "up": C.weights_of(rng, (hidden, d), w_kind, dtype),
                "gate": C.weights_of(rng, (hidden, d), w_kind, dtype),
                "down": C.weights_of(rng, (d, hidden), w_kind, dtype),
                "act": "relu2", "rescale": "none", **spec}
    w = C.weights_of(rng, (d_out, shape[-1]), w_kind, dtype)
    if builder == "bitlinear":
        return {"x": x, "w": w}
    return {"x": x, "w": w, "grad_y": rng.standard_normal((*shape[:-1], d_out)).astype(dtype),
            "rescale": "none", "ste": True, "block": None, **spec}


def _examples(op_name, op, ctl, takes):
    out = []
    for spec in op.examples:
        case = _built_example(op_name, spec, ctl) if isinstance(spec, tuple) else dict(spec)
        if case is None or not _allowed(case, ctl, takes):
            continue
        if op_name in ("sparse_linear", "sparsify") and "block" not in takes:
            case.pop("block", None)
        out.append(case)
    return out


def _allowed(case, ctl, takes):
    """Whether a literal example fits the controls (dtype, fixed parameters, sizes)."""
    for value in case.values():
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            if value.dtype.name not in ctl.dtypes:
                return False
            if any(n > ctl.max_size for n in value.shape):
                return False
    return all(case.get(name, value) == value for name, value in ctl.fixed.items()
               if name in case)


# ---- comparing one output -----------------------------------------------------------------------


def _compare_output(name, got, expected, kind, scale, case, dtype):
    """(Mismatch or None, boundary flips) for one output: codes under SPEC 3's rule, fake-quant
    values as codes times the reference scale, the rest with ``compare``."""
    if kind in ("absmax_codes", "absmean_codes", "absmax_fake", "absmean_fake"):
        absmax = kind.startswith("absmax")
        x = _in_compute_dtype(case)["x" if absmax else "w"]
        boundary, v = (absmax_boundaries if absmax else absmean_boundaries)(x, dtype)
        ref_q, s = (absmax_quantize if absmax else absmean_ternarize)(x)
        low, high = (-128, 127) if absmax else (-1, 1)
        got = np.asarray(got)
        if kind.endswith("_fake"):  # the codes behind a dequantized value: rint(y * s)
            if (got.shape != expected.shape or got.dtype != expected.dtype
                    or not np.isfinite(got.astype(np.float64)).all()):
                return compare(name, got, expected, "elementwise"), 0
            codes = np.clip(np.rint(got.astype(np.float64) * s), low, high)
        else:
            if got.shape != expected.shape or got.dtype != expected.dtype:
                return compare(name, got, expected, "exact"), 0
            codes = got
        bad, flips = legal_codes(codes, ref_q, boundary, v, low, high)
        if bad.any():
            wrong = np.where(bad, codes, ref_q).astype(ref_q.dtype if not kind.endswith("_fake")
                                                      else np.int64)
            m = compare(name if not kind.endswith("_fake") else f"{name} (as codes)", wrong,
                        ref_q.astype(wrong.dtype), "exact")
            return m, flips
        if kind.endswith("_fake"):  # then the value must be those codes over the scale
            flipped = dequantize(codes.astype(ref_q.dtype), s).astype(expected.dtype)
            return compare(name, got, flipped, "elementwise"), flips
        return None, flips
    return compare(name, got, expected, kind, scale), 0


def _compare_all(op, case, result, dtype, expected=None):
    """(problem, mismatch, expected, got, flips) of fn's results, or None if all agree."""
    ref_case = _in_compute_dtype(case)
    expected = op.reference(ref_case) if expected is None else expected
    scales = op.scales(ref_case) if op.scales else (None,) * len(op.outputs)
    flips = 0
    for name, got, exp, kind, scale in zip(op.outputs, result, expected, op.kinds(case),
                                           scales, strict=True):
        exp = _as_dtype(np.asarray(exp), dtype)
        mismatch, n = _compare_output(name, _as_result(got, exp), exp, kind, scale, case, dtype)
        flips += n
        if mismatch is not None:
            return str(mismatch), mismatch, exp, np.asarray(got), flips
    return None, None, None, None, flips


def _as_result(got, expected):
    """fn's result as an array; a Python scalar takes the expected dtype."""
    if isinstance(got, (int, float, np.integer, np.floating)) and not isinstance(got, bool):
        return np.asarray(got, dtype=expected.dtype)
    return np.asarray(got)


def _as_dtype(a, dtype):
    """A float32 reference result rounded to float16 / bfloat16 (inf where it overflows)."""
    with np.errstate(over="ignore"):
        return a.astype(dtype) if a.dtype.kind == "f" and dtype.kind in "fV" else a


def _search_flips(op, case, result, dtype):
    """SPEC 3/10: if fn's outputs are the reference applied to legitimately flipped codes (the
    mask, r and the product recomputed on them: one flip can move a top-K tie or the l2 norm),
    -> (number of flips, None); else None. Each row's outputs (y, dX) depend on its own codes
    only: every row keeps the flip variants its own outputs allow; dW = Σ_i g_i^T z_i then picks
    one per row. Weight-code flips (one scale per matrix) are tried first, as a whole."""
    c = _in_compute_dtype(case)
    if op.search == "ffn":
        return _search_ffn(op, case, c, result, dtype)
    if op.search == "moe":
        return _search_moe(case, c, result, dtype)
    x, w = c["x"], c["w"]
    bx, vx = absmax_boundaries(x, dtype)
    bw, vw = absmean_boundaries(w, dtype)
    expected = op.reference(c)
    if not (bx.any() or bw.any()) or any(np.shape(got) != np.shape(exp)
                                         for got, exp in zip(result, expected, strict=True)):
        return None  # no code near a rounding boundary (or a wrong shape): nothing to search
    qx, _ = absmax_quantize(x)
    qw, _ = absmean_ternarize(w)
    fwd = _bitlinear if op.outputs == ("y",) else _linear
    scales = op.scales(c)
    for w_codes, w_flips in row_variants(qw.ravel(), bw.ravel(), vw.ravel(), -1, 1):
        w_codes = w_codes.reshape(w.shape)
        for codes in _row_wise_codes(fwd, c, scales, result, dtype, w_codes, qx,
                                     bx, vx):
            codes = codes.reshape(x.shape)
            flips = int((codes != qx).sum()) + w_flips
            if flips and _compare_all(op, case, result, dtype, fwd(c, codes, w_codes))[0] is None:
                return flips, None
    return None


def _row_wise_codes(fwd, c, scales, result, dtype, w_codes, q, boundary, v):
    """Candidate codes of the whole input under weight codes ``w_codes``: per row the variants
    its own y and dX allow, combined by dW; then the batch-wide flips. Nothing if some row's
    outputs match no variant."""
    d_in = q.shape[-1]
    q, boundary, v = (a.reshape(-1, d_in) for a in (q, boundary, v))
    row_got = [np.asarray(r).reshape(q.shape[0], -1) for r in result[:2]]  # y, dX: per row
    options = []
    for i in range(q.shape[0]):
        options.append(_row_options(fwd, c, i, row_got, scales, w_codes, dtype,
                                    (q[i], boundary[i], v[i])))
        if not options[-1]:
            return  # no flip of this row explains its outputs
    if len(result) < 3:
        yield np.stack([opts[0] for opts in options])
        return
    chosen = _choose_by_grad_w(c, np.asarray(result[2]), options, w_codes)
    yield chosen
    yield from _batch_variants(q, boundary, v, dtype)  # flips outside the per-row variants
    yield _codes_from_grad_w(c, result, chosen, boundary, v, w_codes)


MAX_ROW_OPTIONS = 16  # flip variants kept per row for the dW choice


def _row_options(fwd, c, i, row_got, scales, w_codes, dtype, row):
    """Row i's code variants (at most MAX_ROW_OPTIONS, the reference's first) whose y and dX rows
    match fn's: the reference on those codes, mask and r recomputed."""
    codes, boundary, v = row
    d_out = c["w"].shape[0]
    row_case = {**c, "x": c["x"].reshape(-1, codes.size)[i:i + 1]}
    if "grad_y" in c:
        row_case["grad_y"] = c["grad_y"].reshape(-1, d_out)[i:i + 1]
    options = []
    for variant, _ in row_variants(codes, boundary, v, -128, 127):
        expected = fwd(row_case, variant[None], w_codes)
        if all(compare("", got[i:i + 1], _as_dtype(exp, dtype), "reduction", scale) is None
               for got, exp, scale in zip(row_got, expected, scales, strict=False)):
            options.append(variant)
            if len(options) == MAX_ROW_OPTIONS:
                break
    return options


def _choose_by_grad_w(c, got, options, w_codes):
    """One code row per row from ``options`` so that dW = Σ_i g_i^T z_i comes closest to fn's
    (least squares): the rows' z enter dW only as a sum. Moves one row's choice at a time, or
    two rows' at once where no single move helps (flips in two rows can cancel in dW)."""
    d_out, d_in = c["w"].shape
    g = c["grad_y"].reshape(-1, d_out).astype(np.float64)
    x = c["x"].reshape(-1, d_in)
    z = [[linear_parts("check", x[i:i + 1], c["w"], x_codes=o[None], w_codes=w_codes,
                       **_linear_kwargs(c))[0][0].astype(np.float64) for o in opts]
         for i, opts in enumerate(options)]
    pick = [0] * len(options)
    err = got.astype(np.float64) - g.T @ np.stack([zs[0] for zs in z])
    moves = [(i, o) for i, zs in enumerate(z) for o in range(1, len(zs))]
    for _ in range(2 * len(z) + 4):
        if not moves:
            break
        rows = np.array([i for i, _ in moves])
        dz = np.stack([z[i][o] - z[i][pick[i]] for i, o in moves])
        # ||err - g_i dz^T||^2 = ||err||^2 - gain, gain = 2 (g_i^T err) . dz - |g_i|^2 |dz|^2
        gain = 2 * ((g[rows] @ err) * dz).sum(1) - (g[rows] ** 2).sum(1) * (dz * dz).sum(1)
        chosen = [int(np.argmax(gain))]
        if gain[chosen[0]] <= 0:  # a pair: gain_a + gain_b - 2 (g_a . g_b)(dz_a . dz_b)
            pair = gain[:, None] + gain[None, :] - 2 * (g[rows] @ g[rows].T) * (dz @ dz.T)
            pair[rows[:, None] == rows[None, :]] = -np.inf
            chosen = list(np.unravel_index(int(np.argmax(pair)), pair.shape))
            if pair[chosen[0], chosen[1]] <= 0:
                break
        for m in chosen:
            i, o = moves[m]
            err -= np.outer(g[i], dz[m])
            pick[i] = o
        moves = [(i, o) for i, zs in enumerate(z) for o in range(len(zs)) if o != pick[i]]
    return np.stack([opts[p] for opts, p in zip(options, pick, strict=True)])


def _codes_from_grad_w(c, result, codes, boundary, v, w_codes):
    """The codes whose flips the implementation's dW = g^T z shows, column by column: in column
    j, the subset of boundary entries whose flips make the reference's dW[:, j] match (each
    flip moves z[i, j] by ±1 / s_x[i]; exact when the input is not sparsified)."""
    d_in = codes.shape[-1]
    rows = c["x"].reshape(-1, d_in)
    codes, boundary, v = codes.reshape(rows.shape).copy(), boundary.reshape(rows.shape), \
        v.reshape(rows.shape)
    g = c["grad_y"].reshape(rows.shape[0], -1)
    s_x = absmax_quantize(rows)[1]
    base = _linear(c, codes.reshape(c["x"].shape), w_codes)[2]
    scale = _linear_scales(c)[2]
    got = np.asarray(result[2])
    other = np.clip(np.where(codes == np.floor(v), np.floor(v) + 1, np.floor(v)), -128, 127)
    for j in range(d_in):
        where = np.flatnonzero(boundary[:, j])[:MAX_FLIPS_SEARCHED]
        for n in range(1, len(where) + 1):
            for chosen in itertools.combinations(where, n):
                chosen = list(chosen)
                delta = np.zeros(rows.shape[0], rows.dtype)
                delta[chosen] = (other[chosen, j] - codes[chosen, j]) / s_x[chosen, 0]
                column = base[:, j] + g.T @ delta
                if compare("dW", got[:, j], column, "reduction", scale) is None:
                    codes[chosen, j] = other[chosen, j]
                    break
            else:
                continue
            break
    return codes


def _batch_variants(q, boundary, v, dtype):
    """Codes of the whole batch as another evaluation of the scales would round them:
    v·(1 + j eps) at every boundary entry, and every boundary entry on its other side."""
    eps = float(C.finfo(dtype).eps)
    for j in (1, -1, 2, -2, 4, -4, 8, -8):
        yield np.where(boundary, np.clip(np.rint(v * (1 + j * eps)), -128, 127), q).astype(q.dtype)
    other = np.where(q == np.floor(v), np.floor(v) + 1, np.floor(v))
    yield np.where(boundary, np.clip(other, -128, 127), q).astype(q.dtype)


def _search_ffn(op, case, c, result, dtype):
    """The FFN row by row -- exact for the activations' codes: a token's y depends on its own
    row only (codes, masks and scales are per row; no sum runs over rows): flips of h's codes
    (up and gate), then of the codes of f = u * act(g) recomputed on them (down). The hidden f
    is recomputed per row, since a batched matmul may round u and g otherwise (BLAS takes
    another path): its flips are counted against the batched reference's f. Weight codes stay
    the reference's (SPEC 4's one scale per matrix; the "half" weights round exactly)."""
    y_ref, f_ref = _ffn_parts(c)
    if not c["bits"] or np.shape(result[0]) != y_ref.shape:
        return None
    if not (absmax_boundaries(c["h"], dtype)[0].any() or absmax_boundaries(f_ref, dtype)[0].any()):
        return None
    h = c["h"].reshape(-1, c["h"].shape[-1])
    qf_ref = absmax_quantize(f_ref)[0].reshape(h.shape[0], -1)
    got = np.asarray(result[0]).reshape(-1, h.shape[-1])
    scale = op.scales(c)[0].reshape(-1, h.shape[-1])
    flips = 0
    for i in range(h.shape[0]):
        found = _ffn_row_codes(c, h[i:i + 1], got[i:i + 1], scale[i:i + 1], dtype)
        if found is None:
            return None
        h_flips, f_codes = found
        flips += h_flips + int((f_codes != qf_ref[i]).sum())
    return flips, None


def _ffn_row_codes(c, h, got, scale, dtype):
    """(h flips, f codes) of the first flip variants that make this row's y fn's, or None."""
    row = {**c, "h": h}
    qh, _ = absmax_quantize(h)
    bh, vh = absmax_boundaries(h, dtype)
    for h_codes, n in row_variants(qh[0], bh[0], vh[0], -128, 127):
        _, f = _ffn_parts(row, h_codes[None])
        qf, _ = absmax_quantize(f)
        bf, vf = absmax_boundaries(f, dtype)
        for f_codes, _ in row_variants(qf[0], bf[0], vf[0], -128, 127):
            y = _as_dtype(_ffn_parts(row, h_codes[None], f_codes[None])[0], dtype)
            if compare("y", got, y, "reduction", scale) is None:
                return n, f_codes
    return None


MAX_EXPERT_COMBINATIONS = 64  # per token and h variant: the experts' hidden-code variants


def _search_moe(case, c, result, dtype):
    """The MoE token by token (as the FFN: no sum runs over tokens; the routing is dense float,
    no codes): y_i = Σ_chosen p_e GLU_e(h_i), h_i's codes shared by its experts, each expert's
    hidden f its own. Tries h_i's variants, and for each the combinations of the experts' f
    variants (flips counted against the token's own reference: the batched one runs each
    expert on its routed tokens at once, and may round otherwise); aux (routing only) must
    match as it is."""
    from .gpt import route

    y_ref, aux_ref = _moe(c)
    got = np.asarray(result[0])
    aux_ref = _as_dtype(np.asarray(aux_ref), dtype)
    if got.shape != y_ref.shape or compare("aux", _as_result(result[1], aux_ref), aux_ref,
                                           "reduction") is not None:
        return None
    probs, chosen = route(c["h"], c["router"], c["top_experts"])
    scale = np.abs(y_ref)  # as the plain comparison: relative to the largest |y|
    flips = 0
    for i in range(got.shape[0]):
        found = _moe_token_codes(c, c["h"][i:i + 1], probs[i], np.flatnonzero(chosen[i]),
                                 got[i:i + 1], scale, dtype)
        if found is None:
            return None
        flips += found
    return flips, None


def _moe_token_codes(c, h, p, experts, got, scale, dtype):
    """Flips (counted against this token's own reference) that make y_i fn's, or None."""
    glu = {"k": None, "rescale": "none", "bits": c["bits"], "act": c["act"]}
    qh, _ = absmax_quantize(h)
    bh, vh = absmax_boundaries(h, dtype)
    for h_codes, n in row_variants(qh[0], bh[0], vh[0], -128, 127):
        per_expert = []
        for e in experts:
            ex = {**glu, "h": h, "up": c["up"][e], "gate": c["gate"][e], "down": c["down"][e]}
            _, f = _ffn_parts(ex, h_codes[None])
            qf, _ = absmax_quantize(f)
            bf, vf = absmax_boundaries(f, dtype)
            per_expert.append([(p[e] * _ffn_parts(ex, h_codes[None], codes[None])[0],
                                int((codes != qf[0]).sum()))
                               for codes, _ in itertools.islice(
                                   row_variants(qf[0], bf[0], vf[0], -128, 127), 8)])
        for combo in itertools.islice(itertools.product(*per_expert), MAX_EXPERT_COMBINATIONS):
            y = _as_dtype(sum((part for part, _ in combo), np.zeros_like(h)), dtype)
            if compare("y", got, y, "reduction", scale) is None:
                return n + sum(m for _, m in combo)
    return None


# ---- calling fn: NumPy or torch, function or Module -------------------------------------------


def _is_module(fn):
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(fn, torch.nn.Module) or (inspect.isclass(fn)
                                                and issubclass(fn, torch.nn.Module))


def _takes(fn):
    """The keyword names fn accepts (None: any, it has **kwargs or no inspectable signature)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


class _Caller:
    """Calls fn on a case the way it wants: NumPy arrays, or torch tensors on ``device``; a
    Module (class or instance) with its weight set from the case."""

    def __init__(self, op_name, fn, device, framework):
        self.op_name, self.fn, self.device = op_name, fn, device
        self.module = _is_module(fn)
        if self.module and op_name != "bitlinear":
            raise ValueError(f"check: an nn.Module is checked as op 'bitlinear' (module(x) with "
                             f".weight = w), not {op_name!r}; wrap it in a function for that")
        self.framework = "torch" if self.module else framework
        if self.framework not in ("auto", "numpy", "torch"):
            raise ValueError(f"check: framework must be auto, numpy or torch, got {framework!r}")
        if self.framework != "numpy" or device != "cpu":
            self._torch()

    def _torch(self):
        try:
            import torch
        except ImportError:
            raise ValueError("check: torch is not installed (pip install torch)") from None
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"check: device {self.device!r} asked for, but CUDA is not available")
        return torch

    def __call__(self, op, case):
        args = [case[name].copy() for name in op.inputs]  # copies: fn may not write into ours
        kwargs = {k: v for k, v in case.items() if k not in op.inputs}
        if self.framework == "numpy":
            return self.fn(*args, **kwargs)
        if self.framework == "auto":  # NumPy first; torch tensors if fn will not take arrays
            try:
                result = self.fn(*args, **kwargs)
            except Exception:
                if "torch" not in sys.modules:
                    raise
                try:
                    result = self._call_torch(op, case, args, kwargs)
                except Exception:
                    args = [case[name].copy() for name in op.inputs]
                    result = self.fn(*args, **kwargs)  # raise NumPy's error, not torch's
                self.framework = "torch"
                return result
            self.framework = "numpy"
            return result
        return self._call_torch(op, case, args, kwargs)

    def _call_torch(self, op, case, args, kwargs):
        torch = self._torch()
        grads = "grad_y" in op.inputs
        tensors = {name: _to_torch(torch, a, self.device) for name, a in zip(op.inputs, args,
                                                                            strict=True)}
        if self.module:
            module = self._module(case["w"].shape, tensors["x"].dtype)
            with torch.no_grad():
                module.weight.data = tensors["w"].to(module.weight.dtype)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            result = module(tensors["x"])
        else:
            if grads:
                for name in op.inputs:
                    if name != "grad_y":
                        tensors[name].requires_grad_(True)
            result = self.fn(*tensors.values(), **kwargs)
            if grads and isinstance(result, torch.Tensor):  # y alone: autograd gives the rest
                result.backward(tensors["grad_y"])
                result = (result, *(tensors[n].grad for n in op.inputs if n != "grad_y"))
        return _from_torch(torch, result)

    def _module(self, shape, dtype):
        """The instance given, or a new one of the class in the case's dtype and device."""
        if not inspect.isclass(self.fn):
            return self.fn
        d_out, d_in = shape
        try:
            module = self.fn(d_in, d_out, bias=False)
        except TypeError:
            module = self.fn(d_in, d_out)
        return module.to(device=self.device, dtype=dtype)


def _to_torch(torch, a, device):
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    return torch.from_numpy(a).to(device)


def _from_torch(torch, result):
    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(C.numpy_dtype("bfloat16"))
        return t.numpy()

    if isinstance(result, (tuple, list)):
        return type(result)(one(t) for t in result)
    return one(result)


# ---- running a check ------------------------------------------------------------------------


@dataclass
class Report:
    """The outcome of ``check``: passed, or the first failing case (shrunk) and what went wrong."""

    op: str
    passed: bool
    cases_run: int
    seed: int | None
    case: dict = field(default_factory=dict)  # the failing input: arrays and parameters
    problem: str = ""  # what went wrong, one line
    mismatch: Mismatch | None = None  # the largest error and its index, if outputs differed
    expected: np.ndarray | None = None
    got: np.ndarray | None = None
    boundary_flips: int = 0  # SPEC 3 boundary flips seen in the cases that passed
    notes: list = field(default_factory=list)  # what the check did not cover, and why
    saved: list = field(default_factory=list)  # the .npz and the reproduction script
    shrunk: bool = True  # the failing case is hypothesis' smallest (else a must-run example)

    def __str__(self):
        head = f"minisparse check {self.op}: "
        flips = (f"; {self.boundary_flips} boundary flips (SPEC 3: legitimate, another "
                 f"evaluation order of the scale) counted apart" if self.boundary_flips else "")
        if self.passed:
            lines = [head + f"OK, {self.cases_run} cases agree with the reference "
                            f"(seed {self.seed}){flips}"]
        else:
            found = "the smallest found" if self.shrunk else "a must-run example"
            lines = [head + f"FAILED after {self.cases_run} cases (seed {self.seed}){flips}",
                     f"  failing input ({found}):"]
            for name, value in self.case.items():
                if isinstance(value, np.ndarray):
                    lines.append(f"    {name}: {value.dtype} {value.shape} = {_show(value, 6)}")
                else:
                    lines.append(f"    {name} = {value!r}")
            lines.append(f"  {self.problem}")
            if self.expected is not None:
                lines.append(f"    expected = {_show(self.expected, 15)}")
                lines.append(f"    got      = {_show(self.got, 15)}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  saved: {path}" for path in self.saved]
        return "\n".join(lines)


def _show(a, indent):
    a = np.asarray(a)
    if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
        a = a.astype(np.float32)
    text = np.array2string(a, threshold=64, max_line_width=100 - indent, precision=8)
    return text.replace("\n", "\n" + " " * indent)


class _CaseFailed(Exception):
    pass


def run_case(op_name, fn, case, *, device="cpu", framework="auto"):
    """One case through fn and the reference -> (problem or None, mismatch, expected, got,
    boundary flips). What a reproduction script calls."""
    return _run_case(OPS[op_name], _Caller(op_name, fn, device, framework), case)


def _run_case(op, caller, case):
    dtype = _case_dtype(case, op)
    try:
        result = caller(op, case)
    except Exception as e:  # a crash on valid input is a failure like any other
        return f"fn raised {type(e).__name__}: {e}", None, None, None, 0
    if len(op.outputs) > 1:
        if not isinstance(result, (tuple, list)) or len(result) != len(op.outputs):
            return (f"fn must return a tuple {op.outputs}, got {type(result).__name__}"
                    f"{f' of length {len(result)}' if isinstance(result, (tuple, list)) else ''}",
                    None, None, None, 0)
    else:
        result = (result,)
    outcome = _compare_all(op, case, result, dtype)
    if outcome[0] is not None and op.search and case.get("bits", 1.58):
        found = _search_flips(op, case, result, dtype)
        if found is not None:
            return None, None, None, None, found[0]
    return outcome


def check(op_name, user_fn, *, max_examples=200, seed=0, dtypes=("float32", "float64"),
          min_size=1, max_size=4096, fixed=None, device="cpu", framework="auto",
          save=None, target=None) -> Report:
    """Run ``user_fn`` on generated cases of ``op_name`` (calling convention: the module
    docstring) and compare with the reference -> Report (the first failure, shrunk).

    ``dtypes``: any of float64, float32, float16, bfloat16 (what fn claims to support);
    ``min_size`` / ``max_size`` bound every axis; ``fixed`` holds parameters at one value, e.g.
    {"bits": 1.58, "rescale": "none"}; ``seed`` fixes the cases (None: fresh randomness);
    ``device`` "cpu" or "cuda" for torch; ``save`` a directory: a failure is written there as
    ``.npz`` plus a reproduction script (``target``: how the script imports fn, e.g.
    "mykernels.py:topk"; default fn's module and name)."""
    if op_name not in OPS:
        raise ValueError(f"check: unknown op {op_name!r}; choose one of {sorted(OPS)}")
    if not callable(user_fn):
        raise TypeError(f"check: user_fn must be callable, got {type(user_fn).__name__}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"check: max_examples must be a positive integer, got {max_examples!r}")
    op = OPS[op_name]
    fixed = dict(fixed or {})
    caller = _Caller(op_name, user_fn, device, framework)
    notes = []
    if caller.module and not inspect.isclass(user_fn):  # an instance: shape and dtype fixed
        fixed.setdefault("d_out", user_fn.weight.shape[0])
        fixed.setdefault("d_in", user_fn.weight.shape[1])
        dtypes = (str(user_fn.weight.dtype).removeprefix("torch."),)
        notes.append(f"a Module instance: only D_in={fixed['d_in']}, D_out={fixed['d_out']}, "
                     f"{dtypes[0]}")
    takes = _takes(user_fn) if not caller.module else set()
    if op_name in ("sparsify", "sparse_linear") and takes is not None and "block" not in takes:
        fixed["block"] = None  # fn has no N:M support: draw top-K only, and say so
        notes.append("fn takes no `block` argument: N:M block cases were not run")
    ctl = C.Controls(tuple(dtypes), min_size, max_size, fixed)
    runs, flips, failures = [0], [0], []

    def run(case):
        runs[0] += 1
        if op_name in ("sparsify", "sparse_linear") and "block" not in (takes or {"block"}):
            case.pop("block", None)
        outcome = _run_case(op, caller, case)
        if outcome[0] is not None:
            failures.append((case, outcome))
            raise _CaseFailed
        flips[0] += outcome[4]

    # The must-run examples first (the classic mistakes, found in a few cases); then generated
    # cases, which hypothesis shrinks: a failure is reported as the small typical case found.
    example_failure = None
    for case in _examples(op_name, op, ctl, takes or {"block"}):
        try:
            run(case)
        except _CaseFailed:
            example_failure = failures.pop()
            break
    test = given(case=op.cases(ctl))(run)
    # derandomize=False: ``seed`` decides the cases, whatever hypothesis profile is loaded
    test = settings(max_examples=max_examples, deadline=None, database=None,
                    derandomize=False, verbosity=Verbosity.quiet, report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck))(test)
    if seed is not None:
        test = hypothesis_seed(seed)(test)
    try:
        test()
    except Exception:  # _CaseFailed, or hypothesis' Flaky if fn is not deterministic
        if not failures:
            raise
    if not failures and example_failure is None:
        return Report(op_name, True, runs[0], seed, boundary_flips=flips[0], notes=notes)
    if failures:
        case, (problem, mismatch, expected, got, _) = failures[-1]  # the shrunk one is last
    else:
        case, (problem, mismatch, expected, got, _) = example_failure
        notes.append("this is a must-run example (not shrunk): no generated case failed")
    report = Report(op_name, False, runs[0], seed, case, problem, mismatch, expected, got,
                    flips[0], notes, shrunk=bool(failures))
    if save is not None:
        report.saved = save_failure(report, save, target or _target_of(user_fn), device)
    else:
        report.notes.append("save=DIR (CLI: --save DIR) keeps this case as .npz plus a script "
                            "that reruns it")
    return report


def assert_conforms(op_name, user_fn, **kwargs) -> Report:
    """``check`` for test suites: AssertionError with the readable report unless it passes."""
    report = check(op_name, user_fn, **kwargs)
    if not report.passed:
        raise AssertionError(str(report))
    return report


# ---- saving a failure: .npz plus a script that reruns it --------------------------------------


def save_failure(report, out_dir, target, device="cpu"):
    """Write the failing case as ``<op>-failure.npz`` and ``<op>-failure.py`` (loads the case,
    imports ``target``, runs it and the reference, prints the difference) -> the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    npz, script = out_dir / f"{report.op}-failure.npz", out_dir / f"{report.op}-failure.py"
    arrays = {f"input.{k}": _storable(v) for k, v in report.case.items()
              if isinstance(v, np.ndarray)}
    dtypes = {k: v.dtype.name for k, v in report.case.items() if isinstance(v, np.ndarray)}
    params = {k: v for k, v in report.case.items() if not isinstance(v, np.ndarray)}
    np.savez(npz, op=np.array(report.op), params=np.array(json.dumps(params)),
             dtypes=np.array(json.dumps(dtypes)), **arrays)
    module, _, attr = target.rpartition(":")
    if module.endswith(".py"):  # the script runs from anywhere: absolute paths
        target = f"{Path(module).resolve()}:{attr}"
    script.write_text(
        f'"""Rerun the failing case minisparse check {report.op} found (seed {report.seed}).\n\n'
        f"{report.problem}\n"
        f'"""\nimport sys\nfrom pathlib import Path\n\n'
        f"from minisparse.oracle.harness import load_case, load_function, run_case\n\n"
        f"sys.path.insert(0, {str(Path.cwd())!r})  # where check ran: its modules import\n"
        f"case = load_case(Path(__file__).with_name({npz.name!r}))\n"
        f"fn = load_function({target!r})\n"
        f'problem, mismatch, expected, got, flips = run_case({report.op!r}, fn, case, '
        f'device={device!r})\n'
        f'print("input:", {{k: getattr(v, "shape", v) for k, v in case.items()}})\n'
        f'print(problem or f"agrees with the reference ({{flips}} boundary flips)")\n'
        f"if expected is not None:\n"
        f'    print("expected:", expected)\n    print("got:     ", got)\n'
        f'    print("difference:", got.astype(float) - expected.astype(float))\n')
    return [npz, script]


def _storable(a):
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def load_case(path):
    """A case saved by ``save_failure`` -> dict of arrays (in their dtypes) and parameters."""
    with np.load(path, allow_pickle=False) as data:
        case = json.loads(str(data["params"]))
        dtypes = json.loads(str(data["dtypes"]))
        for key in data.files:
            if key.startswith("input."):
                name = key[len("input."):]
                case[name] = data[key].astype(C.numpy_dtype(dtypes[name])
                                              if dtypes[name] == "bfloat16" else dtypes[name])
    for name in ("block",):
        if isinstance(case.get(name), list):
            case[name] = tuple(case[name])
    return case


def _target_of(fn):
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None)
    path = getattr(sys.modules.get(module), "__file__", None)
    if module in (None, "__main__") or name is None or "<" in name:
        return f"{path or '<your module>'}:{name or '<your function>'}"
    return f"{module}:{name}"


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
        try:
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ValueError(f"cannot load {module_name}: {e}") from None
    else:
        added = "" not in sys.path  # like `python -m`: modules in the working directory import
        if added:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except (ImportError, SyntaxError) as e:
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

