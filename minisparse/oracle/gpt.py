"""SPEC section 10: the whole model as pure functions of a params dict (picoGPT-style).

``params`` maps the SPEC section 6 names to NumPy arrays (all float32 or all float64; the
computation keeps that dtype), ``config`` is a dict of SPEC field names or a GPTConfig.
The functions build a throwaway model on the reference "numpy" backend, never write to
``params``, and leave the engine's grad mode as they found it.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import tensor
from ..model import GPT, GPTConfig


def gpt_forward(params: dict, config, idx) -> np.ndarray:
    """Logits [B, T, V] of token ids idx [B, T] (SPEC section 6)."""
    model, idx = _model(params, config, idx)
    with tensor.no_grad():
        logits, _ = model(idx)
    return logits.data


def gpt_loss_and_grads(params: dict, config, idx, targets) -> tuple[float, dict]:
    """(mean cross-entropy of next tokens ``targets`` [B, T], {name: dloss/dparam}) with the
    STE rules of SPEC sections 1-4; grads have the params' shapes and dtype."""
    model, idx = _model(params, config, idx)
    targets = np.asarray(targets)
    if targets.shape != idx.shape:
        raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
    with _grad_enabled():
        _, loss = model(idx, targets)
        loss.backward()
    grads = {
        name: np.zeros_like(p.data) if p.grad is None else p.grad
        for name, p in model.named_parameters()
    }
    return float(loss.item()), grads


def _model(params, config, idx):
    """A GPT holding copies of ``params`` after checking params, config and idx."""
    if not isinstance(config, GPTConfig):
        config = GPTConfig.from_dict(dict(config))
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of name -> ndarray, got {type(params).__name__}")
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be integer token ids [B, T], got {idx.dtype} {idx.shape}")
    if idx.shape[1] > config.context:
        raise ValueError(f"idx has T={idx.shape[1]} positions, more than context={config.context}")
    return GPT.from_params(config, params, backend="numpy"), idx


@contextlib.contextmanager
def _grad_enabled():
    """Record the graph even inside a caller's no_grad() block, then restore the mode."""
    previous, tensor._grad_enabled = tensor._grad_enabled, True
    try:
        yield
    finally:
        tensor._grad_enabled = previous
