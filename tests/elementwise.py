"""Helpers of the tests of compiled float32 functions (tanh32, exp32)."""

import re

import numpy as np
from numba import njit


def elementwise(fn):
    """(loop, apply): ``loop(x, out)`` compiles out[j] = fn(x[j]) as the kernels' loops do
    (numpy error model: the loop can vectorise); ``apply(x)`` returns a new out."""

    @njit(error_model="numpy")
    def loop(x, out):
        for j in range(x.shape[0]):
            out[j] = fn(x[j])

    def apply(x):
        out = np.empty_like(x)
        loop(x, out)
        return out

    return loop, apply


def same_bits(a, b):
    """Equal float32 bit patterns, or both NaN."""
    return (a.view(np.int32) == b.view(np.int32)) | (np.isnan(a) & np.isnan(b))


def interpreted(fn, x):
    """fn applied to each x as the plain Python function (what NUMBA_DISABLE_JIT runs)."""
    python = getattr(fn, "py_func", fn)
    return np.array([python(v) for v in x], np.float32)


def calls(loop, apply, names):
    """The calls of ``names`` (regex alternatives) in the compiled loop's LLVM IR. Numba's
    np.exp of a float32 is an LLVM intrinsic there (llvm.exp.f32, llvm.exp.v8f32 once
    vectorised), which codegen lowers to a libm call per lane: look for those too."""
    apply(np.zeros(4, np.float32))
    return re.findall(rf"call [^\n]*@({names})\b", loop.inspect_llvm(loop.signatures[0]))
