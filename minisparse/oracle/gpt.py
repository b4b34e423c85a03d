"""SPEC sections 6, 10, 11: the whole model as plain NumPy functions with a hand-written backward.

The llm.c way: every layer has a ``*_forward`` that returns its output and a cache of what its
backward needs, and a ``*_backward`` that takes dL/d(output) and that cache. Nothing here uses
the engine's GPT, Tensor or autograd; the model shares only the SPEC 1-5 op references
(``sparsity.py``, ``quant.py``, ``oracle/ops.py``) with it, so the engine is checked against an
independent implementation.

``params`` maps SPEC section 6 names to NumPy arrays (all float32 or all float64; the computation
keeps that dtype); ``config`` is a dict of SPEC field names or any object with those attributes
(a GPTConfig). Fields added after the first release (``ffn``, ``n_experts``, ``top_experts``,
``moe_aux``, ``sparsify``) take their SPEC defaults when absent. Every projection runs with the
straight-through estimator (SPEC 1, eq. 13).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..params import check_named_arrays
from .ops import _act, linear_parts

PROJECTIONS = ("q", "k", "v", "o", "up", "gate", "down")
# SPEC 11: which threshold each projection's input uses.
TAU_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_o", "up": "ffn_in",
          "gate": "ffn_in", "down": "ffn_down"}
_REQUIRED = ("vocab_size", "context", "d_model", "n_layers", "n_heads")
_DEFAULTS = dict(ffn_hidden=None, ffn_act="relu2", sparsity=0.0, block=None, rescale="none",
                 bits=None, rope_base=10000.0, norm_eps=1e-6, ffn="glu", n_experts=None,
                 top_experts=None, moe_aux=0.01, sparsify="topk")


# ---- the public functions (SPEC 10) ---------------------------------------------------------


def gpt_forward(params: dict, config, idx) -> np.ndarray:
    """Logits [B, T, V] of token ids idx [B, T] (SPEC section 6)."""
    cfg, dtype, idx = _inputs(params, config, idx)
    return _forward(params, cfg, idx, dtype)[0]


def gpt_loss_and_grads(params: dict, config, idx, targets) -> tuple[float, dict]:
    """(loss, {name: dloss/dparam}): loss = mean cross-entropy of next tokens ``targets`` [B, T]
    (+ moe_aux times the mean load-balancing loss over layers for ffn="moe"); gradients under
    the STE rules of SPEC 1-4, zeros for SPEC 11's thresholds and for unchosen experts."""
    cfg, dtype, idx = _inputs(params, config, idx)
    targets = _targets(targets, idx, cfg)
    logits, cache = _forward(params, cfg, idx, dtype)
    loss, dlogits = _cross_entropy(logits, targets)
    loss += cfg["moe_aux"] * sum(cache["aux"]) / cfg["n_layers"] if cfg["ffn"] == "moe" else 0.0
    return float(loss), _backward(dlogits, params, cfg, cache)


def gpt_trace(params: dict, config, idx, targets=None) -> dict:
    """The reference side of SPEC 10's model comparison: {"trace", "logits", "loss"}.

    ``trace`` maps every projection, in execution order, to (its input exactly as given to the
    projection, before A and sparsify [..., D_in], its output [..., D_out]); names
    ``blocks.{i}.attn.{q,k,v,o}``, ``blocks.{i}.ffn.{up,gate,down}`` and, for MoE,
    ``blocks.{i}.ffn.experts.{e}.{up,gate,down}`` on the routed tokens' rows [n_e, D_in].
    ``loss`` is None without targets."""
    cfg, dtype, idx = _inputs(params, config, idx)
    trace = {}
    logits, cache = _forward(params, cfg, idx, dtype, trace=trace)
    loss = None
    if targets is not None:
        loss = _cross_entropy(logits, _targets(targets, idx, cfg))[0]
        if cfg["ffn"] == "moe":
            loss += cfg["moe_aux"] * sum(cache["aux"]) / cfg["n_layers"]
        loss = float(loss)
    return {"trace": trace, "logits": logits, "loss": loss}


