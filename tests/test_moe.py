"""Q-Sparse + MoE (SPEC section 6): routing, gates, load-balancing loss, gradients, the
equivalence with the dense GLU, both backends, the oracle, decoding, counts and the CLI."""

import json
import math

import numpy as np
import pytest
from gradcheck import gradcheck
from tiny import TINY, assert_backends_agree, assert_matches_oracle, tiny_model, tokens

from minisparse import cli
from minisparse.checkpoint import load_checkpoint
from minisparse.kernels import pack_model
from minisparse.model import GPT, GPTConfig, KVCache, count_params
from minisparse.moe import route
from minisparse.oracle import gpt_loss_and_grads
from minisparse.tensor import Tensor

MOE = dict(ffn="moe", n_experts=3, top_experts=2)


def model_for(**overrides):
    return tiny_model(**{**MOE, **overrides})


def test_route_picks_the_largest_p_with_ties_to_the_lower_index():
    p = np.array([[0.2, 0.4, 0.4], [0.5, 0.25, 0.25], [0.1, 0.3, 0.6]])
    np.testing.assert_array_equal(route(p, 1), [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(route(p, 2), [[0, 1, 1], [1, 1, 0], [0, 1, 1]])


@pytest.mark.parametrize("top", [1, 2])
def test_moe_layer_is_the_gated_sum_of_the_chosen_experts_and_its_aux_loss(top):
    model = model_for(top_experts=top)
    moe = model.blocks[0].ffn
    h = np.random.default_rng(3).standard_normal((2, 5, 16))
    out = moe(Tensor(h)).data.reshape(10, 16)
    x = h.reshape(10, 16)
    z = x @ moe.router.data.T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    chosen = np.argsort(-p, axis=-1, kind="stable")[:, :top]
    want = np.zeros_like(x)
    for t in range(10):
        for e in chosen[t]:  # every expert applied to one token alone: the same per-token math
            want[t] += p[t, e] * moe.experts[e](Tensor(x[t:t + 1])).data[0]
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    f = np.bincount(chosen.reshape(-1), minlength=3) / (10 * top)
    assert math.isclose(moe.aux.item(), 3 * np.sum(f * p.mean(axis=0)), rel_tol=1e-12)
    np.testing.assert_allclose(moe.load, f * top)


@pytest.mark.parametrize("bits", [None, 1.58])
def test_identical_experts_with_every_expert_chosen_equal_the_dense_glu(bits):
    moe = model_for(n_experts=3, top_experts=3, moe_aux=0.0, sparsity=0.5, bits=bits)
    dense_config = GPTConfig(**{**TINY, "sparsity": 0.5, "bits": bits})
    dense = model_for(ffn="glu", n_experts=None, top_experts=None, sparsity=0.5, bits=bits)
    params = dense.params_dict()
    for name, p in moe.named_parameters():  # every expert is the dense GLU; router random
        glu = name.replace(name[name.index("experts."):name.rindex(".")] + ".", "") \
            if ".experts." in name else name
        if glu in params:
            p.data[...] = params[glu]
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    logits, loss = moe(idx, targets)
    want_logits, want_loss = GPT.from_params(dense_config, params, backend="numpy")(idx, targets)
    np.testing.assert_allclose(logits.data, want_logits.data, rtol=1e-12, atol=1e-12)
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=1e-12)


def test_loss_adds_moe_aux_times_the_mean_layer_aux():
    model = model_for(moe_aux=0.5)
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    _, loss = model(idx, targets)
    auxes = [b.ffn.aux.item() for b in model.blocks]
    ce = GPT.from_params(GPTConfig(**{**model.config.to_dict(), "moe_aux": 0.0}),
                         model.params_dict(), backend="numpy")(idx, targets)[1].item()
    assert math.isclose(loss.item(), ce + 0.5 * np.mean(auxes), rel_tol=1e-12)


def test_moe_layer_gradients_match_finite_differences():
    """Masked top-K (ste=False) and a fixed choice: the engine's gradient is the exact one."""
    model = GPT(GPTConfig(**{**TINY, **MOE, "sparsity": 0.4}), np.random.default_rng(0),
                dtype=np.float64, backend="numpy", ste=False)
    moe = model.blocks[0].ffn
    rng = np.random.default_rng(4)
    h = rng.standard_normal((1, 6, 16))
    router = rng.normal(0, 0.5, (3, 16))
    up, down = rng.normal(0, 0.3, (32, 16)), rng.normal(0, 0.3, (16, 32))

    def layer(h, router, up, down):
        moe.router, moe.experts[1].up.weight, moe.experts[1].down.weight = router, up, down
        return moe(h) + moe.aux  # the aux loss's gradient reaches the router too

    gradcheck(layer, h, router, up, down)


@pytest.mark.parametrize("overrides", [{}, {"sparsity": 0.5, "bits": 1.58, "rescale": "l2"},
                                       {"top_experts": 1, "block": [2, 4]}])
def test_engine_matches_the_oracle_in_float64(overrides):
    assert_matches_oracle(model_for(**overrides))


def test_an_expert_no_token_chose_gets_zero_gradients():
    model = model_for(top_experts=1)
    idx, targets = tokens((1, 2)), tokens((1, 2), 1)  # 2 tokens, 3 experts: one is idle
    model(idx, targets)
    _, grads = gpt_loss_and_grads(model.params_dict(), model.config.to_dict(), idx, targets)
    for i, block in enumerate(model.blocks):
        idle = [e for e in range(3) if block.ffn.load[e] == 0]
        assert idle
        for e in range(3):
            chosen = any(grads[f"blocks.{i}.ffn.experts.{e}.{w}"].any() for w in ("up", "down"))
            assert chosen == (e not in idle)


@pytest.mark.parametrize("overrides", [{"sparsity": 0.5}, {"sparsity": 0.5, "bits": 1.58}])
def test_numba_backend_equals_numpy_backend(overrides):
    assert_backends_agree(model_for(**overrides))


def test_kv_cache_decoding_equals_the_full_forward_on_both_backends():
    ref = model_for(dtype=np.float32, sparsity=0.5, bits=1.58)
    fast = GPT.from_params(ref.config, ref.params_dict(), backend="numba")
    assert pack_model(fast) == 2 * (4 + 3 * 3)  # q k v o and every expert's up, gate, down
    idx = tokens((1, 6))
    full = ref(idx)[0].data
    for model in (ref, fast):
        cache = KVCache(model.config)
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0].data[0, 0] for t in range(6)]
        np.testing.assert_allclose(np.stack(steps), full[0], rtol=1e-4, atol=1e-5)


