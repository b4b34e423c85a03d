"""SPEC sections 6, 10, 11: the independent model oracle (plain NumPy, hand-written backward).

Its gradients are checked by float64 finite differences of the STE surrogate (masks, codes and
expert choices frozen at the base point, SPEC 1-4's linearisation around it); the engine's GPT is
then checked against it."""

import dataclasses

import numpy as np
import pytest

from minisparse import tensor
from minisparse.model import GPT, GPTConfig
from minisparse.oracle import gpt, gpt_forward, gpt_loss_and_grads, gpt_trace

CONFIG = dict(vocab_size=9, context=6, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16,
              sparsity=0.5, rescale="l2", bits=1.58)
MOE = dict(ffn="moe", n_experts=3, top_experts=2, moe_aux=0.5)
THRESHOLD = dict(sparsify="threshold", sparsity=0.5, rescale="none")
VARIANTS = {
    "glu-bits-topk-l2": {},
    "glu-dense": dict(sparsity=0.0, rescale="none", bits=None),
    "glu-block-silu": dict(block=[1, 4], sparsity=0.0, ffn_act="silu"),
    "moe-bits-topk": dict(MOE),
    "moe-top1-dense-silu": dict(MOE, top_experts=1, sparsity=0.0, rescale="none", bits=None,
                                ffn_act="silu"),
    "threshold-bits": dict(THRESHOLD),
    "threshold-moe": dict(THRESHOLD, **MOE, bits=None),
}


