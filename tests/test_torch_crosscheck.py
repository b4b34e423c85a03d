"""The SPEC model rebuilt independently in PyTorch (float64) agrees with the NumPy oracle.

Everything below the imports is written from SPEC.md alone -- no minisparse code -- so that
`minisparse.oracle.gpt_loss_and_grads` is checked against PyTorch autograd: logits, loss
and the gradient of every parameter, for each config option of SPEC sections 1-6.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minisparse.oracle import compare, gpt_forward, gpt_loss_and_grads  # noqa: E402

# ---------------------------------------------------------------------------------------------
# SPEC sections 1-5 in PyTorch


def topk_mask(x, k):
    """SPEC section 1: the K largest |x| per row; ties go to the lower index."""
    order = torch.sort(-x.abs(), dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter(-1, order, True)


class TopK(torch.autograd.Function):
    """y = r * x * M; backward (STE, eq. 13): r * g with r held constant."""

    @staticmethod
    def forward(ctx, x, sparsity, block, rescale):
        if block is None:
            mask = topk_mask(x, max(1, math.ceil((1 - sparsity) * x.shape[-1])))
        else:
            n, m = block
            mask = topk_mask(x.reshape(*x.shape[:-1], -1, m), n).reshape(x.shape)
        y = x * mask
        r = torch.ones_like(x[..., :1])
        if rescale == "l2":
            r = x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        ctx.save_for_backward(r)
        return y * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * r, None, None, None


class AbsmaxInt8(torch.autograd.Function):
    """SPEC section 3: per-row absmax int8, round half to even; STE backward."""

    @staticmethod
    def forward(ctx, x):
        s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
        return torch.clamp(torch.round(x * s), -128, 127) / s

    @staticmethod
    def backward(ctx, g):
        return g


class AbsmeanTernary(torch.autograd.Function):
    """SPEC section 4: whole-matrix absmean ternary weights; STE backward."""

    @staticmethod
    def forward(ctx, w):
        s = 1.0 / w.abs().mean().clamp_min(1e-5)
        return torch.clamp(torch.round(w * s), -1, 1) / s

    @staticmethod
    def backward(ctx, g):
        return g


def sparse_linear(x, w, c):
    """SPEC section 5: sparsify(A(x)) @ Qw(W).T."""
    if c["bits"] == 1.58:
        x, w = AbsmaxInt8.apply(x), AbsmeanTernary.apply(w)
    if c["sparsity"] > 0:
        x = TopK.apply(x, c["sparsity"], c["block"], c["rescale"])
    return x @ w.T


# ---------------------------------------------------------------------------------------------
# SPEC section 6 in PyTorch


def rmsnorm(x, g, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g


def rope(x, base):
    """Half-split RoPE on (B, H, T, dh): x cos + rotate_half(x) sin."""
    T, dh = x.shape[-2:]
    inv_freq = base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    theta = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None]
    theta = torch.cat([theta, theta], -1)
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * torch.cos(theta) + torch.cat([-x2, x1], -1) * torch.sin(theta)


def torch_gpt(p, c, idx, targets):
    B, T = idx.shape
    H, d = c["n_heads"], c["d_model"]
    x = p["tok_emb"][idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["n_layers"]):
        pre = f"blocks.{i}."
        h = rmsnorm(x, p[pre + "attn_norm"], c["norm_eps"])
        q, k, v = (
            sparse_linear(h, p[pre + f"attn.{n}"], c).view(B, T, H, d // H).transpose(1, 2)
            for n in "qkv"
        )
        q, k = rope(q, c["rope_base"]), rope(k, c["rope_base"])
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // H)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        a = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + sparse_linear(a, p[pre + "attn.o"], c)
        h = rmsnorm(x, p[pre + "ffn_norm"], c["norm_eps"])
        u = sparse_linear(h, p[pre + "ffn.up"], c)
        g = sparse_linear(h, p[pre + "ffn.gate"], c)
        f = u * (torch.relu(g) ** 2 if c["ffn_act"] == "relu2" else torch.nn.functional.silu(g))
        x = x + sparse_linear(f, p[pre + "ffn.down"], c)
    logits = rmsnorm(x, p["norm"], c["norm_eps"]) @ p["tok_emb"].T
    loss = torch.nn.functional.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
    return logits, loss


# ---------------------------------------------------------------------------------------------

BASE = dict(
    vocab_size=13, context=8, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32,
    ffn_act="relu2", sparsity=0.0, block=None, rescale="none", bits=None,
    rope_base=10000.0, norm_eps=1e-6,
)  # fmt: skip
CONFIGS = {
    "dense": {},
    "topk": {"sparsity": 0.6},
    "block": {"sparsity": 0.5, "block": [2, 4]},
    "rescale": {"sparsity": 0.5, "rescale": "l2"},
    "bits158": {"bits": 1.58},
    "bits158_topk": {"bits": 1.58, "sparsity": 0.5},
    "silu": {"ffn_act": "silu", "sparsity": 0.25},
}


def random_params(c, seed):
    """Params with SPEC names and shapes, scaled up so every path carries a real signal."""
    rng = np.random.default_rng(seed)
    d, f, V = c["d_model"], c["ffn_hidden"], c["vocab_size"]
    p = {"tok_emb": rng.normal(0, 1.0, (V, d)), "norm": 1 + 0.1 * rng.normal(size=d)}
    for i in range(c["n_layers"]):
        pre = f"blocks.{i}."
        for name in ("attn_norm", "ffn_norm"):
            p[pre + name] = 1 + 0.1 * rng.normal(size=d)
        for name in "qkvo":
            p[pre + "attn." + name] = rng.normal(0, 0.3, (d, d))
        p[pre + "ffn.up"] = rng.normal(0, 0.3, (f, d))
        p[pre + "ffn.gate"] = rng.normal(0, 0.3, (f, d))
        p[pre + "ffn.down"] = rng.normal(0, 0.2, (d, f))
    return p


@pytest.mark.parametrize("name", list(CONFIGS))
def test_oracle_matches_torch_autograd(name):
    c = {**BASE, **CONFIGS[name]}
    params = random_params(c, seed=len(name))
    rng = np.random.default_rng(7)
    idx = rng.integers(0, c["vocab_size"], (3, c["context"]))
    targets = rng.integers(0, c["vocab_size"], (3, c["context"]))

    tp = {n: torch.tensor(a, requires_grad=True) for n, a in params.items()}
    t_logits, t_loss = torch_gpt(tp, c, torch.tensor(idx), torch.tensor(targets))
    t_loss.backward()

    logits = gpt_forward(params, c, idx)
    loss, grads = gpt_loss_and_grads(params, c, idx, targets)

    # logits, loss and gradients are all sums whose order is the implementation's choice
    results = {"logits": (logits, t_logits.detach().numpy()),
               "loss": (np.array([loss]), t_loss.detach().numpy().reshape(1))}
    assert set(grads) == set(params)
    results.update({n: (grads[n], tp[n].grad.numpy()) for n in params})
    for n, (ours, theirs) in results.items():
        mismatch = compare(n, ours, theirs, "reduction")
        assert mismatch is None, str(mismatch)
    worst = {n: np.abs(ours - theirs).max() for n, (ours, theirs) in results.items()}
    grad_worst = max(v for n, v in worst.items() if n in params)
    print(f"{name}: max abs diff logits {worst['logits']:.2g}, loss {worst['loss']:.2g}, "
          f"gradients {grad_worst:.2g}")


def test_every_config_changes_the_reference_logits():
    """Guards the comparison above against vacuous configs: each option changes the output."""
    params = {n: torch.tensor(a) for n, a in random_params(BASE, seed=0).items()}
    idx = torch.tensor(np.random.default_rng(7).integers(0, 13, (2, 8)))
    logits = {
        name: torch_gpt(params, {**BASE, **over}, idx, idx)[0].numpy()
        for name, over in CONFIGS.items()
    }
    for name in CONFIGS:
        others = [o for o in CONFIGS if o != name]
        assert all(np.abs(logits[name] - logits[o]).max() > 1e-3 for o in others), name
