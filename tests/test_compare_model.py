"""SPEC section 10: the projection-by-projection model comparison with boundary-flip accounting."""

import numpy as np
import pytest
from test_oracle_gpt import CONFIG, MOE, THRESHOLD, random_params

from minisparse.oracle import compare_model, gpt_trace, ops

VARIANTS = {"glu-bits": {}, "moe-bits": MOE, "threshold": THRESHOLD}


def setup(dtype=np.float32, **overrides):
    config = {**CONFIG, **overrides}
    params = random_params(config, dtype)
    rng = np.random.default_rng(3)
    return params, config, rng.integers(0, 9, (2, 6)), rng.integers(0, 9, (2, 6))


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_reference_trace_agrees_with_itself(overrides):
    params, config, idx, targets = setup(**overrides)
    out = gpt_trace(params, config, idx, targets)
    report = compare_model(params, config, idx, out["trace"], out["logits"], out["loss"],
                           targets)
    assert report.passed and not report.flips, str(report)
    assert "blocks.1.attn_norm" in report.checked and report.checked[-2:] == ["logits", "loss"]


@pytest.mark.parametrize("name", ["blocks.0.attn.k", "blocks.1.attn.o", "blocks.1.ffn.down"])
def test_a_wrong_projection_is_named(name):
    params, config, idx, _ = setup()
    out = gpt_trace(params, config, idx)
    x, y = out["trace"][name]
    out["trace"][name] = (x, y * np.float32(1.001))  # 0.1% off: far outside float32 rounding
    report = compare_model(params, config, idx, out["trace"], out["logits"])
    assert not report.passed and report.first_mismatch == name, str(report)
    assert f"FAILED at {name}" in str(report) and "own input" in str(report)


def test_wrong_glue_between_projections_is_named():
    params, config, idx, _ = setup()
    out = gpt_trace(params, config, idx)
    x, _ = out["trace"]["blocks.1.attn.q"]
    x = x * np.float32(1.0005)  # e.g. an RMSNorm off by a factor; q itself right on its input
    y = ops.sparse_linear_forward(x, params["blocks.1.attn.q"], sparsity=0.5, rescale="l2",
                                  bits=1.58)
    out["trace"]["blocks.1.attn.q"] = (x, y)
    report = compare_model(params, config, idx, out["trace"], out["logits"])
    assert not report.passed and report.first_mismatch == "blocks.1.attn_norm", str(report)
    del out["trace"]["blocks.0.ffn.up"]
    report = compare_model(params, config, idx, out["trace"], out["logits"])
    assert report.first_mismatch == "blocks.0.ffn.up" and "no entry" in report.detail


def flip_at_boundaries(x):
    """A legitimate int8 quantizer (SPEC 3) that rounds every boundary entry to the other
    neighbour, as another evaluation order may."""
    from minisparse.oracle.flips import absmax_boundaries
    from minisparse.quant import absmax_quantize

    q, s = absmax_quantize(x)
    boundary, v = absmax_boundaries(x)
    other = np.where(q == np.floor(v), np.floor(v) + 1, np.floor(v))
    return np.where(boundary, np.clip(other, -128, 127), q).astype(np.int8), s


def test_boundary_flips_alone_explain_the_logits(monkeypatch):
    params, config, idx, _ = setup()
    # token rows of max 2 with entries +-1: after RMSNorm (gain 1) those sit at exactly γ/2, so
    # their codes x·s ≈ 63.5 are on a rounding boundary (γ = 2 r is no power of two)
    rng = np.random.default_rng(0)
    params["tok_emb"] = rng.choice([2.0, 1.0, -1.0, 0.3], params["tok_emb"].shape).astype(
        np.float32)
    params["tok_emb"][:, 0] = 2.0
    params["blocks.0.attn_norm"][:] = 1.0
    reference = gpt_trace(params, config, idx)
    monkeypatch.setattr(ops, "absmax_quantize", flip_at_boundaries)
    other = gpt_trace(params, config, idx)
    monkeypatch.undo()
    assert not np.array_equal(other["logits"], reference["logits"])
    report = compare_model(params, config, idx, other["trace"], other["logits"])
    assert report.passed and report.flips.get("blocks.0.attn.q", 0) > 0, str(report)
    assert "boundary flips" in str(report) and "alone explain" in str(report)
