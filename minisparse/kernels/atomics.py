"""Two atomic operations on an int64 array element, for workers that share a compiled call.

``atomic_add(a, i, v)`` adds v to a[i] and returns the old value in one indivisible step
(LLVM ``atomicrmw add seq_cst``: x86 ``lock xadd``), so two threads asking for "the next tile"
never get the same one; its full barrier also publishes every store made before it.
``atomic_load(a, i)`` reads a[i] with acquire order: the stores another thread made before its
``atomic_add`` on a[i] are visible after a load that sees that add. Under ``NUMBA_DISABLE_JIT``
(one interpreter thread: prange is a plain range) they are the plain Python operations.
"""

from __future__ import annotations

from numba import config, types
from numba.core import cgutils
from numba.extending import intrinsic


def _pointer(context, builder, sig, args):
    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    i = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)


def _add_codegen(context, builder, sig, args):
    v = context.cast(builder, args[2], sig.args[2], types.int64)
    return builder.atomic_rmw("add", _pointer(context, builder, sig, args), v, "seq_cst")


def _load_codegen(context, builder, sig, args):
    return builder.load_atomic(_pointer(context, builder, sig, args), "acquire", align=8)


if config.DISABLE_JIT:
    def atomic_add(a, i, v):
        """old = a[i]; a[i] += v; return old (interpreted: one thread)."""
        old = int(a[i])
        a[i] += v
        return old

    def atomic_load(a, i):
        """a[i] (interpreted: one thread)."""
        return int(a[i])
else:
    @intrinsic
    def atomic_add(typingctx, a, i, v):
        """old = a[i]; a[i] += v; return old -- atomically (a: int64 1-D array)."""
        return types.int64(a, i, v), _add_codegen

    @intrinsic
    def atomic_load(typingctx, a, i):
        """a[i] read atomically with acquire order (a: int64 1-D array)."""
        return types.int64(a, i), _load_codegen
