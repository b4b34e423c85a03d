"""SPEC section 10: gpt_forward / gpt_loss_and_grads are pure functions matching the model."""

import numpy as np
import pytest

from minisparse import tensor
from minisparse.model import GPT, GPTConfig
from minisparse.oracle import gpt_forward, gpt_loss_and_grads

CONFIG = dict(vocab_size=9, context=6, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16,
              sparsity=0.5, rescale="l2", bits=1.58)


def setup(dtype=np.float64, **overrides):
    config = {**CONFIG, **overrides}
    params = GPT(GPTConfig(**config), np.random.default_rng(0), dtype=dtype).params_dict()
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 9, (2, 6)), rng.integers(0, 9, (2, 6))
    return params, config, idx, targets


@pytest.mark.parametrize("overrides", [{}, {"sparsity": 0.0, "rescale": "none", "bits": None},
                                       {"block": [1, 4], "sparsity": 0.0, "ffn_act": "silu"}])
def test_oracle_matches_the_module_model(overrides):
    params, config, idx, targets = setup(**overrides)
    model = GPT.from_params(GPTConfig(**config), params)
    logits, loss = model(idx, targets)
    loss.backward()
    np.testing.assert_array_equal(gpt_forward(params, config, idx), logits.data)
    oracle_loss, grads = gpt_loss_and_grads(params, GPTConfig(**config), idx, targets)
    assert oracle_loss == loss.item()
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(grads[name], p.grad, err_msg=name)


def test_no_global_state_is_touched():
    params, config, idx, targets = setup()
    before = {n: a.copy() for n, a in params.items()}
    np_state = np.random.get_state()[1].copy()
    gpt_forward(params, config, idx)
    loss, _ = gpt_loss_and_grads(params, config, idx, targets)
    assert all(np.array_equal(params[n], before[n]) for n in params)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert tensor._grad_enabled
    with tensor.no_grad():  # a caller's no_grad() does not stop the oracle's gradients
        again, grads = gpt_loss_and_grads(params, config, idx, targets)
        assert not tensor._grad_enabled
    assert again == loss and tensor._grad_enabled
    assert any(np.abs(g).sum() > 0 for g in grads.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dtype_is_kept(dtype):
    params, config, idx, targets = setup(dtype)
    assert gpt_forward(params, config, idx).dtype == dtype
    loss, grads = gpt_loss_and_grads(params, config, idx, targets)
    assert isinstance(loss, float)
    assert set(grads) == set(params)
    assert all(grads[n].dtype == dtype and grads[n].shape == params[n].shape for n in params)


def test_bad_inputs_are_rejected():
    params, config, idx, targets = setup()
    cases = [
        ({k: v for k, v in params.items() if k != "blocks.1.attn.k"}, config, idx,
         r"missing \['blocks.1.attn.k'\]"),
        ({**params, "head": params["tok_emb"]}, config, idx, r"unexpected \['head'\]"),
        ({**params, "norm": np.ones(9)}, config, idx, r"'norm'\] has shape \(9,\)"),
        ({**params, "norm": np.ones(8, np.float32)}, config, idx, "mix dtypes"),
        ({**params, "norm": np.ones(8, np.int64)}, config, idx, "dtype int64"),
        ({**params, "norm": np.full(8, np.nan)}, config, idx, "non-finite"),
        (params, {**config, "heads": 2}, idx, r"unknown config keys \['heads'\]"),
        (params, config, idx[0], r"idx must be integer token ids \[B, T\]"),
        (params, config, idx.astype(float), "idx must be integer"),
        (params, config, np.zeros((1, 7), int), "more than context=6"),
    ]
    for p, c, i, message in cases:
        with pytest.raises(ValueError, match=message):
            gpt_forward(p, c, i)
    with pytest.raises(ValueError, match="targets shape"):
        gpt_loss_and_grads(params, config, idx, targets[:, :3])
    with pytest.raises(ValueError, match="must lie in"):
        gpt_forward(params, config, idx + 9)
