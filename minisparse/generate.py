"""Sampling from a GPT with a KV cache: temperature, top-k, a seed, a prompt string or ids.

The cache holds at most ``config.context`` positions. While the sequence fits, each new token
costs one single-position forward pass. When the cache is full, the window slides by half a
context at once: the last ``(context + 1) // 2`` tokens are run again as one prefill into an
emptied cache, which then fills up again one position per token. (Keys in layers above the
first depend on everything the window attends to, so entries computed for an earlier window
are stale: a sliding cache would differ from the full forward, and nanoGPT's crop, a full
pass over the last ``context`` tokens for every token, costs ``context`` positions per token.)
The logits of every token therefore equal a full forward pass over its visible window, the
tokens from the last slide on: between half a context and a whole one.

A packed model (``kernels.pack_model``) whose config the compiled decode step covers runs
each position through ``kernels.decode.Decoder`` (one compiled call per token) instead of the
engine; a window is refilled by one compiled call over its positions (``Decoder.prefill``,
block by block over all of them), which the causal mask makes equal to the full forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from numba import njit

from .model import GPT, KVCache


def sample_tokens(
    model: GPT,
    ids,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    rng: np.random.Generator,
) -> Iterator[int]:
    """Yield ``max_new_tokens`` token ids sampled one at a time after the prompt ``ids``."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token to start from")
    _check_options(max_new_tokens, temperature, top_k)
    context = model.config.context
    decoder = compiled_decoder(model)
    cache = KVCache(model.config) if decoder is None else decoder
    for step in range(max_new_tokens):
        if step == 0 or cache.length == context:  # (re)fill the cache from the visible window
            cache.reset()
            new = ids[-context:] if step == 0 else ids[-visible_after_slide(context):]
        else:
            new = ids[-1:]
        if decoder is None:
            logits = model(np.array([new]), kv_cache=cache)[0].data[0, -1]  # (1, len(new), V)
        else:
            logits = decoder.prefill(new)[-1]
        token = pick_token(logits, temperature, top_k, rng)
        ids.append(token)
        yield token


def visible_after_slide(context: int) -> int:
    """Tokens the window keeps when the cache is full and it slides: half a context, >= 1."""
    return (context + 1) // 2


def compiled_decoder(model):
    """The compiled decode step for a packed model it covers, else None (the engine path)."""
    if not any(getattr(p, "packed", None) is not None for _, p in model.named_parameters()):
        return None
    from numba import config

    if config.DISABLE_JIT:  # the step would run as Python loops: the engine's NumPy is faster
        return None
    from .kernels.decode import decoder_for

    return decoder_for(model)


def generate(
    model: GPT,
    prompt,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    tokenizer=None,
) -> list[int]:
    """Prompt (a string, with ``tokenizer``, or token ids) followed by ``max_new_tokens``
    sampled ids. ``temperature=0`` is greedy; ``top_k`` keeps the k most likely tokens."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a string prompt needs a tokenizer (or pass token ids)")
        prompt = tokenizer.encode(prompt)
    ids = [int(i) for i in np.asarray(prompt).reshape(-1)]
    rng = np.random.default_rng(seed)
    new = sample_tokens(
        model, ids, max_new_tokens, temperature=temperature, top_k=top_k, rng=rng
    )
    return ids + list(new)


def pick_token(logits: np.ndarray, temperature: float, top_k: int | None,
               rng: np.random.Generator) -> int:
    """One id from logits [V]: argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (one rng.random())."""
    u = rng.random() if temperature != 0 else 0.0  # greedy draws nothing
    token = _pick(logits, float(temperature), 0 if top_k is None else top_k, u)
    if token < 0:
        raise ValueError("the model's logits are not finite; its parameters may be diverged")
    return int(token)


@njit(cache=True)
def _pick(logits, temperature, top_k, u):
    """pick_token for one uniform draw u in [0, 1) (-1 if a logit is not finite), compiled:
    as a dozen NumPy calls it took 15-17 us a character here, now 2 (sample: 3,020 -> 3,650
    characters/s). The draw is rng.choice(V, p=p)'s inverse CDF: the first id whose
    cumulative probability exceeds u."""
    z = logits.astype(np.float64)
    for v in z:
        if not np.isfinite(v):
            return -1
    if temperature == 0:
        return np.argmax(z)
    if 0 < top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]
        z = np.where(z < kth, -np.inf, z)
    # subtract the max before dividing: (z - max) / t <= 0 never overflows, even for t = 1e-320
    # (the max maps to exp(0) = 1, so the sum is >= 1 and the probabilities are never NaN);
    # an underflow to -inf gives exp(-inf) = 0: that token is never drawn
    p = np.exp((z - z.max()) / temperature)
    cdf = np.cumsum(p / p.sum())
    cdf /= cdf[-1]
    return np.searchsorted(cdf, u, side="right")


def _check_options(max_new_tokens, temperature, top_k):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