def test_counts_every_expert_in_n_and_k_e_of_them_in_n_a():
    config = GPTConfig(**{**TINY, **MOE, "sparsity": 0.5})
    dense = count_params(GPTConfig(**{**TINY, "sparsity": 0.5}))
    c = count_params(config)
    d, f, L, router = 16, 32, 2, 3 * 16
    expert, expert_active = 3 * d * f, 2 * (d // 2) * f + (f // 2) * d
    assert c["N"] == dense["N"] + L * (router + 2 * expert)
    assert c["N_a"] == dense["N_a"] + L * (router + expert_active)
    assert c["N_proj"] == L * (4 * d * d + 3 * expert)


def test_cli_trains_an_moe_model_and_reports_it(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat. " * 200)
    out = tmp_path / "moe"
    argv = ["train", "--data", str(data), "--out", str(out), "--ffn", "moe", "--experts", "4",
            "--top-experts", "1", "--moe-aux", "0.02", "--d-model", "16", "--n-layers", "1",
            "--n-heads", "1", "--context", "8", "--iters", "4", "--eval-interval", "2",
            "--eval-batches", "1", "--final-eval-batches", "2", "--backend", "numpy"]
    assert cli.main(argv) == 0
    assert "expert load:" in capsys.readouterr().out
    ckpt = load_checkpoint(out / "ckpt.npz")
    assert (ckpt.config.ffn, ckpt.config.n_experts, ckpt.config.top_experts,
            ckpt.config.moe_aux) == ("moe", 4, 1, 0.02)
    assert "blocks.0.ffn.experts.3.down" in ckpt.params
    assert cli.main(["eval", str(out / "ckpt.npz"), "--batches", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["expert_load"]) == 1 and math.isclose(sum(report["expert_load"][0]), 1)


def test_init_from_cannot_switch_the_feed_forward(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat. " * 200)
    common = ["--data", str(data), "--d-model", "16", "--n-layers", "1", "--n-heads", "1",
              "--context", "8", "--iters", "2", "--final-eval-batches", "1", "--quiet",
              "--backend", "numpy"]
    assert cli.main(["train", "--out", str(tmp_path / "glu"), *common]) == 0
    argv = ["train", "--out", str(tmp_path / "moe"), "--init-from",
            str(tmp_path / "glu" / "ckpt.npz"), "--ffn", "moe", "--experts", "2",
            "--top-experts", "1", *common]
    assert cli.main(argv) == 1
    assert "cannot init from a checkpoint and change ffn 'glu' -> 'moe'" in capsys.readouterr().err
