"""Threshold sparsity (SPEC section 11): the calibration rule, tau = 0 is the dense model,
thresholds are never trained, gradients, both backends, the oracle, decoding and the CLI."""

import json
import math

import numpy as np
import pytest
from gradcheck import gradcheck
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TINY, assert_backends_agree, assert_matches_oracle, tiny_model, tokens

from minisparse import cli
from minisparse.calibrate import SITES, calibrate, collect_inputs
from minisparse.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from minisparse.kernels import pack_linear, pack_model
from minisparse.linear import SparseLinear
from minisparse.model import GPT, GPTConfig, KVCache
from minisparse.optim import AdamW
from minisparse.oracle import gpt_loss_and_grads
from minisparse.quant import quantizers
from minisparse.sparsity import Threshold, calibrate_threshold, threshold_mask
from minisparse.tensor import Tensor, no_grad
from minisparse.train import param_groups

TEXT = "the cat sat on the mat. a dog ran to see it! " * 40


def model_for(tau=0.3, **overrides):
    return tiny_model(tau=tau, **{"sparsify": "threshold", "sparsity": 0.5, **overrides})


def test_calibration_rule_is_spec_11():
    assert calibrate_threshold([3.0, -1.0, 2.0, 4.0], 0.5) == 2.0  # j = 2: a_2 of 1, 2, 3, 4
    assert calibrate_threshold([3.0, 1.0, 2.0, 4.0], 0.2) == 0.0  # j = floor(0.8) = 0
    a = np.arange(1, 101, dtype=np.float64)
    assert calibrate_threshold(a, 0.29) == 28.0  # 0.29 * 100 = 28.999999999999996 -> j = 28
    assert calibrate_threshold(a[:10], 0.7) == 7.0  # 0.7 * 10 = 7.000000000000001 -> j = 7
    with pytest.raises(ValueError, match="sparsity must be in"):
        calibrate_threshold(a, 1.0)


def test_threshold_mask_reference_checks_its_arguments():
    x = np.array([[0.5, -0.6]])
    np.testing.assert_array_equal(threshold_mask(x, 0.5), [[False, True]])
    for bad in (-0.1, np.nan, np.array([0.5]), 1):
        with pytest.raises(ValueError, match="threshold_mask: tau must be a finite float"):
            threshold_mask(x, bad)
    with pytest.raises(ValueError, match="x must be finite"):
        threshold_mask(np.array([np.inf]), 0.5)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_mask_is_strict_on_both_backends(backend):
    x = np.array([[0.5, -0.5, 0.25, 1.0], [-2.0, 0.5, 0.0, 0.75]])
    np.testing.assert_array_equal(Threshold(Tensor(np.float64(0.5))).mask(x),
                                  [[False, False, False, True], [True, False, False, True]])
    layer = SparseLinear(Tensor(np.eye(4)), Threshold(Tensor(np.float64(0.5))), backend=backend)
    np.testing.assert_array_equal(layer(Tensor(x)).data, np.where(np.abs(x) > 0.5, x, 0))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("extra", [{}, {"bits": 1.58}, {"ffn": "moe", "n_experts": 3,
                                                       "top_experts": 2}])
def test_tau_zero_is_the_dense_model(backend, extra):
    thresholded = model_for(tau=0.0, backend=backend, **extra)
    params = {n: a for n, a in thresholded.params_dict().items() if ".tau." not in n}
    dense = GPT.from_params(GPTConfig(**{**TINY, **extra}), params, backend=backend)
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    logits, loss = thresholded(idx, targets)
    want, want_loss = dense(idx, targets)
    np.testing.assert_array_equal(logits.data, want.data)
    assert loss.item() == want_loss.item()


def test_thresholds_get_zero_gradients_and_are_never_updated():
    model = model_for()
    idx, targets = tokens((2, 8)), tokens((2, 8), 1)
    _, grads = gpt_loss_and_grads(model.params_dict(), model.config.to_dict(), idx, targets)
    assert all(grads[f"blocks.{i}.tau.{s}"].shape == () and grads[f"blocks.{i}.tau.{s}"] == 0
               for i in range(2) for s in SITES)
    optimizer = AdamW(param_groups(model, 0.1), lr=0.1)
    before = model.params_dict()
    for _ in range(2):
        optimizer.zero_grad()
        model(idx, targets)[1].backward()
        optimizer.step()
    after = model.params_dict()
    assert all(after[n] == before[n] for n in after if ".tau." in n)
    assert not np.array_equal(after["blocks.0.attn.q"], before["blocks.0.attn.q"])


