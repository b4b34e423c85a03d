"""The model config as a plain dict of every SPEC field (sections 6 and 11).

``minisparse.model.GPTConfig`` validates every field it knows; the fields added later for
mixtures of experts and threshold sparsity (``ffn``, ``n_experts``, ``top_experts``,
``moe_aux``, ``sparsify``) are validated here only while the engine's GPTConfig lacks them, so
each option is still checked in one place.
"""

from __future__ import annotations

import dataclasses
import numbers

from ..model import GPTConfig

LATER_FIELDS = {"ffn": "glu", "n_experts": None, "top_experts": None, "moe_aux": 0.01,
                "sparsify": "topk"}  # SPEC 6 and 11 defaults: older configs stay valid
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}


def model_config(config) -> dict:
    """A validated dict of every SPEC field from a GPTConfig or a dict (missing later fields
    take their defaults; unknown keys are errors)."""
    d = config.to_dict() if isinstance(config, GPTConfig) else dict(config)
    unknown = sorted(set(d) - _ENGINE_FIELDS - set(LATER_FIELDS))
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; valid keys are "
                         f"{sorted(_ENGINE_FIELDS | set(LATER_FIELDS))}")
    base = GPTConfig.from_dict({k: v for k, v in d.items() if k in _ENGINE_FIELDS}).to_dict()
    later = {k: d.get(k, default) for k, default in LATER_FIELDS.items()
             if k not in _ENGINE_FIELDS}
    if later:  # the engine's GPTConfig does not validate these yet
        _check_later(base | later)
    return {**LATER_FIELDS, **base, **later}


def _check_later(c: dict) -> None:
    if c["ffn"] not in ("glu", "moe"):
        raise ValueError(f'ffn must be "glu" or "moe", got {c["ffn"]!r}')
    if c["sparsify"] not in ("topk", "threshold"):
        raise ValueError(f'sparsify must be "topk" or "threshold", got {c["sparsify"]!r}')
    moe_aux = c["moe_aux"]
    if isinstance(moe_aux, bool) or not isinstance(moe_aux, numbers.Real) or not moe_aux >= 0:
        raise ValueError(f"moe_aux must be a number >= 0, got {moe_aux!r}")
    n, k = c["n_experts"], c["top_experts"]
    if c["ffn"] == "glu":
        if n is not None or k is not None:
            raise ValueError(f'n_experts and top_experts need ffn "moe", got n_experts={n!r}, '
                             f"top_experts={k!r}")
    elif not (_int(n) and n >= 2 and _int(k) and 1 <= k <= n):
        raise ValueError(f"ffn moe needs n_experts >= 2 and 1 <= top_experts <= n_experts, got "
                         f"n_experts={n!r}, top_experts={k!r}")
    if c["sparsify"] == "threshold" and (c["block"] is not None or c["rescale"] != "none"):
        raise ValueError(f'sparsify "threshold" needs block null and rescale "none", got '
                         f'block={c["block"]!r}, rescale={c["rescale"]!r}')


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
