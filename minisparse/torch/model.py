"""The GPT of SPEC section 6 in PyTorch; its ``state_dict`` keys and shapes are the SPEC names.

Reading order: RoPE, the KV cache, attention, the transformer block (with the SPEC 11
thresholds), the GPT.
Every projection is ``modules.project`` over a raw Parameter; ``forward(..., trace=dict)``
records each projection's input and output for SPEC 10's projection-by-projection comparison.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .config import model_config
from .modules import GLU, MoE, normal_, project

TAU_NAMES = ("attn_in", "attn_o", "ffn_in", "ffn_down")  # SPEC 11: one per distinct input


def rope_tables(config: dict, T: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos θ, sin θ [T, d_head], θ = pos · rope_base^(-2i/d_head) over both halves; angles in
    float64, then cast (as the NumPy model does)."""
    dh = config["d_model"] // config["n_heads"]
    inv_freq = config["rope_base"] ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    theta = np.outer(np.arange(T), inv_freq)
    theta = np.concatenate([theta, theta], axis=-1)  # [T, dh]
    return (torch.from_numpy(np.cos(theta)).to(dtype), torch.from_numpy(np.sin(theta)).to(dtype))


def rope(x, cos, sin):
    """x [B, H, T, dh] -> x·cos θ + rotate_half(x)·sin θ, rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Every attention's keys and values [B, H, t, dh] of the positions seen so far, by block
    name: ``GPT.forward(idx, kv_cache=cache)`` then runs only the new positions (decoding)."""

    def __init__(self):
        self.kv = {}
        self.length = 0  # positions cached

    def update(self, name, k, v):
        """(keys, values) of the cached positions followed by the new ones k, v [B, H, T, dh]."""
        if name in self.kv:
            old_k, old_v = self.kv[name]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.kv[name] = k, v
        return k, v


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE; q, k, v, o [d, d] are SPEC 5 projections."""

    def __init__(self, config, rng, dtype):
        super().__init__()
        d, std_o = config["d_model"], 0.02 / math.sqrt(2 * config["n_layers"])
        for name in "qkvo":
            w = normal_(torch.empty(d, d, dtype=dtype), rng, std_o if name == "o" else 0.02)
            setattr(self, name, nn.Parameter(w))
        self.n_heads = config["n_heads"]

    def forward(self, h, cos, sin, linear, taus, trace, name, cache=None):
        B, T, d = h.shape
        q, k, v = (
            # [B, T, d] -> [B, T, H, dh] -> [B, H, T, dh]
            project(f"{name}.{p}", h, getattr(self, p), linear, taus[0], trace)
            .view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)
            for p in "qkv"
        )
        k = rope(k, cos, sin)
        past = 0
        if cache is not None:
            k, v = cache.update(name, k, v)
            past = k.shape[2] - T
        # causal over the cached positions too: new position t sees positions <= past + t
        mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool,
                                                 device=h.device).tril(past)
        a = nn.functional.scaled_dot_product_attention(rope(q, cos, sin), k, v, attn_mask=mask,
                                                       is_causal=past == 0)  # softmax(qkᵀ/√dh) v
        a = a.transpose(1, 2).reshape(B, T, d)
        return project(f"{name}.o", a, self.o, linear, taus[1], trace)


class Thresholds(nn.Module):
    """SPEC 11's four thresholds of a block, 0-d buffers: in the state_dict, never trained."""

    def __init__(self, dtype):
        super().__init__()
        for name in TAU_NAMES:
            self.register_buffer(name, torch.zeros((), dtype=dtype))


class Block(nn.Module):
    """Pre-norm block: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)) (GLU or MoE)."""

    def __init__(self, config, rng, dtype):
        super().__init__()
        d = config["d_model"]
        self.attn_norm = nn.Parameter(torch.ones(d, dtype=dtype))
        self.attn = Attention(config, rng, dtype)
        self.ffn_norm = nn.Parameter(torch.ones(d, dtype=dtype))
        down_std = 0.02 / math.sqrt(2 * config["n_layers"])
        ffn = (d, config["ffn_hidden"], config["ffn_act"], down_std, rng, dtype)
        self.ffn = (GLU(*ffn) if config["ffn"] == "glu"
                    else MoE(*ffn, config["n_experts"], config["top_experts"]))
        if config["sparsify"] == "threshold":
            self.tau = Thresholds(dtype)
        self.eps = config["norm_eps"]

    def forward(self, x, cos, sin, linear, trace, name, cache=None):
        """x [B, T, d] -> (x [B, T, d], this block's load-balancing loss or None)."""
        taus = [getattr(self.tau, n) for n in TAU_NAMES] if hasattr(self, "tau") else [None] * 4
        h = rmsnorm(x, self.attn_norm, self.eps)
        x = x + self.attn(h, cos, sin, linear, taus[:2], trace, f"{name}.attn", cache)
        out = self.ffn(rmsnorm(x, self.ffn_norm, self.eps), linear, taus[2:], trace, f"{name}.ffn")
        out, aux = out if isinstance(out, tuple) else (out, None)
        return x + out, aux


