"""minisparse: Q-Sparse (top-K activation sparsity + STE) and BitNet b1.58 in NumPy.

Layers, bottom to top: ``tensor`` (autograd engine) -> ``functions`` (differentiable ops) ->
``sparsity`` / ``quant`` (SPEC sections 1-4) -> ``linear`` (SPEC section 5) -> ``model`` ->
``train``. ``oracle`` is the stable functional API for checking other implementations;
``kernels`` is the Numba fast path behind the same interface.
"""

import os

# OpenBLAS's and Numba's thread pools spin while idle by default; on a laptop's few cores the
# two pools then steal each other's cores and training on small matrices runs several times
# slower. Ask both to sleep when idle, Numba's (GNU OpenMP) after a short spin: 30,000 turns,
# ~0.3 ms by libgomp's own rule of thumb (100,000 per ms), a tenth of its default. Waking a
# sleeping thread costs 40-75 us here, paid by every threaded kernel call that follows a
# pause; with the spin, calls back to back (a model's projections, decode tokens) find the
# thread awake (an empty parallel region: 50 -> 2 us; training tokens/s unchanged). They read
# this when they load, so it takes effect when minisparse is imported before NumPy (always so
# for the `minisparse` command); a user's own setting wins. (threadpoolctl, used by
# scaling.py, can cap a pool's threads once it is loaded but not set these wait policies,
# which the libraries read only as they load; the previous measurement found sparse training
# 3x faster on 2 cores with them.)
THREAD_POOL_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000",
                        "OPENBLAS_THREAD_TIMEOUT": "4"}
SET_BY_US = tuple(name for name in THREAD_POOL_DEFAULTS if name not in os.environ)
for _name in SET_BY_US:  # (a child process of other software gets the user's own environment)
    os.environ[_name] = THREAD_POOL_DEFAULTS[_name]

__version__ = "0.1.0"

__all__ = ["Module", "Parameter", "Tensor", "no_grad", "__version__"]

_LAZY = {"Module": "nn", "Parameter": "nn", "Tensor": "tensor", "no_grad": "tensor"}


def __getattr__(name):
    """``minisparse.Tensor`` etc., imported on first use: ``import minisparse`` stays cheap,
    so the command line can catch a Ctrl-C during its (NumPy, Numba) imports."""
    if name not in _LAZY:
        raise AttributeError(f"module 'minisparse' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"minisparse.{_LAZY[name]}"), name)