def random_params(config, dtype=np.float64, seed=0, std=0.3):
    """SPEC-named params of the oracle's shapes, drawn at ``std`` so that no layer is ~linear;
    thresholds at |A(x)|-sized values."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in gpt.oracle_param_shapes(config).items():
        if ".tau." in name:
            params[name] = np.array(rng.uniform(0.05, 0.4), dtype)
        elif len(shape) == 1:
            params[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        else:
            params[name] = (std * rng.standard_normal(shape)).astype(dtype)
    return params


def setup(dtype=np.float64, **overrides):
    config = {**CONFIG, **overrides}
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 9, (2, 6)), rng.integers(0, 9, (2, 6))
    return random_params(config, dtype), config, idx, targets


def surrogate_loss(params, cfg, idx, targets, frozen):
    logits, cache = gpt._forward(params, cfg, idx, np.float64, frozen)
    loss = gpt._cross_entropy(logits, targets)[0]
    return loss + cfg["moe_aux"] * sum(cache["aux"]) / cfg["n_layers"] if cache["aux"] else loss


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_gradients_match_finite_differences_of_the_ste_surrogate(overrides):
    params, config, idx, targets = setup(**overrides)
    cfg = gpt._config(config)
    frozen = {}  # the first forward records masks, codes, r and expert choices
    surrogate_loss(params, cfg, idx, targets, frozen)
    loss, grads = gpt_loss_and_grads(params, config, idx, targets)
    assert loss == pytest.approx(surrogate_loss(params, cfg, idx, targets, frozen), abs=1e-15)
    rng, h = np.random.default_rng(2), 1e-6
    for name, p in params.items():
        flat = rng.choice(p.size, min(p.size, 6), replace=False)  # a few entries per parameter
        for i in flat:
            bumped = [dict(params, **{name: p.copy()}) for _ in range(2)]
            bumped[0][name].flat[i] += h
            bumped[1][name].flat[i] -= h
            fd = (surrogate_loss(bumped[0], cfg, idx, targets, frozen)
                  - surrogate_loss(bumped[1], cfg, idx, targets, frozen)) / (2 * h)
            # abs: a ternary row of zeros puts relu² exactly at its kink g = 0, where the
            # central difference of (h z)² is h z² / 2 ~ 1e-8 and the derivative is 0
            assert grads[name].flat[i] == pytest.approx(fd, rel=1e-6, abs=1e-7), (name, i)
        if ".tau." in name:
            assert not grads[name].any()  # SPEC 11: thresholds are never trained


def test_an_expert_no_token_chose_gets_zero_gradients():
    config = {**CONFIG, **MOE, "n_experts": 8, "top_experts": 1}
    params, idx, targets = random_params(config), np.array([[1, 2]]), np.array([[3, 4]])
    trace = gpt_trace(params, config, idx)["trace"]
    chosen = {tuple(name.split(".")[1:5:3]) for name in trace if ".experts." in name}
    assert 2 <= len(chosen) <= 2 * 2  # two tokens, one expert each, in each of two layers
    _, grads = gpt_loss_and_grads(params, config, idx, targets)
    for name, g in grads.items():
        if ".experts." in name:
            layer, expert = int(name.split(".")[1]), int(name.split(".")[4])
            used = f"blocks.{layer}.ffn.experts.{expert}.up" in trace
            assert bool(np.abs(g).sum()) == used, name


def test_moe_choice_takes_the_lower_index_on_equal_probabilities():
    config = {**CONFIG, **MOE, "n_layers": 1, "n_experts": 4, "top_experts": 2}
    params = random_params(config)
    params["blocks.0.ffn.router"][:] = 0.0  # p = 1/4 for every expert: experts 0 and 1 win
    trace = gpt_trace(params, config, np.array([[0, 1, 2]]))["trace"]
    assert sorted({n.rsplit(".", 1)[0] for n in trace if ".experts." in n}) == [
        "blocks.0.ffn.experts.0", "blocks.0.ffn.experts.1"]


def test_trace_holds_every_projection_in_execution_order():
    params, config, idx, targets = setup(**MOE)
    out = gpt_trace(params, config, idx, targets)
    names = list(out["trace"])
    assert names[:4] == [f"blocks.0.attn.{n}" for n in "qkvo"]
    assert names[4:7] == [f"blocks.0.ffn.experts.{names[4].split('.')[4]}.{n}"
                          for n in ("up", "gate", "down")]
    np.testing.assert_array_equal(out["logits"], gpt_forward(params, config, idx))
    assert out["loss"] == gpt_loss_and_grads(params, config, idx, targets)[0]
    x, y = out["trace"]["blocks.1.attn.o"]
    assert x.shape == y.shape == (2, 6, 8)
    x, y = out["trace"][names[4]]  # an expert sees only its routed tokens' rows
    assert x.ndim == 2 and x.shape[0] < 12 and y.shape == (x.shape[0], 16)


def engine_config(config):
    """The engine's GPTConfig for ``config``, or skip when this branch's engine lacks a field."""
    try:
        return GPTConfig(**config)
    except (TypeError, ValueError) as e:
        pytest.skip(f"the engine's GPTConfig does not take this config yet ({e})")


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_engine_agrees_with_the_independent_oracle(overrides):
    params, config, idx, targets = setup(**overrides)
    model = GPT.from_params(engine_config(config), params, backend="numpy")
    logits, loss = model(idx, targets)
    loss.backward()
    np.testing.assert_allclose(logits.data, gpt_forward(params, config, idx), rtol=0, atol=1e-6)
    oracle_loss, grads = gpt_loss_and_grads(params, config, idx, targets)
    assert loss.item() == pytest.approx(oracle_loss, abs=1e-6)
    engine_grads = dict(model.named_parameters())
    assert set(engine_grads) == set(grads)
    for name, p in engine_grads.items():
        got = np.zeros_like(p.data) if p.grad is None else p.grad
        np.testing.assert_allclose(got, grads[name], rtol=0, atol=1e-6, err_msg=name)


def test_config_object_and_defaults_for_new_fields():
    params, config, idx, _ = setup()
    logits = gpt_forward(params, config, idx)
    np.testing.assert_array_equal(gpt_forward(params, GPTConfig(**config), idx), logits)
    fields = dataclasses.make_dataclass("Cfg", list(config))(**config)  # any attribute object
    np.testing.assert_array_equal(gpt_forward(params, fields, idx), logits)
    explicit = {**config, "ffn": "glu", "sparsify": "topk", "moe_aux": 0.01}
    np.testing.assert_array_equal(gpt_forward(params, explicit, idx), logits)


def test_huge_finite_weights_give_the_mathematical_logits():
    # float32 rmsnorm squares 1e30 -> inf unless it scales first (issue 11 item 8)
    config = {**CONFIG, "bits": None, "sparsity": 0.0, "rescale": "none"}
    params = random_params(config, np.float32, std=0.02)
    params["tok_emb"] *= np.float32(1e30)
    idx = np.array([[1, 2, 3]])
    got = gpt_forward(params, config, idx)
    expected = gpt_forward({n: a.astype(np.float64) for n, a in params.items()}, config, idx)
    assert np.isfinite(got).all() and np.abs(expected).max() > 1e29
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_no_global_state_is_touched():
    params, config, idx, targets = setup()
    before = {n: a.copy() for n, a in params.items()}
    np_state = np.random.get_state()[1].copy()
    gpt_forward(params, config, idx)
    loss, grads = gpt_loss_and_grads(params, config, idx, targets)
    assert all(np.array_equal(params[n], before[n]) for n in params)
    assert np.array_equal(np.random.get_state()[1], np_state)
    with tensor.no_grad():  # the engine's grad mode does not concern the oracle
        again, _ = gpt_loss_and_grads(params, config, idx, targets)
    assert again == loss and any(np.abs(g).sum() > 0 for g in grads.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("overrides", [{}, MOE, THRESHOLD], ids=["glu", "moe", "threshold"])
def test_dtype_is_kept(dtype, overrides):
    params, config, idx, targets = setup(dtype, **overrides)
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
        (params, {**config, "heads": 2}, idx, r"unknown keys \['heads'\]"),
        (params, {**config, "ffn": "moe", "n_experts": 1, "top_experts": 1}, idx,
         "n_experts >= 2"),
        (params, {**config, "sparsify": "threshold"}, idx, "rescale"),
        (params, config, idx[0], r"idx must be integer token ids \[B, T\]"),
        (params, config, idx.astype(float), "idx must be integer"),
        (params, config, np.zeros((1, 7), int), "more than context=6"),
        (params, config, np.zeros((0, 3), int), "at least one token"),
        (params, config, idx + 9, "must lie in"),
    ]
    for p, c, i, message in cases:
        with pytest.raises(ValueError, match=message):
            gpt_forward(p, c, i)
    with pytest.raises(ValueError, match="targets must be integer ids"):
        gpt_loss_and_grads(params, config, idx, targets[:, :3])
