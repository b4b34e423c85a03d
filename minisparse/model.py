"""The Q-Sparse / BitNet b1.58 transformer of SPEC section 6, on the minisparse engine.

Reading order: the config, the parameter names and counts (SPEC sections 6-7), then RoPE,
the KV cache, attention, the feed-forward block, the transformer block and the GPT itself.
Every projection is the functional ``sparse_linear`` of SPEC section 5 on a raw Parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .functions import cross_entropy, embedding, masked_fill, rmsnorm, softmax
from .linear import feed_forward, sparse_linear
from .nn import Module, Parameter
from .sparsity import k_for
from .tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    """Every field of SPEC section 6; all of them are stored in checkpoints."""

    vocab_size: int
    context: int = 64
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int | None = None  # None -> 16 * round(8 * d_model / 3 / 16)
    ffn_act: str = "relu2"  # "relu2" (Q-Sparse eq. 11) | "silu"
    sparsity: float = 0.0  # top-K ratio S of every projection input (SPEC section 1)
    block: tuple[int, int] | None = None  # N:M block top-K (SPEC section 2); implies S = 1 - N/M
    rescale: str = "none"  # "none" | "l2"
    bits: float | None = None  # None (full precision) | 1.58 (ternary weights, int8 activations)
    rope_base: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even "
                "size (RoPE rotates pairs of features)"
            )
        if self.ffn_hidden is None:
            self.ffn_hidden = 16 * round(8 * self.d_model / 3 / 16)
            if self.ffn_hidden < 1:
                raise ValueError(
                    f"the default ffn_hidden is 0 for d_model={self.d_model}; set ffn_hidden"
                )
        self.ffn_hidden = _positive_int("ffn_hidden", self.ffn_hidden)
        _one_of("ffn_act", self.ffn_act, ("relu2", "silu"))
        _one_of("rescale", self.rescale, ("none", "l2"))
        self.sparsity = _real("sparsity", self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.block is not None:
            self._check_block()
        if self.bits is not None and _real("bits", self.bits) != 1.58:
            raise ValueError(f"bits must be null (full precision) or 1.58, got {self.bits!r}")
        self.bits = None if self.bits is None else 1.58
        for name in ("rope_base", "norm_eps"):
            value = _real(name, getattr(self, name))
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
            setattr(self, name, value)

    def _check_block(self):
        block = self.block
        if isinstance(block, str) or len(block) != 2:
            raise ValueError(f"block must be null or [N, M], got {block!r}")
        n, m = (_positive_int(f"block[{i}]", b) for i, b in enumerate(block))
        if n > m:
            raise ValueError(f"block N:M needs N <= M, got {n}:{m}")
        for name in ("d_model", "ffn_hidden"):
            size = getattr(self, name)
            if size % m:
                raise ValueError(
                    f"block M={m} must divide every projection input size, but {name}={size}"
                    f" (a multiple of {m} such as {m * max(1, round(size / m))} would do)"
                )
        # N:M keeps N of every M inputs, so it fixes the sparsity; 0 means "implied by block".
        implied = 1.0 - n / m
        if self.sparsity == 0.0:
            self.sparsity = implied
        elif abs(self.sparsity - implied) > 1e-9:
            raise ValueError(
                f"block {n}:{m} implies sparsity {implied:g}, but sparsity={self.sparsity:g}"
            )
        self.block = (n, m)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict (e.g. checkpoint JSON); unknown or missing keys are errors."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {fields}")
        if "vocab_size" not in d:
            raise ValueError("config is missing vocab_size")
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-able dict of every field (block as a list)."""
        d = dataclasses.asdict(self)
        d["block"] = None if self.block is None else list(self.block)
        return d

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _one_of(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Parameter names, shapes and counts (SPEC sections 6-7)


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """SPEC section 6 parameter names -> shapes, in the order of GPT.named_parameters()."""
    c = config
    d, h = c.d_model, c.ffn_hidden
    shapes = {"tok_emb": (c.vocab_size, d)}
    for i in range(c.n_layers):
        p = f"blocks.{i}."
        shapes[p + "attn_norm"] = (d,)
        shapes.update({f"{p}attn.{name}": (d, d) for name in "qkvo"})
        shapes[p + "ffn_norm"] = (d,)
        shapes.update({p + "ffn.up": (h, d), p + "ffn.gate": (h, d), p + "ffn.down": (d, h)})
    shapes["norm"] = (d,)
    return shapes


def count_params(config: GPTConfig) -> dict:
    """SPEC section 7: N (all), N_a (activated), and the overall sparsity 1 - N_a/N of the
    seven projections. A projection W [D_out, D_in] activates K_in * D_out weights."""
    c = config
    n = n_a = n_proj = n_proj_a = 0
    for name, shape in param_shapes(c).items():
        size = math.prod(shape)
        n += size
        if len(shape) == 2 and name != "tok_emb":
            d_out, d_in = shape
            n_proj += size
            n_proj_a += _kept_inputs(c, d_in) * d_out
        else:  # embeddings and norms count in full
            n_a += size
    n_a += n_proj_a
    return {
        "N": n,
        "N_a": n_a,
        "N_proj": n_proj,
        "N_a_proj": n_proj_a,
        "sparsity": 1.0 - n_proj_a / n_proj,
    }


def _kept_inputs(config: GPTConfig, d_in: int) -> int:
    """K_in: how many of a projection's d_in inputs survive top-K (or N:M block top-K)."""
    if config.block is not None:
        n, m = config.block
        return d_in // m * n
    if config.sparsity == 0.0:
        return d_in
    return k_for(d_in, sparsity=config.sparsity)


def check_params(config: GPTConfig, params: dict) -> np.dtype:
    """Check ``params`` has exactly the SPEC names and shapes, one float dtype and finite
    values; return that dtype. Raises ValueError naming the first problem."""
    shapes = param_shapes(config)
    missing, unexpected = sorted(shapes.keys() - params.keys()), sorted(params.keys() - shapes)
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {missing}, "
                         f"unexpected {unexpected}")
    dtypes = set()
    for name, shape in shapes.items():
        a = np.asarray(params[name])
        if a.shape != shape:
            raise ValueError(f"params[{name!r}] has shape {a.shape}, the config needs {shape}")
        if a.dtype not in (np.float32, np.float64):
            raise ValueError(f"params[{name!r}] has dtype {a.dtype}; need float32 or float64")
        if not np.isfinite(a).all():
            raise ValueError(f"params[{name!r}] has non-finite values")
        dtypes.add(a.dtype)
    if len(dtypes) > 1:
        raise ValueError(f"params mix dtypes {sorted(map(str, dtypes))}; use one float dtype")
    return dtypes.pop()


