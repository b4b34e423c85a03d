"""The compiled decode step (kernels/decode.py) against the engine's KV-cache forward: logits to
float rounding, greedy tokens equal, on every SIMD level the CPU runs."""

import numpy as np
import pytest

from minisparse.generate import compiled_decoder, generate
from minisparse.kernels import pack_model, unpack_model
from minisparse.kernels.decode import decoder_for
from minisparse.model import GPT, GPTConfig, KVCache

CONFIGS = [dict(sparsity=0.5, bits=1.58), dict(sparsity=0.5, ffn_act="silu"), dict(bits=1.58),
           dict()]


def _model(**extra):
    config = GPTConfig(vocab_size=23, d_model=32, n_layers=2, n_heads=2, context=12,
                       ffn_hidden=80, **extra)
    model = GPT(config, np.random.default_rng(3), backend="numba")
    pack_model(model)
    return model


@pytest.mark.parametrize("extra", CONFIGS)
def test_step_logits_equal_the_engine(level, extra):
    model = _model(**extra)
    decoder, cache = decoder_for(model), KVCache(model.config)
    for token in [3, 0, 22, 7, 7, 1, 5, 9, 2, 11, 4, 6]:
        want = model(np.array([[token]]), kv_cache=cache)[0].data[0, -1]
        got = decoder.step(token)
        # float rounding only: attention sums run in another order (an int8 boundary flip
        # would show as a visibly larger difference and fail here)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        decoder.step(0)


def test_greedy_generation_equals_the_engine(level):
    model = _model(sparsity=0.5, bits=1.58)
    fast = generate(model, [1, 2, 3], 30, temperature=0)  # 30 > context: window refills
    unpack_model(model)
    assert compiled_decoder(model) is None
    slow = generate(model, [1, 2, 3], 30, temperature=0)
    assert fast == slow


def test_uncovered_configs_keep_the_engine_path():
    assert decoder_for(_model(sparsity=0.5, rescale="l2")) is None
    assert decoder_for(_model(block=(2, 4))) is None
    model = _model(sparsity=0.5)
    unpack_model(model)
    assert compiled_decoder(model) is None


@pytest.mark.parametrize("extra", CONFIGS)
@pytest.mark.parametrize("cached", [0, 5])
def test_prefill_equals_single_steps_and_the_full_forward(extra, cached):
    model = _model(**extra)
    tokens = np.random.default_rng(cached).integers(0, model.config.vocab_size, 12)
    stepped, filled = decoder_for(model), decoder_for(model)
    steps = np.stack([stepped.step(t) for t in tokens])
    if cached:
        filled.prefill(tokens[:cached])
    got = filled.prefill(tokens[cached:])
    assert got.shape == (12 - cached, model.config.vocab_size) and filled.length == 12
    # the same operations per position, only in another order (block by block): bit-equal
    np.testing.assert_array_equal(got, steps[cached:])
    want = model(tokens[None])[0].data[0]  # the engine's forward over the whole window
    np.testing.assert_allclose(got, want[cached:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        filled.prefill(tokens[:1])
