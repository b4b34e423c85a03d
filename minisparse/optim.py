"""AdamW with per-group settings, the SPEC section 9 learning-rate schedule, and global
gradient-norm clipping."""

from __future__ import annotations

import math

import numpy as np


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), step for step like
    ``torch.optim.AdamW``: p *= 1 - lr*wd; m, v = EMAs of g, g^2;
    p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).

    ``params`` is an iterable of Parameters or of groups ``{"params": [...], **overrides}``;
    change the rate with ``for group in opt.param_groups: group["lr"] = ...``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            unknown = group.keys() - defaults.keys() - {"params"}
            if unknown:
                raise ValueError(f"AdamW: unknown group keys {sorted(unknown)}; allowed: "
                                 f"params, {', '.join(defaults)}")
            self.param_groups.append({**defaults, **group, "params": list(group["params"])})
        self.params = [p for group in self.param_groups for p in group["params"]]
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                raise ValueError(f"AdamW: parameter {i} {p.shape} does not require grad")
        self.state = {}  # index in self.params -> {"step": int, "m": array, "v": array}

    def step(self):
        """Update every parameter that has a gradient (ones without are skipped, as in torch)."""
        i = 0
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    self._update(i, p, lr, b1, b2, eps, wd)
                i += 1

    def _update(self, i, p, lr, b1, b2, eps, wd):
        s = self.state.setdefault(
            i, {"step": 0, "m": np.zeros_like(p.data), "v": np.zeros_like(p.data)})
        s["step"] += 1
        g, m, v, t = p.grad, s["m"], s["v"], s["step"]
        if wd:
            p.data *= 1 - lr * wd  # decoupled: decay the weights, not the gradient
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
        p.data -= (lr / (1 - b1**t)) * m / denom

    def zero_grad(self):
        for p in self.params:
            p.zero_grad()

    def state_dict(self):
        """Flat ``{"m.{i}": array, "v.{i}": array, "step.{i}": int}`` over parameter indices
        (plain arrays and ints, so it saves to .npz without pickle)."""
        out = {}
        for i, s in self.state.items():
            out[f"m.{i}"], out[f"v.{i}"], out[f"step.{i}"] = s["m"].copy(), s["v"].copy(), s["step"]
        return out

    def load_state_dict(self, state):
        """Restore moments and step counts saved by ``state_dict`` for the same parameter list."""
        self.state = {}
        for key in state:
            kind, _, index = key.partition(".")
            if kind not in ("m", "v", "step") or not index.isdigit() or int(index) >= len(
                    self.params):
                raise ValueError(f"AdamW.load_state_dict: unexpected key {key!r} for "
                                 f"{len(self.params)} parameters")
        for i, p in enumerate(self.params):
            if f"step.{i}" not in state:
                continue
            m, v = np.asarray(state[f"m.{i}"]), np.asarray(state[f"v.{i}"])
            if m.shape != p.shape or v.shape != p.shape:
                raise ValueError(f"AdamW.load_state_dict: m.{i} {m.shape} / v.{i} {v.shape} do "
                                 f"not match parameter {i} {p.shape}")
            self.state[i] = {"step": int(state[f"step.{i}"]), "m": m.astype(p.dtype),
                             "v": v.astype(p.dtype)}


def lr_at(it, *, max_iters, lr, min_lr, warmup):
    """SPEC section 9: lr * (it+1) / (warmup+1) for it < warmup, then cosine from lr at
    it = warmup down to min_lr at the last step it = max_iters - 1 (and after)."""
    if it < 0 or max_iters < 1 or warmup < 0:
        raise ValueError(f"lr_at: need it >= 0, max_iters >= 1, warmup >= 0; got it={it}, "
                         f"max_iters={max_iters}, warmup={warmup}")
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it >= max_iters - 1:
        return min_lr
    progress = (it - warmup) / (max_iters - 1 - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def clip_grad_norm(params, max_norm):
    """Scale all gradients by max_norm / (total + 1e-6) when the global L2 norm ``total`` of
    all of them exceeds max_norm (as torch does); returns ``total`` (before clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g *= coef  # leaf grads are owned by their tensors (the engine copies), so in place
    return total
