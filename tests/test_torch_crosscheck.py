"""minisparse.torch.GPT against the NumPy oracle (SPEC 10).

float64: logits, loss and the gradient of every parameter agree with
``oracle.gpt_forward`` / ``gpt_loss_and_grads`` (an implementation independent of both the
engine and this model) for each config option of SPEC 1-6 and 11.
float32, quantized: ``oracle.compare_model`` goes projection by projection in execution order,
comparing each projection's output with the reference applied to the PyTorch model's own
input to it (SPEC 10); int8 codes that differ only across a rounding boundary (SPEC 3) are
counted, not failed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")

from minisparse.oracle import compare, compare_model, gpt_forward, gpt_loss_and_grads  # noqa: E402
from minisparse.torch import GPT  # noqa: E402

BASE = dict(vocab_size=13, context=8, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32)
CONFIGS = {
    "dense": {},
    "topk": {"sparsity": 0.6},
    "block": {"block": [2, 4]},
    "rescale": {"sparsity": 0.5, "rescale": "l2"},
    "bits158": {"bits": 1.58},
    "bits158_topk": {"bits": 1.58, "sparsity": 0.5},
    "silu": {"ffn_act": "silu", "sparsity": 0.25},
    "relu2_block_l2_bits": {"bits": 1.58, "block": [2, 4], "rescale": "l2"},
    "moe": {"ffn": "moe", "n_experts": 3, "top_experts": 2, "sparsity": 0.5},
    "moe_top1_bits": {"ffn": "moe", "n_experts": 4, "top_experts": 1, "bits": 1.58},
    "threshold_bits": {"sparsify": "threshold", "sparsity": 0.5, "bits": 1.58},
}
TAU = 0.3  # the thresholds of the threshold configs (SPEC 11): at 0 they would equal dense


def scaled_model(config, seed, dtype, device="cpu"):
    """A GPT whose matrices are scaled up from the SPEC init so every path carries a signal."""
    model = GPT(config, np.random.default_rng(seed), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(15)
        for name, b in model.named_buffers():
            if ".tau." in name:
                b.fill_(TAU)
    return model.to(device)


def batch(config, seed=7, B=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config["vocab_size"], (B, config["context"])),
            rng.integers(0, config["vocab_size"], (B, config["context"])))


# End to end, even float64 cannot hold a quantized model to a tolerance: in this MoE an
# expert's down input differs by 3e-15 from the oracle's (another summation order) and that
# moves one int8 code across a rounding boundary (SPEC 3). It is checked projection by
# projection instead (test_float32_model_conforms_projection_by_projection, SPEC 10).
END_TO_END = [name for name in CONFIGS if name != "moe_top1_bits"]


@pytest.mark.parametrize("name", END_TO_END)
def test_gpt_matches_the_oracle_in_float64(name, torch_device):
    c = {**BASE, **CONFIGS[name]}
    model = scaled_model(c, seed=len(name), dtype=torch.float64, device=torch_device)
    params = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    idx, targets = batch(c)
    logits, loss = model(torch.from_numpy(idx).to(torch_device),
                         torch.from_numpy(targets).to(torch_device))
    loss.backward()

    ref_loss, ref_grads = gpt_loss_and_grads(params, c, idx, targets)
    results = {"logits": (logits.detach().cpu().numpy(), gpt_forward(params, c, idx)),
               "loss": (np.array([loss.item()]), np.array([ref_loss]))}
    assert set(ref_grads) == set(params)
    results.update({n: (_grad(p), ref_grads[n]) for n, p in model.named_parameters()})
    taus = set(params) - set(results) - {"logits", "loss"}  # buffers: never trained (SPEC 11)
    assert all(".tau." in n and not ref_grads[n].any() for n in taus), taus
    assert set(results) | taus == {"logits", "loss", *params}
    for n, (ours, ref) in results.items():
        mismatch = compare(n, ours, ref, "reduction")  # sums in the implementation's order
        assert mismatch is None, str(mismatch)


def _grad(p):
    """p's gradient as NumPy; an expert no token chose has none in PyTorch, zeros in SPEC 10."""
    return np.zeros(tuple(p.shape)) if p.grad is None else p.grad.cpu().numpy()


def test_every_config_changes_the_logits():
    """Guards the comparison above against vacuous configs: each option changes the output."""
    idx, _ = batch(BASE)
    logits = {}
    for name, over in CONFIGS.items():
        model = scaled_model({**BASE, **over}, seed=0, dtype=torch.float64)
        logits[name] = model(torch.from_numpy(idx))[0].detach().numpy()
    for name in CONFIGS:
        assert all(np.abs(logits[name] - logits[o]).max() > 1e-3 for o in CONFIGS if o != name)


def compare_projections(model, idx, targets):
    """SPEC 10 through the oracle: the model's trace, logits and loss against the reference
    applied to the model's own values, projection by projection."""
    params = {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    trace = {}
    with torch.no_grad():
        logits, loss = model(torch.from_numpy(idx), torch.from_numpy(targets), trace=trace)
    return compare_model(params, model.config, idx, trace, logits.numpy(), loss=loss.item(),
                         targets=targets)


@pytest.mark.parametrize("name", ["bits158", "bits158_topk", "relu2_block_l2_bits", "topk",
                                  "moe_top1_bits", "threshold_bits"])
def test_float32_model_conforms_projection_by_projection(name):
    c = {**BASE, **CONFIGS[name]}
    model = scaled_model(c, seed=1, dtype=torch.float32)
    report = compare_projections(model, *batch(c, B=4))
    assert report.passed, str(report)
    projections = [n for n in report.checked if n.split(".")[-1] in "q k v o up gate down"]
    assert len(projections) >= 7 * c["n_layers"], report.checked


def test_the_projection_check_catches_a_wrong_projection(monkeypatch):
    """A model whose ternary weights round half away from zero (not SPEC 4's rule) fails,
    and the failure names the first projection where it shows."""
    c = {**BASE, "bits": 1.58}
    model = scaled_model(c, seed=1, dtype=torch.float32)
    with torch.no_grad():  # mean|w| = 1 exactly, so w·s = 0.5 on half the entries of attn.o
        w = model.blocks[1].attn.o
        w.copy_(torch.where(torch.arange(w.numel()).reshape(w.shape) % 2 == 0, 0.5, 1.5))
    idx, targets = batch(c, B=2)
    assert compare_projections(model, idx, targets).passed  # as the model computes it
    monkeypatch.setattr(torch, "round", lambda t: torch.trunc(t + 0.5 * torch.sign(t)))
    report = compare_projections(model, idx, targets)
    assert not report.passed and report.first_mismatch == "blocks.1.attn.o", str(report)
