"""The model of SPEC section 6: config, parameter names and counts, init, KV cache, gradients."""

import json
import math

import numpy as np
import pytest
from gradcheck import gradcheck
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minisparse.generate import generate, pick_token
from minisparse.model import GPT, GPTConfig, KVCache, count_params, param_shapes, rope, rope_tables
from minisparse.sparsity import k_for
from minisparse.tensor import Tensor

TINY = dict(vocab_size=11, context=8, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32)
CONFIGS = {
    "dense": {},
    "topk": {"sparsity": 0.6},
    "block": {"block": [2, 4]},
    "bits158": {"bits": 1.58, "sparsity": 0.5, "rescale": "l2"},
    "silu": {"ffn_act": "silu", "sparsity": 0.25},
}


def tiny_model(name="dense", dtype=np.float64, seed=0, ste=True, backend=None, **overrides):
    config = GPTConfig(**{**TINY, **CONFIGS[name], **overrides})
    model = GPT(config, np.random.default_rng(seed), dtype=dtype, ste=ste, backend=backend)
    # larger weights than the 0.02 init, so attention, norms and top-K all do real work
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():
        p.data[...] = rng.normal(1.0 if p.ndim == 1 else 0.0, 0.3 if p.ndim == 2 else 0.1, p.shape)
    return model


def tokens(config, shape, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, shape)


# ---- config ----------------------------------------------------------------------------------


def test_config_defaults_follow_spec():
    c = GPTConfig(vocab_size=65)
    assert (c.context, c.d_model, c.n_layers, c.n_heads) == (64, 128, 4, 4)
    assert c.ffn_hidden == 336  # 16 * round(8 * 128 / 3 / 16)
    assert (c.ffn_act, c.sparsity, c.block, c.rescale, c.bits) == ("relu2", 0.0, None, "none", None)
    assert (c.rope_base, c.norm_eps) == (10000.0, 1e-6)


def test_config_round_trips_through_json():
    c = GPTConfig(vocab_size=65, block=(8, 16), bits=1.58, ffn_act="silu")
    d = json.loads(json.dumps(c.to_dict()))
    assert d["block"] == [8, 16]
    assert GPTConfig.from_dict(d) == c