def oracle_param_shapes(config) -> dict:
    """SPEC section 6 parameter names -> shapes for ``config`` (glu or moe; with the four
    thresholds per block when sparsify = "threshold")."""
    c = _config(config)
    d, hidden = c["d_model"], c["ffn_hidden"]
    glu = {"up": (hidden, d), "gate": (hidden, d), "down": (d, hidden)}
    shapes = {"tok_emb": (c["vocab_size"], d)}
    for i in range(c["n_layers"]):
        p = f"blocks.{i}."
        shapes[p + "attn_norm"] = (d,)
        shapes.update({f"{p}attn.{name}": (d, d) for name in "qkvo"})
        shapes[p + "ffn_norm"] = (d,)
        if c["ffn"] == "glu":
            shapes.update({f"{p}ffn.{name}": shape for name, shape in glu.items()})
        else:
            shapes[p + "ffn.router"] = (c["n_experts"], d)
            shapes.update({f"{p}ffn.experts.{e}.{name}": shape
                           for e in range(c["n_experts"]) for name, shape in glu.items()})
        if c["sparsify"] == "threshold":
            shapes.update({f"{p}tau.{name}": () for name in sorted(set(TAU_OF.values()))})
    shapes["norm"] = (d,)
    return shapes


# ---- config, params and inputs -----------------------------------------------------------------


def _config(config) -> dict:
    """A dict of every SPEC 6 / 11 field with defaults filled in, checked enough that the
    forward below cannot go wrong silently."""
    if not isinstance(config, dict):
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        else:
            config = {name: getattr(config, name) for name in (*_REQUIRED, *_DEFAULTS)
                      if hasattr(config, name)}
    unknown = sorted(set(config) - set(_REQUIRED) - set(_DEFAULTS))
    missing = [name for name in _REQUIRED if name not in config]
    if unknown or missing:
        raise ValueError(f"config: unknown keys {unknown}, missing keys {missing}; valid keys are "
                         f"{[*_REQUIRED, *_DEFAULTS]}")
    c = {**_DEFAULTS, **config}
    for name in _REQUIRED:
        _positive(name, c[name])
    if c["ffn_hidden"] is None:
        c["ffn_hidden"] = 16 * round(8 * c["d_model"] / 3 / 16)
    _positive("ffn_hidden", c["ffn_hidden"])
    if c["d_model"] % c["n_heads"] or c["d_model"] // c["n_heads"] % 2:
        raise ValueError(f"config: d_model={c['d_model']} must split into n_heads={c['n_heads']} "
                         "heads of even size")
    for name, choices in (("ffn_act", ("relu2", "silu")), ("rescale", ("none", "l2")),
                          ("ffn", ("glu", "moe")), ("sparsify", ("topk", "threshold")),
                          ("bits", (None, 1.58))):
        if c[name] not in choices:
            raise ValueError(f"config: {name} must be one of {list(choices)}, got {c[name]!r}")
    if c["block"] is not None:
        c["block"] = tuple(c["block"])
    if c["ffn"] == "moe":
        _positive("n_experts", c["n_experts"])
        _positive("top_experts", c["top_experts"])
        if not 2 <= c["n_experts"] or not c["top_experts"] <= c["n_experts"]:
            raise ValueError(f"config: moe needs n_experts >= 2 and 1 <= top_experts <= "
                             f"n_experts, got {c['n_experts']} and {c['top_experts']}")
    if c["sparsify"] == "threshold" and (c["block"] is not None or c["rescale"] != "none"):
        raise ValueError('config: sparsify="threshold" needs block null and rescale "none"')
    return c


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"config: {name} must be a positive integer, got {value!r}")