def test_threshold_linear_gradients_match_finite_differences():
    """Masked backward (ste=False) with a fixed mask is the exact gradient (inputs away from
    the threshold); with the STE the input gradient is the dense one, r = 1 (SPEC 1)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0.5, 1.5, (3, 8)) * rng.choice([-1, 1], (3, 8)) * rng.choice([0.2, 2], (3, 8))
    w = rng.standard_normal((4, 8))
    tau = Tensor(np.float64(0.7))  # |x| is in [0.1, 0.3] or [1, 3]: far from tau
    gradcheck(lambda x, w: SparseLinear(w, Threshold(tau, ste=False), backend="numpy")(x), x, w)
    xt = Tensor(x, requires_grad=True)
    g = rng.standard_normal((3, 4))
    SparseLinear(Tensor(w), Threshold(tau), backend="numpy")(xt).backward(g)
    np.testing.assert_allclose(xt.grad, g @ w, rtol=1e-12)


@pytest.mark.parametrize("extra", [{}, {"bits": 1.58}, {"ffn": "moe", "n_experts": 3,
                                                       "top_experts": 1}])
def test_engine_matches_the_oracle_in_float64(extra):
    assert_matches_oracle(model_for(**extra))


@pytest.mark.parametrize("extra", [{}, {"bits": 1.58}])
def test_numba_backend_equals_numpy_backend_and_decodes_packed(extra):
    ref = model_for(**extra)
    fast = assert_backends_agree(ref)
    idx = tokens((1, 8))
    full = ref(idx)[0].data[0]
    pack_model(fast)
    cache = KVCache(fast.config)
    steps = [fast(idx[:, t:t + 1], kv_cache=cache)[0].data[0, 0] for t in range(8)]
    np.testing.assert_allclose(np.stack(steps), full, rtol=1e-9, atol=1e-12)


def tiny_checkpoint(path, **overrides):
    from minisparse.data import CharTokenizer

    vocab = CharTokenizer.from_text(TEXT).vocab
    config = GPTConfig(**{**TINY, "vocab_size": len(vocab), **overrides})
    model = GPT(config, np.random.default_rng(0), dtype=np.float32)
    save_checkpoint(path, Checkpoint(config=config, params=model.state_dict(), vocab=vocab,
                                     data={"source": "<text>"}))
    return load_checkpoint(path)


@pytest.mark.parametrize("extra", [{}, {"bits": 1.58, "ffn": "moe", "n_experts": 3,
                                        "top_experts": 2}])
def test_calibration_drops_a_fraction_s_of_each_site_on_its_tokens(tmp_path, extra):
    ckpt = tiny_checkpoint(tmp_path / "dense.npz", **extra)
    new, taus = calibrate(ckpt, 0.4, TEXT, tokens=64, seed=3)
    again, _ = calibrate(ckpt, 0.4, TEXT, tokens=64, seed=3)
    assert again.params.keys() == new.params.keys()
    assert all(np.array_equal(again.params[n], new.params[n]) for n in new.params)
    assert new.config.sparsify == "threshold" and new.config.sparsity == 0.4
    assert new.history["calibration"]["tokens"] == 64
    # the same windows, collected again from the calibrated model with its taus set to 0
    from minisparse.data import CharTokenizer, get_batch, make_dataset

    data = make_dataset(TEXT, 8, CharTokenizer(ckpt.vocab))
    idx, _ = get_batch(np.random.default_rng(3), data.train, 8, 8)
    zeros = {n: np.zeros_like(a) if ".tau." in n else a for n, a in new.params.items()}
    collected = collect_inputs(GPT.from_params(new.config, zeros, backend="numpy"), idx)
    top = extra.get("top_experts", 1)
    for i, sites in enumerate(collected):
        assert sites["attn_in"].size == 64 * 16 and sites["ffn_in"].size == 64 * 16  # once
        assert sites["ffn_down"].size == 64 * top * 32  # pooled over the routed experts
        for site, values in sites.items():
            tau = taus[f"blocks.{i}.tau.{site}"]
            assert new.params[f"blocks.{i}.tau.{site}"] == np.float32(tau)
            j = math.floor(0.4 * values.size)
            assert tau == np.sort(values)[j - 1]
            assert np.count_nonzero(values <= tau) >= j  # ties at tau are dropped too


def test_cli_calibrate_then_eval_and_sample_report_the_measured_sparsity(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text(TEXT)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "dense"), "--d-model", "16",
            "--n-layers", "1", "--n-heads", "1", "--context", "8", "--iters", "3",
            "--final-eval-batches", "1", "--quiet", "--backend", "numpy"]
    assert cli.main(argv) == 0
    out = tmp_path / "thr.npz"
    assert cli.main(["calibrate", str(tmp_path / "dense" / "ckpt.npz"), "--sparsity", "0.5",
                     "--out", str(out), "--tokens", "256"]) == 0
    assert "calibrated 4 thresholds for sparsity 0.5 on 256 tokens" in capsys.readouterr().out
    assert cli.main(["eval", str(out), "--batches", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.3 < report["act_sparsity"] < 0.7
    assert cli.main(["sample", str(out), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    assert "measured activation sparsity" in capsys.readouterr().err
    assert cli.main(["info", str(out)]) == 0
    assert "calibration target" in capsys.readouterr().out
    assert cli.main(["calibrate", str(out), "--sparsity", "1.5", "--out", str(out)]) == 1
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("bits", [None, 1.58])
@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), ste=st.booleans(), pick=st.integers(0, 39))
def test_fused_threshold_linear_equals_reference(bits, seed, ste, pick):
    """Inputs on a grid of halves and tau one of the |x| values: ties at tau on every draw."""
    rng = np.random.default_rng(seed)
    x = (np.round(rng.standard_normal((2, 3, 40)) * 2) / 2).astype(np.float32)
    w = rng.standard_normal((9, 40)).astype(np.float32)
    g = rng.standard_normal((2, 3, 9)).astype(np.float32)
    tau = Tensor(np.abs(x.reshape(-1, 40)[0, pick]))
    act_quant, weight_quant = quantizers(bits)
    out = {}
    for backend in ("numpy", "numba"):
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        layer = SparseLinear(wt, Threshold(tau, ste=ste), act_quant, weight_quant, backend)
        y = layer(xt)
        y.backward(g)
        out[backend] = (y.data, xt.grad, wt.grad)
        with no_grad():  # the packed single-token path
            wt.packed = pack_linear(w, bits)
            out[backend + "-row"] = layer(Tensor(x[:1, :1])).data
    for name, a, b in zip(("y", "dx", "dw"), out["numba"], out["numpy"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out["numba-row"], out["numpy"][0][:1, :1], rtol=1e-5, atol=1e-5)