def test_block_implies_its_sparsity():
    assert GPTConfig(vocab_size=5, block=[8, 16]).sparsity == 0.5
    assert GPTConfig(vocab_size=5, block=[16, 32], ffn_hidden=320, sparsity=0.5).block == (16, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"colour": "red"}, "unknown config keys ['colour']"),
        ({"n_heads": 3}, "n_heads=3"),
        ({"d_model": 12, "n_heads": 4}, "heads of even size"),
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"sparsity": float("nan")}, "sparsity must be a finite number"),
        ({"ffn_act": "gelu"}, "ffn_act must be one of ['relu2', 'silu'], got 'gelu'"),
        ({"rescale": "l1"}, 'rescale must be "none" or "l2", got \'l1\''),
        ({"bits": 2}, "bits must be None (full precision) or 1.58, got 2"),
        ({"block": [3, 2]}, "block N must be in [1, 2], got 3"),
        ({"block": [2, 5]}, "block M=5 must divide"),
        ({"vocab_size": 65, "block": [16, 32]}, "ffn_hidden=336 (a multiple of 32 such as 320"),
        ({"block": [8]}, "block must be a pair (N, M), got [8]"),
        ({"ffn": "dense"}, "ffn must be one of ['glu', 'moe']"),
        ({"ffn": "moe", "n_experts": 1, "top_experts": 1}, "n_experts >= 2"),
        ({"ffn": "moe", "n_experts": 4, "top_experts": 5}, "1 <= top_experts <= n_experts"),
        ({"ffn": "moe", "n_experts": 4}, "top_experts must be a positive integer, got None"),
        ({"n_experts": 4}, 'with ffn "glu" they must be null'),
        ({"ffn": "moe", "n_experts": 2, "top_experts": 1, "moe_aux": -1}, "moe_aux must be >= 0"),
        ({"sparsify": "teal"}, "sparsify must be one of ['topk', 'threshold']"),
        ({"sparsify": "threshold", "block": [2, 4]}, 'needs block null and rescale "none"'),
        ({"sparsify": "threshold", "rescale": "l2"}, 'needs block null and rescale "none"'),
        ({"sparsify": "threshold", "sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"block": [2, 4], "sparsity": 0.25}, "block 2:4 implies sparsity 0.5"),
        ({"context": 0}, "context must be a positive integer"),
        ({"d_model": 16.0}, "d_model must be a positive integer"),
        ({"norm_eps": 0}, "norm_eps must be > 0"),
        ({"d_model": 2, "n_heads": 1}, "default ffn_hidden is 0"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError) as e:
        GPTConfig.from_dict({"vocab_size": 5, **overrides})
    assert message in str(e.value)


def test_config_needs_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig.from_dict({"context": 8})


# ---- parameters ------------------------------------------------------------------------------


def test_parameter_names_and_shapes_are_the_spec_ones():
    c = GPTConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=2, ffn_hidden=48)
    expected = [("tok_emb", (11, 16))]
    for i in range(2):
        expected += [(f"blocks.{i}.attn_norm", (16,))]
        expected += [(f"blocks.{i}.attn.{n}", (16, 16)) for n in "qkvo"]
        expected += [(f"blocks.{i}.ffn_norm", (16,)), (f"blocks.{i}.ffn.up", (48, 16)),
                     (f"blocks.{i}.ffn.gate", (48, 16)), (f"blocks.{i}.ffn.down", (16, 48))]
    expected += [("norm", (16,))]
    model = GPT(c, np.random.default_rng(0))
    assert [(n, p.shape) for n, p in model.named_parameters()] == expected
    assert list(param_shapes(c).items()) == expected


def test_init_statistics():
    c = GPTConfig(vocab_size=65, n_layers=8)
    model = GPT(c, np.random.default_rng(0))
    p = dict(model.named_parameters())
    assert all(t.dtype == np.float32 for t in p.values())
    for name in ("tok_emb", "blocks.0.attn.q", "blocks.3.attn.v", "blocks.7.ffn.up"):
        assert abs(p[name].data.std() - 0.02) < 0.02 * 0.03, name
        assert abs(p[name].data.mean()) < 1e-3, name
    for name in ("blocks.0.attn.o", "blocks.5.ffn.down"):  # 0.02 / sqrt(2 * n_layers)
        assert abs(p[name].data.std() - 0.005) < 0.005 * 0.03, name
    for name in ("blocks.2.attn_norm", "blocks.2.ffn_norm", "norm"):
        assert np.array_equal(p[name].data, np.ones(128, np.float32))


def test_init_is_reproducible_and_keeps_dtype():
    c = GPTConfig(**TINY)
    a = GPT(c, np.random.default_rng(3)).params_dict()
    b = GPT(c, np.random.default_rng(3)).params_dict()
    assert all(np.array_equal(a[n], b[n]) for n in a)
    p64 = GPT(c, np.random.default_rng(3), dtype=np.float64).params_dict()
    assert all(v.dtype == np.float64 for v in p64.values())


def test_from_params_round_trip_copies():
    model = tiny_model("topk")
    params = model.params_dict()
    clone = GPT.from_params(model.config, params)
    params["norm"][:] = 0  # the clone holds its own copy
    idx = tokens(model.config, (2, 8))
    np.testing.assert_array_equal(clone(idx)[0].data, model(idx)[0].data)


def test_from_params_rejects_mismatched_params():
    model = tiny_model()
    params = model.params_dict()
    with pytest.raises(ValueError, match=r"missing \['norm'\]"):
        GPT.from_params(model.config, {k: v for k, v in params.items() if k != "norm"})
    bad = {**params, "blocks.1.ffn.up": np.zeros((16, 32))}
    with pytest.raises(ValueError, match=r"'blocks.1.ffn.up'\] has shape \(16, 32\)"):
        GPT.from_params(model.config, bad)


def test_counts_by_hand_topk():
    c = GPTConfig(**{**TINY, "sparsity": 0.6})
    # K_in = ceil(0.4 * 16) = 7 for q, k, v, o, up, gate; ceil(0.4 * 32) = 13 for down
    proj = 2 * (4 * 16 * 16 + 3 * 16 * 32)
    active = 2 * (4 * 7 * 16 + 2 * 7 * 32 + 13 * 16)
    dense_rest = 11 * 16 + 2 * 2 * 16 + 16  # tok_emb, 2 norms per block, final norm (RoPE: none)
    assert count_params(c) == {
        "N": proj + dense_rest, "N_a": active + dense_rest, "N_proj": proj,
        "N_a_proj": active, "sparsity": 1 - active / proj,
    }  # fmt: skip
    assert count_params(c)["N"] == sum(p.size for p in GPT(c).parameters())


def test_counts_by_hand_block_and_dense():
    c = GPTConfig(**{**TINY, "block": [1, 4]})  # keeps 4 of 16 inputs, 8 of 32
    counts = count_params(c)
    assert counts["N_a_proj"] == 2 * (4 * 4 * 16 + 2 * 4 * 32 + 8 * 16)
    assert counts["sparsity"] == 0.75
    dense = count_params(GPTConfig(**TINY))
    assert dense["N"] == dense["N_a"] == counts["N"] and dense["sparsity"] == 0.0


def test_default_model_size():
    counts = count_params(GPTConfig(vocab_size=65))
    assert counts["N"] == 65 * 128 + 4 * (2 * 128 + 4 * 128**2 + 3 * 128 * 336) + 128
    half = count_params(GPTConfig(vocab_size=65, sparsity=0.5))
    assert half["sparsity"] == 0.5


# ---- RoPE, causality, the KV cache -----------------------------------------------------------


def test_rope_tables_and_gradient():
    c = GPTConfig(**TINY)  # d_head = 8
    cos, sin = rope_tables(c, np.arange(5), np.float64)
    theta = 3 * 10000.0 ** (-np.arange(4) * 2 / 8)  # position 3
    np.testing.assert_allclose(cos[3], np.cos(np.tile(theta, 2)), rtol=1e-15)
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 8))
    gradcheck(lambda t: rope(t, cos, sin), x)
    y = rope(Tensor(x), cos, sin).data  # a rotation: norms of pairs kept
    pairs = lambda a: a[..., :4] ** 2 + a[..., 4:] ** 2  # noqa: E731
    np.testing.assert_allclose(pairs(y), pairs(x), rtol=1e-12)