def _inputs(params, config, idx):
    """(config dict, the params' float dtype, idx as an int array) after checking all three."""
    cfg = _config(config)
    dtype = check_named_arrays(oracle_param_shapes(cfg), params)
    idx = np.asarray(idx)
    if idx.ndim != 2 or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be integer token ids [B, T], got {idx.dtype} {idx.shape}")
    if idx.size == 0:  # a mean over no positions has no value: refuse rather than return NaN
        raise ValueError(f"idx must hold at least one token (B >= 1 and T >= 1), got {idx.shape}")
    if idx.shape[1] > cfg["context"]:
        raise ValueError(f"idx has T={idx.shape[1]} positions, more than "
                         f"context={cfg['context']}")
    if idx.min() < 0 or idx.max() >= cfg["vocab_size"]:
        raise ValueError(f"token ids must lie in [0, {cfg['vocab_size']}), got range "
                         f"[{idx.min()}, {idx.max()}]")
    return cfg, dtype, idx


def _targets(targets, idx, cfg):
    targets = np.asarray(targets)
    if targets.shape != idx.shape or targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer ids of idx's shape {idx.shape}, got "
                         f"{targets.dtype} {targets.shape}")
    if targets.min() < 0 or targets.max() >= cfg["vocab_size"]:
        raise ValueError(f"targets must lie in [0, {cfg['vocab_size']})")
    return targets


# ---- layers: forward returns (out, cache), backward takes (dout, cache) -------------------------


def linear_forward(x, w, cfg, tau=None, frozen=None, name=None):
    """One SparseLinear of SPEC 5 (or SPEC 11 with tau) -> (y [..., D_out], cache).

    ``frozen`` (a dict, for gradient checks) records, or replays, the STE surrogate: the first
    call stores z0, x0, r0, Qw(w0), w0 under ``name``; later calls compute the linearisation
    z = z0 + r0 (x - x0), Qw(w) = Qw(w0) + (w - w0), whose exact derivative is the STE rule."""
    linear = dict(bits=cfg["bits"])
    if tau is not None:
        linear["tau"] = tau
    elif cfg["block"] is not None:
        linear.update(block=cfg["block"], rescale=cfg["rescale"])
    elif cfg["sparsity"]:
        linear.update(sparsity=cfg["sparsity"], rescale=cfg["rescale"])
    if frozen is not None and name in frozen:
        z0, x0, r0, w_hat0, w0 = frozen[name]
        z, r, w_hat = z0 + r0 * (x - x0), r0, w_hat0 + (w - w0)
    else:
        z, _, r, w_hat = linear_parts("gpt", x, w, **linear)
        r = np.ones((*x.shape[:-1], 1), x.dtype) if r is None else r
        if frozen is not None:
            frozen[name] = (z, x, r, w_hat, w)
    return z @ w_hat.T, (z, r, w_hat)


def linear_backward(dy, cache):
    """(dx, dw) of a SparseLinear under the STE: dx = r (dy @ Qw(W)), dw = dy^T z (summed over
    tokens); the mask is not applied (SPEC 1, eq. 13)."""
    z, r, w_hat = cache
    dx = r * (dy @ w_hat)
    dw = dy.reshape(-1, dy.shape[-1]).T @ z.reshape(-1, z.shape[-1])
    return dx, dw


def rmsnorm_forward(x, g, eps):
    """y = x / sqrt(mean(x², -1) + eps) * g, overflow-safe: rows with max|x| = m > 1 are divided
    by m first (y = (x/m) / sqrt(mean((x/m)²) + eps/m/m) * g, the same number), so a finite row
    never overflows; rows with m <= 1 take the formula as written."""
    m = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1).astype(x.dtype)
    xs = x / m
    rs = 1 / np.sqrt((xs * xs).mean(axis=-1, keepdims=True) + eps / m / m)
    xhat = xs * rs
    return xhat * g, (xhat, rs / m, g)


