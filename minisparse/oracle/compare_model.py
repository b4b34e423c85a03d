"""SPEC section 10's model comparison: another implementation's forward, projection by projection.

A quantized model's logits cannot be held to a tolerance end to end: one boundary flip (SPEC 3)
upstream moves everything after it. So ``compare_model`` takes the other implementation's
*trace* and checks every step on that implementation's own values:

- each projection's output against the reference applied to its own input (codes under SPEC 3's
  rule: where codes sit on a rounding boundary, the variants of a legitimate flip are tried,
  row by row, and counted as boundary flips);
- everything between the projections (RMSNorm, RoPE attention, the GLU, the MoE routing and
  gates, the residual stream, the head) against the reference applied to the implementation's
  own projection outputs, reconstructing the residual stream from them;
- the logits, and the loss from those logits.

Trace format (agreed with the PyTorch twin): ``trace[name] = (input, output)`` in execution
order, ``input`` exactly as given to the projection (before A and sparsify) [..., D_in] and
``output`` [..., D_out]; names ``blocks.{i}.attn.{q,k,v,o}``, ``blocks.{i}.ffn.{up,gate,down}``
and for MoE ``blocks.{i}.ffn.experts.{e}.{up,gate,down}`` on the routed tokens' rows
[n_e, D_in] in token order. ``gpt_trace`` produces the reference's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..quant import absmax_quantize
from .flips import absmax_boundaries, row_variants
from .gpt import TAU_OF, _act, _cross_entropy, _inputs, attend, rmsnorm_forward, route
from .ops import linear_parts
from .tolerances import compare


@dataclass
class ModelReport:
    """The outcome of ``compare_model``."""

    passed: bool
    first_mismatch: str | None = None  # e.g. "blocks.1.attn.o", "blocks.0.ffn_norm", "logits"
    detail: str = ""
    flips: dict = field(default_factory=dict)  # projection -> boundary flips explained
    checked: list = field(default_factory=list)  # what was compared, in order

    def __str__(self):
        flips = sum(self.flips.values())
        if self.passed:
            text = f"model comparison: OK, {len(self.checked)} steps agree with the reference"
            if flips:
                text += (f"; {flips} boundary flips (SPEC 3) in "
                         f"{', '.join(sorted(self.flips))} alone explain the logits' difference")
            return text
        return (f"model comparison: FAILED at {self.first_mismatch} (after "
                f"{len(self.checked) - 1} matching steps; {flips} boundary flips before it)\n"
                f"  {self.detail}")


class _Failed(Exception):
    pass


def compare_model(params, config, idx, trace, logits, loss=None, targets=None) -> ModelReport:
    """Check another implementation's forward (``trace``, ``logits`` [B, T, V], optional
    ``loss`` with ``targets``) against the reference, step by step (module docstring)."""
    cfg, dtype, idx = _inputs(params, config, idx)
    report = ModelReport(True)
    try:
        _walk(params, cfg, idx, dict(trace), np.asarray(logits), loss, targets, dtype, report)
    except _Failed:
        report.passed = False
    return report


def _step(report, name, got, expected, kind="reduction", scale=None):
    """Compare one intermediate; record it; raise _Failed naming it on a mismatch."""
    report.checked.append(name)
    mismatch = compare(name, np.asarray(got), np.asarray(expected, dtype=np.asarray(got).dtype)
                       if np.asarray(got).dtype.kind == "f" else expected, kind, scale)
    if mismatch is not None:
        report.first_mismatch, report.detail = name, str(mismatch)
        raise _Failed


def _take(trace, name, report):
    if name not in trace:
        report.first_mismatch = name
        report.detail = f"the trace has no entry {name!r} (names: SPEC 6, in execution order)"
        raise _Failed
    x, y = trace.pop(name)
    return np.asarray(x), np.asarray(y)


def _projection(trace, name, params, cfg, dtype, report, taus):
    """The implementation's (input, output) of projection ``name`` after checking the output
    against the reference on that input (boundary flips tried row by row)."""
    x, y = _take(trace, name, report)
    w = params[name]
    kwargs = _linear_kwargs(cfg, taus, name)
    z, _, _, w_hat = linear_parts("compare_model", x.astype(dtype), w, **kwargs)
    expected = z @ w_hat.T
    scale = np.abs(z) @ np.abs(w_hat).T
    report.checked.append(name)
    if y.shape == expected.shape and compare(name, y, expected, "reduction", scale) is None:
        return x, y
    if cfg["bits"] and y.shape == expected.shape:
        flips = _explain_by_flips(x.astype(dtype), w, y, scale, kwargs)
        if flips:
            report.flips[name] = flips
            return x, y
    report.first_mismatch = name
    report.detail = (str(compare(name, y, expected, "reduction", scale)) +
                     " (the reference applied to this projection's own input; no boundary "
                     "flip of its int8 codes explains the difference)")
    raise _Failed


def _linear_kwargs(cfg, taus, name):
    kwargs = {"bits": cfg["bits"]}
    if taus is not None:
        kwargs["tau"] = taus[TAU_OF[name.rsplit(".", 1)[1]]]
    elif cfg["block"] is not None:
        kwargs.update(block=cfg["block"], rescale=cfg["rescale"])
    elif cfg["sparsity"]:
        kwargs.update(sparsity=cfg["sparsity"], rescale=cfg["rescale"])
    return kwargs


def _explain_by_flips(x, w, y, scale, kwargs):
    """Flips needed so that every row of y is the reference on flipped codes, or 0 if none do.
    The mask and the product are recomputed on the flipped codes (one flip can move a tie)."""
    rows, got = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    scale = scale.reshape(got.shape)
    boundary, v = absmax_boundaries(rows)
    flips = 0
    for i in range(rows.shape[0]):
        codes = absmax_quantize(rows[i:i + 1])[0][0]
        for variant, n in row_variants(codes, boundary[i], v[i], -128, 127):
            z, _, _, w_hat = linear_parts("compare_model", rows[i:i + 1], w,
                                          x_codes=variant[None], **kwargs)
            if compare("y", got[i:i + 1], z @ w_hat.T, "reduction", scale[i:i + 1]) is None:
                flips += n
                break
        else:
            return 0
    return flips


def _walk(p, cfg, idx, trace, logits, loss, targets, dtype, report):
    eps = cfg["norm_eps"]
    x = p["tok_emb"][idx]  # the residual stream, rebuilt from the implementation's outputs
    aux = []
    for i in range(cfg["n_layers"]):
        pre = f"blocks.{i}."
        taus = ({n: p[f"{pre}tau.{n}"] for n in set(TAU_OF.values())}
                if cfg["sparsify"] == "threshold" else None)
        h = rmsnorm_forward(x, p[pre + "attn_norm"], eps)[0]
        outs = {}
        for name in "qkv":
            x_in, outs[name] = _projection(trace, pre + "attn." + name, p, cfg, dtype, report,
                                           taus)
            if name == "q":
                _step(report, pre + "attn_norm", x_in, h)
        a = attend(outs["q"], outs["k"], outs["v"], cfg)[0]
        a_in, o = _projection(trace, pre + "attn.o", p, cfg, dtype, report, taus)
        _step(report, pre + "attn (softmax(q k^T) v)", a_in, a)
        x = x + o
        h = rmsnorm_forward(x, p[pre + "ffn_norm"], eps)[0]
        if cfg["ffn"] == "glu":
            f = _glu(trace, pre + "ffn.", p, cfg, dtype, report, taus, h, pre + "ffn_norm")
        else:
            f, layer_aux = _moe(trace, pre + "ffn.", p, cfg, dtype, report, taus, h)
            aux.append(layer_aux)
        x = x + f
    if trace:
        report.first_mismatch = next(iter(trace))
        report.detail = "a projection SPEC 6 does not run (or not for these tokens)"
        raise _Failed
    expected = rmsnorm_forward(x, p["norm"], eps)[0] @ p["tok_emb"].T
    _step(report, "logits", logits, expected)
    if loss is not None:
        if targets is None:
            raise ValueError("compare_model: a loss needs its targets")
        ce = _cross_entropy(logits.astype(dtype), np.asarray(targets))[0]
        if cfg["ffn"] == "moe":
            ce += cfg["moe_aux"] * sum(aux) / cfg["n_layers"]
        _step(report, "loss", np.asarray(loss, dtype), np.asarray(ce, dtype), scale=abs(ce) + 1)


def _glu(trace, prefix, p, cfg, dtype, report, taus, h, norm_name):
    """The GLU on the implementation's outputs: up/gate inputs = h, down input = u * act(g)."""
    h_in, u = _projection(trace, prefix + "up", p, cfg, dtype, report, taus)
    if norm_name is not None:
        _step(report, norm_name, h_in, h)
    else:
        _step(report, prefix + "up (routed rows)", h_in, h)
    gate_in, g = _projection(trace, prefix + "gate", p, cfg, dtype, report, taus)
    _step(report, prefix + "gate input", gate_in, h_in)
    f_in, y = _projection(trace, prefix + "down", p, cfg, dtype, report, taus)
    _step(report, prefix + "down input (u * act(g))", f_in, u * _act(cfg["ffn_act"], g)[0])
    return y


def _moe(trace, prefix, p, cfg, dtype, report, taus, h):
    """SPEC 6's routing recomputed on h; each chosen expert's rows checked, outputs gated."""
    shape = h.shape
    x = h.reshape(-1, shape[-1])
    k_e = cfg["top_experts"]
    probs, chosen = route(x, p[prefix + "router"], k_e)
    y = np.zeros_like(x)
    for ex in range(cfg["n_experts"]):
        rows = np.flatnonzero(chosen[:, ex])
        name = f"{prefix}experts.{ex}."
        if rows.size == 0:
            if name + "up" in trace:
                report.first_mismatch = name + "up"
                report.detail = "the reference routes no token to this expert"
                raise _Failed
            continue
        out = _glu(trace, name, p, cfg, dtype, report, taus, x[rows], None)
        y[rows] += probs[rows, ex:ex + 1] * out
    f = chosen.sum(axis=0) / (x.shape[0] * k_e)
    return y.reshape(shape), cfg["n_experts"] * float(np.sum(f * probs.mean(axis=0)))