def rmsnorm(x, g, eps):
    """x / sqrt(mean(x², -1) + eps) * g."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * g


class GPT(nn.Module):
    """Decoder-only LM of SPEC section 6 with a tied, dense, full-precision head."""

    def __init__(self, config, rng: np.random.Generator | None = None, dtype=torch.float32,
                 ste: bool = True):
        """``config``: a GPTConfig or a dict of SPEC fields. Init per SPEC 6 from the NumPy
        Generator ``rng`` (None: fresh entropy) in the NumPy model's order, so one seed gives
        the same initial weights; ``ste=False`` trains with the masked top-K gradient."""
        super().__init__()
        if not isinstance(ste, bool):
            raise TypeError(f"GPT: ste must be True or False, got {ste!r}")
        c = self.config = model_config(config)
        rng = np.random.default_rng() if rng is None else rng
        if c["sparsify"] == "threshold":  # the thresholds alone decide every mask (SPEC 11)
            self.linear = dict(bits=c["bits"], ste=ste)
        else:
            self.linear = dict(sparsity=c["sparsity"], block=c["block"], rescale=c["rescale"],
                               bits=c["bits"], ste=ste)
        self.tok_emb = nn.Parameter(normal_(torch.empty(c["vocab_size"], c["d_model"],
                                                        dtype=dtype), rng, 0.02))
        self.blocks = nn.ModuleList(Block(c, rng, dtype) for _ in range(c["n_layers"]))
        self.norm = nn.Parameter(torch.ones(c["d_model"], dtype=dtype))
        cos, sin = rope_tables(c, c["context"], dtype)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in the state_dict
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def from_params(cls, config, params: dict, ste: bool = True, device=None) -> GPT:
        """A model holding ``params`` (SPEC name -> NumPy array or tensor, one float dtype);
        a missing, extra or misshapen name is a ValueError naming it."""
        tensors = {n: torch.as_tensor(np.asarray(a)) for n, a in params.items()}
        dtypes = {t.dtype for t in tensors.values()}
        model = cls(config, np.random.default_rng(0), dtype=dtypes.pop() if len(dtypes) == 1
                    else torch.float32, ste=ste)
        model.load_spec_state_dict(tensors)
        return model.to(device)

    def load_spec_state_dict(self, state: dict) -> None:
        """load_state_dict with one error line naming the first missing, extra or misshapen
        name (torch's own message lists them over several lines)."""
        own = self.state_dict()
        missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or extra:
            raise ValueError(f"state_dict does not match the config: missing {missing}, "
                             f"unexpected {extra}")
        for name, t in own.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"state_dict[{name!r}] has shape {tuple(state[name].shape)}, "
                                 f"the config needs {tuple(t.shape)}")
        self.load_state_dict(state)

    def forward(self, idx, targets=None, trace=None, kv_cache=None):
        """idx int [B, T] -> (logits [B, T, V], loss or None): mean cross-entropy against
        ``targets`` plus moe_aux · the mean load-balancing loss over layers when MoE.
        ``trace``: a dict to fill with {projection name: (input, output)} NumPy arrays.
        ``kv_cache``: a KVCache; idx are then the positions after the cached ones."""
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be token ids of shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0 if kv_cache is None else kv_cache.length
        if past + T > self.config["context"]:
            raise ValueError(f"GPT: {past} cached + {T} positions exceed "
                             f"context={self.config['context']}")
        cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]
        x = self.tok_emb[idx]  # [B, T, d]
        aux = []
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, cos, sin, self.linear, trace, f"blocks.{i}", kv_cache)
            aux += [] if block_aux is None else [block_aux]
        if kv_cache is not None:
            kv_cache.length += T
        with torch.autocast(x.device.type, enabled=False):  # the head: dense, full precision
            logits = rmsnorm(x.to(self.norm.dtype), self.norm, self.config["norm_eps"]) \
                @ self.tok_emb.T  # [B, T, V]
        if targets is None:
            return logits, None
        loss = nn.functional.cross_entropy(logits.reshape(B * T, -1), targets.reshape(-1))
        if aux:
            loss = loss + self.config["moe_aux"] * torch.stack(aux).mean()
        return logits, loss