def rmsnorm_backward(dy, cache):
    """(dx, dg): with xhat = x r, dx = r (dxhat - xhat mean(dxhat xhat)), dxhat = dy g."""
    xhat, r, g = cache
    dxhat = dy * g
    dx = r * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, (dy * xhat).reshape(-1, g.shape[0]).sum(axis=0)


def _rope_tables(cfg, t, dtype):
    """cos θ, sin θ [T, d_head], θ = pos · rope_base^(-2i/d_head) repeated over both halves."""
    dh = cfg["d_model"] // cfg["n_heads"]
    inv_freq = cfg["rope_base"] ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    theta = np.outer(np.arange(t), inv_freq)
    theta = np.concatenate([theta, theta], axis=-1)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


def _rope_backward(dy, cos, sin):
    # rope is x -> x cos + R x sin with R^T = -R: dx = dy cos - R(dy sin)
    return dy * cos - _rotate_half(dy * sin)


def attention_forward(h, p, cfg, prefix, taus, frozen=None, trace=None):
    """Causal multi-head attention with RoPE (SPEC 6) on h [B, T, d] -> (y [B, T, d], cache)."""
    caches, outputs = {}, {}
    for name in "qkv":
        outputs[name], caches[name] = _projection(h, p, cfg, prefix + "attn." + name, taus,
                                                  frozen, trace)
    a, core = attend(outputs["q"], outputs["k"], outputs["v"], cfg)
    y, caches["o"] = _projection(a, p, cfg, prefix + "attn.o", taus, frozen, trace)
    return y, (caches, *core)


def attend(q, k, v, cfg):
    """softmax(rope(q) rope(k)^T / sqrt(d_head) + causal mask) v per head, for the q, k, v
    projections' outputs [B, T, d] -> (a [B, T, d], what the backward needs)."""
    B, T, d = q.shape
    H = cfg["n_heads"]
    dh = d // H
    cos, sin = _rope_tables(cfg, T, q.dtype)
    q, k, v = (y.reshape(B, T, H, dh).transpose(0, 2, 1, 3) for y in (q, k, v))  # [B, H, T, dh]
    q, k = _rope(q, cos, sin) * (1.0 / math.sqrt(dh)), _rope(k, cos, sin)
    scores = q @ k.transpose(0, 1, 3, 2)  # [B, H, T, T]
    scores = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, scores)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att = e / e.sum(axis=-1, keepdims=True)
    return (att @ v).transpose(0, 2, 1, 3).reshape(B, T, d), (q, k, v, att, cos, sin)


def attention_backward(dy, cache, cfg):
    """(dh, {projection: dW}) of ``attention_forward``."""
    caches, q, k, v, att, cos, sin = cache
    B, H, T, dh = q.shape
    da, grads = linear_backward(dy, caches["o"])
    grads = {"o": grads}
    da = da.reshape(B, T, H, dh).transpose(0, 2, 1, 3)
    datt, dv = da @ v.transpose(0, 1, 3, 2), att.transpose(0, 1, 3, 2) @ da
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # softmax backward
    dq = _rope_backward(dscores @ k * (1.0 / math.sqrt(dh)), cos, sin)
    dk = _rope_backward(dscores.transpose(0, 1, 3, 2) @ q, cos, sin)
    dh_total = 0
    for name, dhead in (("q", dq), ("k", dk), ("v", dv)):
        dx, grads[name] = linear_backward(dhead.transpose(0, 2, 1, 3).reshape(B, T, H * dh),
                                          caches[name])
        dh_total = dh_total + dx
    return dh_total, grads


def glu_forward(h, p, cfg, prefix, taus, frozen=None, trace=None):
    """GLU feed-forward (SPEC 6): down(up(h) * act(gate(h))) -> (y [..., d], cache)."""
    u, cu = _projection(h, p, cfg, prefix + "up", taus, frozen, trace)
    g, cg = _projection(h, p, cfg, prefix + "gate", taus, frozen, trace)
    a, da = _act(cfg["ffn_act"], g)
    y, cd = _projection(u * a, p, cfg, prefix + "down", taus, frozen, trace)
    return y, (cu, cg, cd, u, a, da)


def glu_backward(dy, cache):
    """(dh, {"up": dW, "gate": dW, "down": dW}) of ``glu_forward``."""
    cu, cg, cd, u, a, da = cache
    df, d_down = linear_backward(dy, cd)
    dh_up, d_up = linear_backward(df * a, cu)
    dh_gate, d_gate = linear_backward(df * u * da, cg)
    return dh_up + dh_gate, {"up": d_up, "gate": d_gate, "down": d_down}


def route(x, router, k_e):
    """SPEC 6's router on tokens x [N, d] -> (p = softmax(x @ router.T) [N, E], chosen [N, E]
    bool: each token's k_e largest p, ties to the lower index -- a stable order of -p)."""
    z = x @ router.T
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    chosen = np.zeros(probs.shape, bool)
    np.put_along_axis(chosen, np.argsort(-probs, axis=-1, kind="stable")[:, :k_e], True, -1)
    return probs, chosen


def moe_forward(h, p, cfg, prefix, taus, frozen=None, trace=None):
    """Mixture of experts (SPEC 6) on h [B, T, d] -> (y, load-balancing loss, cache).

    p = softmax(h @ router.T) in full precision; each token picks the k_e largest p (ties: lower
    index) and sums p_e · expert_e(h) over them (gates not renormalised); each expert runs on its
    routed tokens only. aux = E Σ_e f_e P_e, f_e = (tokens choosing e) / (N k_e), P_e = mean p_e."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    n, n_experts, k_e = x.shape[0], cfg["n_experts"], cfg["top_experts"]
    key = prefix + "choice"
    probs, chosen = route(x, p[prefix + "router"], k_e)
    if frozen is not None:
        chosen = frozen.setdefault(key, chosen)
    y = np.zeros_like(x)
    experts = {}
    for ex in range(n_experts):
        rows = np.flatnonzero(chosen[:, ex])
        if rows.size == 0:
            continue
        out, cache = glu_forward(x[rows], p, cfg, f"{prefix}experts.{ex}.", taus, frozen, trace)
        y[rows] += probs[rows, ex:ex + 1] * out
        experts[ex] = (rows, out, cache)
    f = chosen.sum(axis=0) / (n * k_e)
    aux = n_experts * float(np.sum(f * probs.mean(axis=0)))
    return y.reshape(shape), aux, (x, probs, f, experts)


def moe_backward(dy, daux, cache, p, cfg, prefix):
    """(dh, {name: dW}) of ``moe_forward`` given dL/dy and dL/d(aux); no gradient through the
    choice, none for experts no token chose (they are absent from the result)."""
    x, probs, f, experts = cache
    n, dy_shape = x.shape[0], dy.shape
    dy = dy.reshape(x.shape)
    dx = np.zeros_like(x)
    dprobs = np.broadcast_to(daux * cfg["n_experts"] * f / n, probs.shape).astype(x.dtype)
    grads = {}
    for ex, (rows, out, ecache) in experts.items():
        dprobs[rows, ex] += (dy[rows] * out).sum(axis=-1)
        dxe, egrads = glu_backward(probs[rows, ex:ex + 1] * dy[rows], ecache)
        dx[rows] += dxe
        grads.update({f"{prefix}experts.{ex}.{name}": g for name, g in egrads.items()})
    dz = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
    grads[prefix + "router"] = dz.T @ x
    return (dx + dz @ p[prefix + "router"]).reshape(dy_shape), grads


def _projection(x, p, cfg, name, taus, frozen, trace):
    """SparseLinear ``name`` (a SPEC 6 parameter name) on x, recording (x, y) in ``trace``."""
    tau = taus[TAU_OF[name.rsplit(".", 1)[1]]] if taus else None
    y, cache = linear_forward(x, p[name], cfg, tau, frozen, name)
    if trace is not None:
        trace[name] = (x, y)
    return y, cache


# ---- the model ----------------------------------------------------------------------------------


def _forward(p, cfg, idx, dtype, frozen=None, trace=None):
    """logits [B, T, V] and the cache of every layer."""
    x = p["tok_emb"][idx]  # [B, T, d]
    blocks, aux = [], []
    for i in range(cfg["n_layers"]):
        prefix = f"blocks.{i}."
        taus = None
        if cfg["sparsify"] == "threshold":
            taus = {name: p[f"{prefix}tau.{name}"] for name in set(TAU_OF.values())}
        h, c_norm1 = rmsnorm_forward(x, p[prefix + "attn_norm"], cfg["norm_eps"])
        a, c_attn = attention_forward(h, p, cfg, prefix, taus, frozen, trace)
        x = x + a
        h, c_norm2 = rmsnorm_forward(x, p[prefix + "ffn_norm"], cfg["norm_eps"])
        if cfg["ffn"] == "glu":
            f, c_ffn = glu_forward(h, p, cfg, prefix + "ffn.", taus, frozen, trace)
        else:
            f, layer_aux, c_ffn = moe_forward(h, p, cfg, prefix + "ffn.", taus, frozen, trace)
            aux.append(layer_aux)
        x = x + f
        blocks.append((c_norm1, c_attn, c_norm2, c_ffn))
    xn, c_norm = rmsnorm_forward(x, p["norm"], cfg["norm_eps"])
    logits = xn @ p["tok_emb"].T  # tied head: dense, full precision
    return logits, {"idx": idx, "blocks": blocks, "aux": aux, "norm": c_norm, "xn": xn}


def _cross_entropy(logits, targets):
    """(mean -log softmax(logits)[target], dloss/dlogits = (softmax - onehot) / N)."""
    z = logits.reshape(-1, logits.shape[-1])
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=-1, keepdims=True)
    rows, cols = np.arange(z.shape[0]), targets.reshape(-1)
    loss = float((np.log(total[:, 0]) - z[rows, cols]).mean())
    grad = e / total
    grad[rows, cols] -= 1
    return loss, (grad / z.shape[0]).reshape(logits.shape).astype(logits.dtype)


def _backward(dlogits, p, cfg, cache):
    """dloss/dparam for every parameter, layer by layer from the head down."""
    grads = {name: np.zeros_like(a) for name, a in p.items()}  # thresholds and idle experts: 0
    xn = cache["xn"]
    grads["tok_emb"] += (dlogits.reshape(-1, dlogits.shape[-1]).T
                         @ xn.reshape(-1, xn.shape[-1]))
    dx, grads["norm"] = rmsnorm_backward(dlogits @ p["tok_emb"], cache["norm"])
    daux = cfg["moe_aux"] / cfg["n_layers"]
    for i in reversed(range(cfg["n_layers"])):
        prefix = f"blocks.{i}."
        c_norm1, c_attn, c_norm2, c_ffn = cache["blocks"][i]
        if cfg["ffn"] == "glu":
            dh, ffn_grads = glu_backward(dx, c_ffn)
            ffn_grads = {prefix + "ffn." + name: g for name, g in ffn_grads.items()}
        else:
            dh, ffn_grads = moe_backward(dx, daux, c_ffn, p, cfg, prefix + "ffn.")
        grads.update(ffn_grads)
        dnorm, grads[prefix + "ffn_norm"] = rmsnorm_backward(dh, c_norm2)
        dx = dx + dnorm
        dh, attn_grads = attention_backward(dx, c_attn, cfg)
        grads.update({prefix + "attn." + name: g for name, g in attn_grads.items()})
        dnorm, grads[prefix + "attn_norm"] = rmsnorm_backward(dh, c_norm1)
        dx = dx + dnorm
    np.add.at(grads["tok_emb"], cache["idx"], dx)  # embedding: scatter-add, repeats add up
    return {name: g.astype(p[name].dtype) for name, g in grads.items()}
