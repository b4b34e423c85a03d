"""minisparse.torch.GPT against the NumPy oracle (SPEC 10).

float64: logits, loss and the gradient of every parameter agree with
``oracle.gpt_forward`` / ``gpt_loss_and_grads`` for each config option of SPEC 1-6.
float32, quantized: projection by projection in execution order, each projection's output is
compared with the reference applied to the PyTorch model's own input to it (SPEC 10); int8
codes that differ only across a rounding boundary (SPEC 3) are counted, not failed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")

from minisparse.oracle import (  # noqa: E402
    absmax_quantize,
    absmean_ternarize,
    compare,
    dequantize,
    gpt_forward,
    gpt_loss_and_grads,
    sparse_linear_forward,
    topk_forward,
)
from minisparse.torch import GPT  # noqa: E402
from minisparse.torch.functions import absmax_quantize as torch_absmax  # noqa: E402

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
}


def scaled_model(config, seed, dtype, device="cpu"):
    """A GPT whose matrices are scaled up from the SPEC init so every path carries a signal."""
    model = GPT(config, np.random.default_rng(seed), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(15)
    return model.to(device)


def batch(config, seed=7, B=3):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config["vocab_size"], (B, config["context"])),
            rng.integers(0, config["vocab_size"], (B, config["context"])))


@pytest.mark.parametrize("name", list(CONFIGS))
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
    results.update({n: (p.grad.cpu().numpy(), ref_grads[n]) for n, p in model.named_parameters()})
    assert set(results) == {"logits", "loss", *params}
    for n, (ours, ref) in results.items():
        mismatch = compare(n, ours, ref, "reduction")  # sums in the implementation's order
        assert mismatch is None, str(mismatch)


def test_every_config_changes_the_logits():
    """Guards the comparison above against vacuous configs: each option changes the output."""
    idx, _ = batch(BASE)
    logits = {}
    for name, over in CONFIGS.items():
        model = scaled_model({**BASE, **over}, seed=0, dtype=torch.float64)
        logits[name] = model(torch.from_numpy(idx))[0].detach().numpy()
    for name in CONFIGS:
        assert all(np.abs(logits[name] - logits[o]).max() > 1e-3 for o in CONFIGS if o != name)


def boundary_flips(x, codes):
    """(flips, others): int8 codes of ``x`` [..., D] differing from the reference's by a
    rounding boundary, |x·s - (k + ½)| <= 8 ulp(x·s) (SPEC 3), and differing otherwise."""
    ref, s = absmax_quantize(x)
    xs = x * s
    on_boundary = np.abs(np.abs(xs - np.trunc(xs)) - 0.5) <= 8 * np.spacing(np.abs(xs))
    differ = ref != codes
    return int((differ & on_boundary).sum()), int((differ & ~on_boundary).sum())


def compare_projections(model, idx):
    """SPEC 10, projection by projection: each traced output against the reference applied to
    the model's own input. Returns the boundary flips counted; fails on anything else."""
    c, params = model.config, {n: t.detach().cpu().numpy() for n, t in model.state_dict().items()}
    opts = dict(sparsity=c["sparsity"], block=c["block"], rescale=c["rescale"], bits=c["bits"])
    trace = {}
    with torch.no_grad():
        model(torch.from_numpy(idx), trace=trace)
    flips = 0
    for name, (x, y) in trace.items():  # execution order
        w = params[name]
        expected = sparse_linear_forward(x, w, **opts)
        if c["bits"]:
            q, _ = torch_absmax(torch.from_numpy(x))
            n_flips, others = boundary_flips(x, q.numpy())
            assert others == 0, f"{name}: {others} int8 codes differ off a rounding boundary"
            if n_flips:  # the reference on the model's own codes: the mask may move with them
                flips += n_flips
                a = dequantize(q.numpy(), absmax_quantize(x)[1])
                z = topk_forward(a, sparsity=c["sparsity"] or None, block=c["block"],
                                 rescale=c["rescale"])[0] if c["sparsity"] else a
                expected = z @ dequantize(*absmean_ternarize(w)).T
        scale = sparse_linear_forward(np.abs(x), np.abs(w), **opts)  # the size of the terms
        mismatch = compare(name, y, expected, "reduction", scale)
        assert mismatch is None, f"first mismatching projection: {mismatch}"
    expected_names = [f"blocks.{i}.{p}" for i in range(c["n_layers"])
                      for p in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate",
                                "ffn.down")]
    assert list(trace) == expected_names
    return flips


@pytest.mark.parametrize("name", ["bits158", "bits158_topk", "relu2_block_l2_bits", "topk"])
def test_float32_model_conforms_projection_by_projection(name):
    c = {**BASE, **CONFIGS[name]}
    model = scaled_model(c, seed=1, dtype=torch.float32)
    idx, _ = batch(c, B=4)
    flips = compare_projections(model, idx)
    print(f"{name}: {flips} boundary flips")


def test_the_projection_check_catches_a_wrong_projection(monkeypatch):
    """A model whose ternary weights round half away from zero (not SPEC 4's rule) fails,
    and the failure names the first projection where it shows."""
    c = {**BASE, "bits": 1.58}
    model = scaled_model(c, seed=1, dtype=torch.float32)
    with torch.no_grad():  # mean|w| = 1 exactly, so w·s = 0.5 on half the entries of attn.o
        w = model.blocks[1].attn.o
        w.copy_(torch.where(torch.arange(w.numel()).reshape(w.shape) % 2 == 0, 0.5, 1.5))
    idx, _ = batch(c, B=2)
    compare_projections(model, idx)  # as the model computes it, it conforms
    monkeypatch.setattr(torch, "round", lambda t: torch.trunc(t + 0.5 * torch.sign(t)))
    with pytest.raises(AssertionError, match="first mismatching projection.*blocks.1.attn.o"):
        compare_projections(model, idx)
