"""Tiny models for the MoE and threshold tests: weights larger than the init (so routing,
top-K and thresholds do real work), token batches, and the engine-vs-oracle check."""

import math

import numpy as np

from minisparse.model import GPT, GPTConfig
from minisparse.oracle import gpt_loss_and_grads

TINY = dict(vocab_size=11, context=8, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32)


def tiny_model(dtype=np.float64, backend="numpy", tau=0.0, seed=0, **config):
    """GPT of TINY + ``config`` with normal(0, 0.3) matrices, gains near 1 and every threshold
    parameter (if any) set to ``tau``."""
    model = GPT(GPTConfig(**{**TINY, **config}), np.random.default_rng(seed), dtype=dtype,
                backend=backend)
    rng = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        if ".tau." in name:
            p.data[...] = tau
        else:
            p.data[...] = rng.normal(1.0 if p.ndim == 1 else 0.0, 0.3 if p.ndim == 2 else 0.1,
                                     p.shape)
    return model


def tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], shape)


def assert_matches_oracle(model):
    """Loss and every gradient of ``model`` equal minisparse.oracle's to 1e-6 (float64); a
    parameter outside the graph (an idle expert, a threshold) must get zeros."""
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    _, loss = model(idx, targets)
    loss.backward()
    oracle_loss, grads = gpt_loss_and_grads(model.params_dict(), model.config.to_dict(), idx,
                                            targets)
    assert math.isclose(oracle_loss, loss.item(), rel_tol=1e-6)
    for name, p in model.named_parameters():
        grad = np.zeros_like(p.data) if p.grad is None else p.grad
        np.testing.assert_allclose(grads[name], grad, rtol=1e-6, atol=1e-9, err_msg=name)


def assert_backends_agree(ref):
    """The numba twin of the numpy-backend ``ref`` gives the same logits and gradients (float64
    to 1e-9); returns it (with grads) for further checks."""
    fast = GPT.from_params(ref.config, ref.params_dict(), backend="numba")
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    for m in (ref, fast):
        m(idx, targets)[1].backward()
    np.testing.assert_allclose(fast(idx)[0].data, ref(idx)[0].data, rtol=1e-10, atol=1e-12)
    for (name, p), (_, q) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            np.testing.assert_allclose(q.grad, p.grad, rtol=1e-9, atol=1e-12, err_msg=name)
    return fast