@pytest.mark.parametrize("name", ["dense", "bits158"])
def test_causal_future_tokens_do_not_change_past_logits(name):
    model = tiny_model(name)
    idx = tokens(model.config, (2, 8))
    changed = idx.copy()
    changed[:, 5:] = (changed[:, 5:] + 1) % model.config.vocab_size
    a, b = model(idx)[0].data, model(changed)[0].data
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert not np.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    model = tiny_model(name)
    idx = tokens(model.config, (2, 8), seed=1)
    full = model(idx)[0].data
    cache = KVCache(model.config)
    steps = [model(idx[:, :3], kv_cache=cache)[0].data]  # prefill 3, then one at a time
    steps += [model(idx[:, t : t + 1], kv_cache=cache)[0].data for t in range(3, 8)]
    assert cache.length == 8
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="exceed context=8"):
        model(idx[:, :1], kv_cache=cache)


def test_cached_decode_float32():
    model = tiny_model("topk", dtype=np.float32)
    idx = tokens(model.config, (1, 8))
    cache = KVCache(model.config)
    steps = [model(idx[:, t : t + 1], kv_cache=cache)[0].data for t in range(8)]
    assert steps[0].dtype == np.float32
    np.testing.assert_allclose(np.concatenate(steps, axis=1), model(idx)[0].data, atol=1e-5)


def test_decode_builds_no_graph():
    model = tiny_model()
    logits, _ = model(tokens(model.config, (1, 4)), kv_cache=KVCache(model.config))
    assert not logits.requires_grad


