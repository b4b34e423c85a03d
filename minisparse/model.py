"""The Q-Sparse / BitNet b1.58 transformer of SPEC section 6, on the minisparse engine.

Reading order: the config, the parameter names and counts (SPEC sections 6-7), then RoPE,
the KV cache, attention, the feed-forward block, the transformer block and the GPT itself.
Every projection is a ``SparseLinear`` (SPEC section 5) holding its weight and its method
objects (sparsifier, activation and weight quantizers), built from the config in one place
(``Methods``). The module tree is the one description of the model: parameter names, shapes and
the counts N, N_a are read off it (a tree of zero-stride arrays when only shapes are needed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .backend import fast_attention, fast_glu, fast_rmsnorm, resolve_backend
from .functions import cross_entropy, embedding, masked_fill, rmsnorm, softmax
from .linear import SparseLinear, glu_activation
from .moe import MoE
from .nn import Module, Parameter
from .params import check_named_arrays
from .quant import quantizers
from .sparsity import Threshold, make_sparsifier
from .tensor import Tensor, no_grad

FFNS = ("glu", "moe")
SPARSIFY = ("topk", "threshold")


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
    ffn: str = "glu"  # "glu" | "moe" (mixture of GLU experts, SPEC section 6)
    n_experts: int | None = None  # E >= 2 when ffn == "moe"
    top_experts: int | None = None  # k_e, 1 <= k_e <= E, when ffn == "moe"
    moe_aux: float = 0.01  # weight of the mean per-layer load-balancing loss
    sparsify: str = "topk"  # "topk" (sparsity / block) | "threshold" (SPEC 11: per-input tau)

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
        for name in ("sparsity", "moe_aux", "rope_base", "norm_eps"):
            setattr(self, name, _real(name, getattr(self, name)))
        for name in ("rope_base", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        Methods(self)  # the method objects validate sparsity, block, rescale, bits and ffn_act
        self.block = None if self.block is None else tuple(int(b) for b in self.block)
        if self.block is not None and self.sparsity == 0.0:
            self.sparsity = 1.0 - self.block[0] / self.block[1]  # N:M fixes the sparsity
        self.bits = None if self.bits is None else 1.58
        self._check_moe()
        _one_of("sparsify", self.sparsify, SPARSIFY)
        if self.sparsify == "threshold" and (self.block is not None or self.rescale != "none"):
            raise ValueError(f'sparsify "threshold" needs block null and rescale "none", got '
                             f"block={self.block!r}, rescale={self.rescale!r}")

    def _check_moe(self):
        _one_of("ffn", self.ffn, FFNS)
        if self.moe_aux < 0:
            raise ValueError(f"moe_aux must be >= 0, got {self.moe_aux!r}")
        if self.ffn == "glu":
            if (self.n_experts, self.top_experts) != (None, None):
                raise ValueError(f'n_experts and top_experts are for ffn "moe"; with ffn "glu" '
                                 f"they must be null, got {self.n_experts!r}, {self.top_experts!r}")
            return
        self.n_experts = _positive_int("n_experts", self.n_experts)
        self.top_experts = _positive_int("top_experts", self.top_experts)
        if self.n_experts < 2 or self.top_experts > self.n_experts:
            raise ValueError(f"ffn moe needs n_experts >= 2 and 1 <= top_experts <= n_experts, "
                             f"got n_experts={self.n_experts}, top_experts={self.top_experts}")

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


class Methods:
    """The method objects of a config's projections, built (and so validated) in one place:
    the quantizers (``bits``), the sparsifier (top-K / N:M, or SPEC 11 thresholds) and the GLU
    activation. ``linear(weight, tau)`` makes one SparseLinear."""

    def __init__(self, config: GPTConfig, ste: bool = True, backend=None):
        self.act_quant, self.weight_quant = quantizers(config.bits)
        self.activation, self.act = glu_activation(config.ffn_act), config.ffn_act
        self.ste, self.backend, self.target = ste, backend, config.sparsity
        if config.sparsify == "threshold":
            self.topk = None
            Threshold(Tensor(np.zeros(())), target=config.sparsity, ste=ste)  # checks S and ste
            return
        self.topk = make_sparsifier(sparsity=config.sparsity, block=config.block,
                                    rescale=config.rescale, ste=ste)
        for name in ("d_model", "ffn_hidden"):  # N:M needs M | every projection input size
            size = getattr(config, name)
            try:
                self.topk.kept_inputs(size)
            except ValueError as e:
                m = self.topk.m
                raise ValueError(f"{e}: {name}={size} (a multiple of {m} such as "
                                 f"{m * max(1, round(size / m))} would do)") from None

    def linear(self, weight: Parameter, tau: Parameter | None = None) -> SparseLinear:
        """A SparseLinear on ``weight``; with ``tau`` (threshold configs) its SPEC 11 mask."""
        sparsifier = self.topk if self.topk is not None else \
            Threshold(tau, target=self.target, ste=self.ste)
        return SparseLinear(weight, sparsifier, self.act_quant, self.weight_quant, self.backend)


# ---------------------------------------------------------------------------------------------
# Parameter names, shapes and counts (SPEC sections 6-7), read off the module tree


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """SPEC section 6 parameter names -> shapes, in the order of GPT.named_parameters()."""
    return {name: p.shape for name, p in _skeleton(config).named_parameters()}


def count_params(config: GPTConfig) -> dict:
    """SPEC section 7: N (all), N_a (activated), and the overall sparsity 1 - N_a/N of the
    projections. A projection W [D_out, D_in] activates K_in * D_out weights (K_in: its
    sparsifier's kept inputs; for thresholds, the calibration target); an MoE layer activates
    its router and k_e of its E experts."""
    n, n_a, n_proj, n_proj_a = (int(c) for c in _count(_skeleton(config)))
    return {
        "N": n,
        "N_a": n_a,
        "N_proj": n_proj,
        "N_a_proj": n_proj_a,
        "sparsity": 1.0 - n_proj_a / n_proj,
    }


def _count(module: Module) -> np.ndarray:
    """[N, N_a, N_proj, N_a_proj] of a module: SparseLinear counts K_in * D_out active; any other
    Parameter counts in full; an MoE's experts count k_e / E of their active weights."""
    if isinstance(module, SparseLinear):
        size, active = module.weight.size, module.kept_inputs() * module.weight.shape[0]
        return np.array([size, active, size, active], dtype=np.int64)
    own = sum(p.size for p in vars(module).values() if isinstance(p, Parameter))
    total = np.array([own, own, 0, 0], dtype=np.int64)
    for child in module.children():
        counts = _count(child)
        if isinstance(module, MoE):  # identical experts: k_e of E active, exactly
            counts[[1, 3]] = counts[[1, 3]] * module.top_experts // len(module.experts)
        total += counts
    return total


def _skeleton(config: GPTConfig) -> GPT:
    """The model tree with zero-stride parameter arrays (shapes only, nothing allocated)."""
    if isinstance(config, dict):
        config = GPTConfig.from_dict(config)
    return GPT(config, _ShapesOnly(), dtype=np.float64, backend="numpy")


class _ShapesOnly:
    """Stands in for the init RNG when only shapes are needed: a broadcast 0 of any shape."""

    def normal(self, loc, scale, size):
        return np.broadcast_to(np.float64(0.0), size)


def check_params(config: GPTConfig, params: dict) -> np.dtype:
    """Check ``params`` has exactly the SPEC names and shapes, one float dtype and finite
    values; return that dtype. Raises ValueError naming the first problem."""
    return check_named_arrays(param_shapes(config), params)


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
    out = x.data * cos  # then + [-x2, x1] sin, half by half (no concatenated temporaries)
    out[..., :half] -= x2 * sin[..., :half]
    out[..., half:] += x1 * sin[..., half:]

    def backward(g):
        dx = g * cos  # + [g2, -g1] sin
        dx[..., :half] += g[..., half:] * sin[..., half:]
        dx[..., half:] -= g[..., :half] * sin[..., :half]
        return (dx,)

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
    return Parameter(rng.normal(0.0, std, shape).astype(dtype, copy=False))


class Attention(Module):
    """Causal multi-head self-attention with RoPE; q, k, v, o are SparseLinear (SPEC §5)."""

    def __init__(self, config: GPTConfig, rng, dtype, methods: Methods, taus=None):
        d, std = config.d_model, 0.02
        tau_in, tau_o = (None, None) if taus is None else (taus.attn_in, taus.attn_o)
        self.q = methods.linear(_normal(rng, (d, d), std, dtype), tau_in)
        self.k = methods.linear(_normal(rng, (d, d), std, dtype), tau_in)
        self.v = methods.linear(_normal(rng, (d, d), std, dtype), tau_in)
        self.o = methods.linear(_normal(rng, (d, d), std / math.sqrt(2 * config.n_layers), dtype),
                                tau_o)
        self.n_heads = config.n_heads
        self.backend = methods.backend

    def forward(self, h, cos, sin, future, kv_cache=None, layer=0):
        """h (B, T, d) -> (B, T, d); ``future`` (T, S) is True where a query may not look."""
        B, T, d = h.shape
        H, dh = self.n_heads, d // self.n_heads
        q, k, v = self.q(h), self.k(h), self.v(h)
        if kv_cache is None and resolve_backend(self.backend) == "numba":
            return self.o(fast_attention(q, k, v, cos, sin, H))  # the lines below, fused
        # (B, T, d) -> (B, T, H, dh) -> (B, H, T, dh)
        q, k, v = (t.reshape(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if kv_cache is not None:  # decoding: attend to the cached positions too
            k, v = (Tensor(a) for a in kv_cache.update(layer, k.data, v.data))
        att = (q * (1.0 / math.sqrt(dh))) @ k.transpose(-1, -2)  # (B, H, T, S)
        att = softmax(masked_fill(att, future, -np.inf), axis=-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, d)  # (B, H, T, dh) -> (B, T, d)
        return self.o(a)


class FeedForward(Module):
    """GLU feed-forward: down(up(h) * act(gate(h))), act = relu² (Q-Sparse eq. 11) or silu."""

    def __init__(self, config: GPTConfig, rng, dtype, methods: Methods, taus=None):
        d, f, std = config.d_model, config.ffn_hidden, 0.02
        tau_in, tau_down = (None, None) if taus is None else (taus.ffn_in, taus.ffn_down)
        self.up = methods.linear(_normal(rng, (f, d), std, dtype), tau_in)
        self.gate = methods.linear(_normal(rng, (f, d), std, dtype), tau_in)
        self.down = methods.linear(
            _normal(rng, (d, f), std / math.sqrt(2 * config.n_layers), dtype), tau_down)
        self.activation, self.act, self.backend = methods.activation, methods.act, methods.backend

    def forward(self, h):
        """h (..., d) -> (..., d) through (..., ffn_hidden)."""
        u, z = self.up(h), self.gate(h)
        if resolve_backend(self.backend) == "numba":
            return self.down(fast_glu(u, z, self.act))  # u * activation(z), fused
        return self.down(u * self.activation(z))


class Thresholds(Module):
    """SPEC 11's thresholds of one block, one per distinct projection input: 0-d Parameters
    that nothing differentiates (they stay out of the graph, so AdamW never updates them)."""

    def __init__(self, dtype):
        self.attn_in = Parameter(np.zeros((), dtype))  # q, k, v
        self.attn_o = Parameter(np.zeros((), dtype))
        self.ffn_in = Parameter(np.zeros((), dtype))  # up, gate (every expert's, with MoE)
        self.ffn_down = Parameter(np.zeros((), dtype))


class Block(Module):
    """Pre-norm transformer block: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)); the ffn is
    one GLU or a mixture of GLU experts (MoE)."""

    def __init__(self, config: GPTConfig, rng, dtype, methods: Methods):
        d = config.d_model
        taus = Thresholds(dtype) if config.sparsify == "threshold" else None
        self.attn_norm = Parameter(np.ones(d, dtype))
        self.attn = Attention(config, rng, dtype, methods, taus)
        self.ffn_norm = Parameter(np.ones(d, dtype))
        if config.ffn == "moe":
            router = _normal(rng, (config.n_experts, d), 0.02, dtype)
            experts = [FeedForward(config, rng, dtype, methods, taus)
                       for _ in range(config.n_experts)]
            self.ffn = MoE(router, experts, config.top_experts)
        else:
            self.ffn = FeedForward(config, rng, dtype, methods, taus)
        if taus is not None:
            self.tau = taus
        self.eps, self.backend = config.norm_eps, methods.backend

    def forward(self, x, cos, sin, future, kv_cache=None, layer=0):
        h = _rmsnorm(self.backend, x, self.attn_norm, self.eps)
        x = x + self.attn(h, cos, sin, future, kv_cache, layer)
        return x + self.ffn(_rmsnorm(self.backend, x, self.ffn_norm, self.eps))


def _rmsnorm(backend, x, g, eps):
    """functions.rmsnorm, or its fused Numba twin on the "numba" backend."""
    return (fast_rmsnorm if resolve_backend(backend) == "numba" else rmsnorm)(x, g, eps)


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
        rng = np.random.default_rng() if rng is None else rng
        self.config = config
        methods = Methods(config, ste, None if backend is None else resolve_backend(backend))
        self.tok_emb = _normal(rng, (config.vocab_size, config.d_model), 0.02, dtype)
        self.blocks = [Block(config, rng, dtype, methods) for _ in range(config.n_layers)]
        self.norm = Parameter(np.ones(config.d_model, dtype))
        self.rope_cos, self.rope_sin = rope_tables(config, np.arange(config.context), dtype)
        self.backend = methods.backend

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
        for _, module in self.named_modules():
            if isinstance(module, SparseLinear):
                module.observe = fn

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
        logits = _rmsnorm(self.backend, x, self.norm, self.config.norm_eps) @ self.tok_emb.T
        loss = None if targets is None else cross_entropy(logits, targets)
        if loss is not None and self.config.ffn == "moe":  # + moe_aux * mean over layers
            aux = sum((block.ffn.aux for block in self.blocks[1:]), self.blocks[0].ffn.aux)
            loss = loss + aux * (self.config.moe_aux / self.config.n_layers)
        return logits, loss

    def expert_load(self) -> list | None:
        """Fraction of the last forward's tokens routed to each expert, per layer (MoE)."""
        if self.config.ffn != "moe":
            return None
        return [block.ffn.load.tolist() for block in self.blocks]