# ---------------------------------------------------------------------------------------------
# RoPE and attention (SPEC section 6)


def rope_tables(config: GPTConfig, positions: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos θ, sin θ [T, d_head] with θ = pos · rope_base^(-2i/d_head), i < d_head/2, repeated
    over both halves (half-split convention). Angles in float64, then cast."""
    dh = config.d_head
    inv_freq = config.rope_base ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    theta = np.outer(positions, inv_freq)  # (T, dh/2)
    theta = np.concatenate([theta, theta], axis=-1)  # (T, dh)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def rope(x: Tensor, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """x (B, H, T, dh) -> x·cos θ + rotate_half(x)·sin θ, rotate_half([x1, x2]) = [-x2, x1].
    The map is orthogonal, so dx = g·cos θ + rotate_half^T(g·sin θ), rotate_half^T = [g2, -g1]."""
    half = x.shape[-1] // 2
    x1, x2 = x.data[..., :half], x.data[..., half:]
    out = x.data * cos + np.concatenate([-x2, x1], axis=-1) * sin

    def backward(g):
        gs = g * sin
        return (g * cos + np.concatenate([gs[..., half:], -gs[..., :half]], axis=-1),)

    return Tensor.from_op(out, (x,), backward, "rope")


class KVCache:
    """Keys and values of the positions decoded so far, for incremental decoding.
    k[i], v[i]: (B, n_heads, context, d_head) per layer i; positions [0, length) are filled."""

    def __init__(self, config: GPTConfig):
        self.capacity = config.context
        self.k = [None] * config.n_layers
        self.v = [None] * config.n_layers
        self.length = 0

    def reset(self):
        self.length = 0

    def update(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Store k, v (B, H, T, dh) at positions [length, length + T); return every cached
        position of this layer, (B, H, length + T, dh) each."""
        B, H, T, dh = k.shape
        if self.k[layer] is None or self.k[layer].shape[:2] != (B, H) \
                or self.k[layer].dtype != k.dtype:
            if self.length:
                raise ValueError(f"KVCache: batch {B} or dtype {k.dtype} differs from the "
                                 "cached positions; reset() the cache first")
            self.k[layer] = np.zeros((B, H, self.capacity, dh), k.dtype)
            self.v[layer] = np.zeros((B, H, self.capacity, dh), v.dtype)
        end = self.length + T
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _normal(rng, shape, std, dtype) -> Parameter:
    """SPEC section 6 init: a normal(0, std) matrix."""
    return Parameter(rng.normal(0.0, std, shape).astype(dtype))


class Attention(Module):
    """Causal multi-head self-attention with RoPE; q, k, v, o are SparseLinear (SPEC §5)."""

    def __init__(self, config: GPTConfig, rng, dtype, linear: dict):
        d, std = config.d_model, 0.02
        self.q = _normal(rng, (d, d), std, dtype)
        self.k = _normal(rng, (d, d), std, dtype)
        self.v = _normal(rng, (d, d), std, dtype)
        self.o = _normal(rng, (d, d), std / math.sqrt(2 * config.n_layers), dtype)
        self.n_heads = config.n_heads
        self.linear = linear

    def forward(self, h, cos, sin, future, kv_cache=None, layer=0):
        """h (B, T, d) -> (B, T, d); ``future`` (T, S) is True where a query may not look."""
        B, T, d = h.shape
        H, dh = self.n_heads, d // self.n_heads
        q, k, v = (
            # (B, T, d) -> (B, T, H, dh) -> (B, H, T, dh)
            sparse_linear(h, w, **self.linear).reshape(B, T, H, dh).transpose(1, 2)
            for w in (self.q, self.k, self.v)
        )
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if kv_cache is not None:  # decoding: attend to the cached positions too
            k, v = (Tensor(a) for a in kv_cache.update(layer, k.data, v.data))
        att = (q * (1.0 / math.sqrt(dh))) @ k.transpose(-1, -2)  # (B, H, T, S)
        att = softmax(masked_fill(att, future, -np.inf), axis=-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, d)  # (B, H, T, dh) -> (B, T, d)
        return sparse_linear(a, self.o, **self.linear)


class FeedForward(Module):
    """GLU feed-forward: down(up(h) * act(gate(h))), act = relu² (Q-Sparse eq. 11) or silu."""

    def __init__(self, config: GPTConfig, rng, dtype, linear: dict):
        d, f, std = config.d_model, config.ffn_hidden, 0.02
        self.up = _normal(rng, (f, d), std, dtype)
        self.gate = _normal(rng, (f, d), std, dtype)
        self.down = _normal(rng, (d, f), std / math.sqrt(2 * config.n_layers), dtype)
        self.act = config.ffn_act
        self.linear = linear

    def forward(self, h):
        return feed_forward(h, self.up, self.gate, self.down, act=self.act, **self.linear)


class Block(Module):
    """Pre-norm transformer block: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x))."""

    def __init__(self, config: GPTConfig, rng, dtype, linear: dict):
        self.attn_norm = Parameter(np.ones(config.d_model, dtype))
        self.attn = Attention(config, rng, dtype, linear)
        self.ffn_norm = Parameter(np.ones(config.d_model, dtype))
        self.ffn = FeedForward(config, rng, dtype, linear)
        self.eps = config.norm_eps

    def forward(self, x, cos, sin, future, kv_cache=None, layer=0):
        h = rmsnorm(x, self.attn_norm, self.eps)
        x = x + self.attn(h, cos, sin, future, kv_cache, layer)
        return x + self.ffn(rmsnorm(x, self.ffn_norm, self.eps))


# ---------------------------------------------------------------------------------------------
# The model


class GPT(Module):
    """Decoder-only LM of SPEC section 6 with a tied, dense, full-precision head."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator | None = None,
                 dtype=np.float32, backend=None, ste: bool = True):
        """Init per SPEC section 6 from ``rng`` (None: fresh OS entropy); ``backend`` picks
        the sparse_linear implementation (None: the process default); ``ste=False`` trains
        with the masked top-K gradient (Q-Sparse eq. 12) instead of the STE (eq. 13)."""
        if isinstance(config, dict):
            config = GPTConfig.from_dict(config)
        if not isinstance(ste, bool):
            raise TypeError(f"GPT: ste must be True or False, got {ste!r}")
        rng = np.random.default_rng() if rng is None else rng
        self.config = config
        # one dict of sparse_linear options, shared by every projection (see observe())
        self.linear = dict(sparsity=config.sparsity, k=None, block=config.block,
                           rescale=config.rescale, bits=config.bits, ste=ste, backend=backend,
                           observe=None)
        self.tok_emb = _normal(rng, (config.vocab_size, config.d_model), 0.02, dtype)
        self.blocks = [Block(config, rng, dtype, self.linear) for _ in range(config.n_layers)]
        self.norm = Parameter(np.ones(config.d_model, dtype))
        self.rope_cos, self.rope_sin = rope_tables(config, np.arange(config.context), dtype)

    @classmethod
    def from_params(cls, config: GPTConfig, params: dict, backend=None,
                    ste: bool = True) -> GPT:
        """A model holding copies of ``params`` (SPEC names and shapes; one float dtype)."""
        if isinstance(config, dict):
            config = GPTConfig.from_dict(config)
        dtype = check_params(config, params)
        model = cls(config, np.random.default_rng(0), dtype=dtype, backend=backend, ste=ste)
        model.load_state_dict(params)  # overwrites the throwaway init
        return model

    def observe(self, fn) -> None:
        """From now on every projection calls ``fn(a, d_in, d_out)`` with the input it
        multiplies, a = sparsify(A(X)) [..., D_in] (SPEC 5; read-only); None stops."""
        self.linear["observe"] = fn

    def params_dict(self) -> dict[str, np.ndarray]:
        """SPEC name -> a copy of the parameter array."""
        return self.state_dict()

    def forward(self, idx, targets=None, kv_cache=None):
        """idx int (B, T) -> (logits (B, T, V), mean cross-entropy vs targets or None).
        With ``kv_cache`` the tokens continue the cached ones (decoding: no graph is built)."""
        with no_grad() if kv_cache is not None else contextlib.nullcontext():
            return self._forward(idx, targets, kv_cache)

    def _forward(self, idx, targets, kv_cache):
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPT: idx must be token ids of shape (B, T), got {idx.shape}")
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.context:
            raise ValueError(
                f"GPT: {start} cached + {T} new positions exceed context={self.config.context}"
            )
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        # query t sits at position start + t and sees keys 0..start + t
        future = np.triu(np.ones((T, start + T), dtype=bool), k=start + 1)
        x = embedding(self.tok_emb, idx)  # (B, T, d)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, future, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        logits = rmsnorm(x, self.norm, self.config.norm_eps) @ self.tok_emb.T  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss
