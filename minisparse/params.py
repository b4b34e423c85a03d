"""A params dict against the names and shapes it must have (SPEC 6's names; SPEC 10's API).

Shared by the engine's ``GPT.from_params`` / checkpoints and the functional oracle: each side
works out the shapes itself (from its own model description); this only compares.
"""

from __future__ import annotations

import numpy as np


def check_named_arrays(shapes: dict, params: dict) -> np.dtype:
    """The one float dtype of ``params`` after checking it has exactly the names of ``shapes``,
    those shapes, float32 or float64 throughout and finite values; else a ValueError naming the
    first problem."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of name -> ndarray, got {type(params).__name__}")
    missing, unexpected = sorted(shapes.keys() - params.keys()), sorted(params.keys() - shapes)
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing}, "
                         f"unexpected {unexpected}")
    dtypes = set()
    for name, shape in shapes.items():
        a = np.asarray(params[name])
        if a.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {a.shape}, the config needs {shape}")
        if a.dtype not in (np.float32, np.float64):
            raise ValueError(f"params[{name!r}] has dtype {a.dtype}; need float32 or float64")
        if not np.isfinite(a).all():
            raise ValueError(f"params[{name!r}] has non-finite values")
        dtypes.add(a.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"params mix dtypes {sorted(map(str, dtypes))}; use one float dtype")
    return dtypes.pop()
