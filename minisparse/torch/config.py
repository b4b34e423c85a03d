"""The model config as a plain dict of every SPEC field (sections 6 and 11).

``minisparse.model.GPTConfig`` validates every field, so each option is checked in one place;
older configs without the fields added later (``ffn``, ``n_experts``, ``top_experts``,
``moe_aux``, ``sparsify``) take their SPEC defaults.
"""

from __future__ import annotations

from ..model import GPTConfig


def model_config(config) -> dict:
    """A validated dict of every SPEC field from a GPTConfig or a dict (unknown keys are errors)."""
    if not isinstance(config, GPTConfig):
        config = GPTConfig.from_dict(dict(config))
    return config.to_dict()