# ---- gradients -------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"ffn_act": "silu", "n_layers": 1}])
def test_gradients_match_central_differences(overrides):
    """Dense (no STE): every parameter along one random direction; tok_emb (embedding + tied
    head) in full. float64, central differences."""
    model = tiny_model("dense", **overrides)
    idx, targets = tokens(model.config, (2, 6), 1), tokens(model.config, (2, 6), 2)
    loss = model(idx, targets)[1]
    loss.backward()
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)

    def loss_at(name, value):
        saved = params[name].data.copy()
        params[name].data[...] = value
        out = model(idx, targets)[1].item()
        params[name].data[...] = saved
        return out

    eps = 1e-6
    for name, p in params.items():
        u = rng.normal(size=p.shape)
        numeric = (loss_at(name, p.data + eps * u) - loss_at(name, p.data - eps * u)) / (2 * eps)
        assert math.isclose(np.sum(p.grad * u), numeric, rel_tol=1e-6, abs_tol=1e-9), name
    emb, numeric = params["tok_emb"], np.zeros(params["tok_emb"].shape)
    for i in np.ndindex(emb.shape):
        e = np.zeros(emb.shape)
        e[i] = eps
        numeric[i] = loss_at("tok_emb", emb.data + e) - loss_at("tok_emb", emb.data - e)
    numeric /= 2 * eps
    np.testing.assert_allclose(emb.grad, numeric, rtol=1e-6, atol=1e-9)


def directional_derivatives(model, idx, targets, eps=1e-6):
    """{name: (grad · u, central difference along u)} for one random direction u per parameter."""
    model.zero_grad()
    model(idx, targets)[1].backward()
    rng, out = np.random.default_rng(0), {}
    for name, p in model.named_parameters():
        u, saved = rng.normal(size=p.shape), p.data.copy()
        p.data[...] = saved + eps * u
        up = model(idx, targets)[1].item()
        p.data[...] = saved - eps * u
        down = model(idx, targets)[1].item()
        p.data[...] = saved
        out[name] = (np.sum(p.grad * u), (up - down) / (2 * eps))
    return out


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_ste_false_gives_the_masked_gradient(backend):
    """Full-precision top-K without rescale is linear while its mask is fixed, so the masked
    gradient (ste=False, Q-Sparse eq. 12) is the exact gradient; the STE (eq. 13) is not."""
    masked = tiny_model("topk", ste=False, backend=backend)
    ste = tiny_model("topk", backend=backend)
    assert all(not b.attn.q.sparsifier.ste and not b.ffn.down.sparsifier.ste
               for b in masked.blocks)
    idx, targets = tokens(masked.config, (2, 6), 1), tokens(masked.config, (2, 6), 2)
    np.testing.assert_array_equal(masked(idx)[0].data, ste(idx)[0].data)  # same forward
    for name, (analytic, numeric) in directional_derivatives(masked, idx, targets).items():
        assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-9), name
    off = [name for name, (a, n) in directional_derivatives(ste, idx, targets).items()
           if not math.isclose(a, n, rel_tol=1e-3, abs_tol=1e-6)]
    assert "blocks.0.attn.q" in off and "blocks.1.ffn.up" in off
    with pytest.raises(TypeError, match="ste must be True or False"):
        GPT(masked.config, ste="no")
    params = masked.params_dict()
    assert not GPT.from_params(masked.config, params, ste=False).blocks[1].ffn.up.sparsifier.ste


@pytest.mark.parametrize("name", ["dense", "topk", "block", "bits158"])
def test_observe_sees_each_projection_input_and_changes_nothing(name):
    model = tiny_model(name, backend="numpy")
    fast = GPT.from_params(model.config, model.params_dict(), backend="numba")
    idx = tokens(model.config, (2, 5))
    plain = model(idx)[0].data
    seen = {"numpy": [], "numba": []}
    for m, key in ((model, "numpy"), (fast, "numba")):
        m.observe(lambda a, d_in, d_out, key=key: seen[key].append((a.copy(), d_in, d_out)))
    observed = model(idx)[0].data
    fast(idx)
    model.observe(None)
    np.testing.assert_array_equal(observed, plain)
    model(idx)  # stopped: nothing more recorded
    c = model.config
    d, f = c.d_model, c.ffn_hidden
    per_layer = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]  # q k v o, up gate down
    assert [(d_in, d_out) for _, d_in, d_out in seen["numpy"]] == per_layer * c.n_layers
    for (a, d_in, _), (b, _, _) in zip(seen["numpy"], seen["numba"], strict=True):
        assert a.shape == (2, 5, d_in)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        kept = np.count_nonzero(a, axis=-1)
        if name == "dense":
            continue
        k = d_in // 2 if name == "block" else k_for(d_in, sparsity=c.sparsity)
        # K nonzeros per row; fewer only where relu² already zeroed inputs of down
        assert (kept == k).all() if d_in == d else (kept <= k).all()


def test_loss_is_mean_cross_entropy():
    model = tiny_model()
    idx, targets = tokens(model.config, (2, 8), 1), tokens(model.config, (2, 8), 2)
    logits, loss = model(idx, targets)
    z = logits.data - logits.data.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# ---- sampling --------------------------------------------------------------------------------


def naive_generate(model, ids, n, temperature, top_k, seed):
    """A full forward over each token's visible window, no cache: the window starts as the
    last `context` tokens and, when one more token would not fit, slides to the last
    ceil(context / 2)."""
    rng, ids, context = np.random.default_rng(seed), list(ids), model.config.context
    start = max(0, len(ids) - context)
    for _ in range(n):
        if len(ids) - start > context:
            start = len(ids) - (context + 1) // 2
        logits = model(np.array([ids[start:]]))[0].data[0, -1]
        ids.append(pick_token(logits, temperature, top_k, rng))
    return ids


@pytest.mark.parametrize("name", ["dense", "bits158"])
def test_generate_with_cache_equals_full_forward_sampling(name):
    model = tiny_model(name)
    for prompt, n in (([1, 2, 3], 4), ([4] * 11, 3), ([5], 20)):  # fits; prompt > context;
        # long: the window slides twice
        out = generate(model, prompt, n, temperature=0.8, top_k=5, seed=1)
        assert out == naive_generate(model, prompt, n, 0.8, 5, seed=1)
        assert out[: len(prompt)] == prompt and len(out) == len(prompt) + n


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=1, max_size=70), st.floats(0.05, 5.0),
       st.none() | st.integers(1, 80), st.integers(0, 2**32 - 1))
def test_pick_token_draws_what_rng_choice_draws(logits, temperature, top_k, seed):
    # pick_token's compiled draw is numpy's Generator.choice(V, p=...) on the same distribution:
    # same seed, same token, unless the uniform draw falls within 1e-9 of a cumulative
    # probability (where the order of float sums may decide)
    z = np.array(logits, np.float32)
    zz = z.astype(np.float64)
    if top_k is not None and top_k < z.size:
        zz = np.where(zz < np.sort(zz)[-top_k], -np.inf, zz)
    p = np.exp((zz - zz.max()) / temperature)
    p /= p.sum()
    u = np.random.default_rng(seed).random()  # the draw both will make
    assume(np.abs(np.cumsum(p) - u).min() > 1e-9)
    token = pick_token(z, temperature, top_k, np.random.default_rng(seed))
    assert token == np.random.default_rng(seed).choice(z.size, p=p)
    assert p[token] > 0  # never a token outside the top_k


def test_pick_token_refuses_non_finite_logits():
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="not finite"):
            pick_token(np.array([0.0, bad, 1.0], np.float32), 1.0, None,
                       np.random.default_rng(0))


def test_generate_options():
    model = tiny_model()
    greedy = generate(model, [1], 6, temperature=0)
    assert generate(model, [1], 6, top_k=1, seed=5) == greedy
    assert generate(model, [1], 6, seed=2) == generate(model, [1], 6, seed=2)
    assert all(0 <= t < 11 for t in generate(model, np.array([3, 4]), 30, temperature=3.0))

    class Tok:  # the tokenizer interface generate needs
        encode = staticmethod(lambda s: np.array([ord(ch) - 97 for ch in s]))

    assert generate(model, "abc", 2, tokenizer=Tok(), seed=0)[:3] == [0, 1, 2]
    for kwargs, message in (
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": "ab"}, "needs a tokenizer"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
    ):
        args = {"prompt": [1], "max_new_tokens": 3, **kwargs}
        with pytest.raises(ValueError, match=message):
            generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args)
