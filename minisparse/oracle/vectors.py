"""minisparse golden vectors, format version 2.

One NumPy ``.npz`` file per case, named ``<op>-<case>.npz``, readable with
``np.load(path, allow_pickle=False)``; SPEC.md (the math, to the last rounding rule) ships
beside them. Keys:

  format_version   int64 scalar, 2
  op               str scalar: topk | absmax | absmean | sparse_linear | ffn | gpt
  params           str scalar: a JSON object of the op's keyword arguments (block as [N, M]);
                   for gpt {"config": {SPEC section 6 fields}}
  input.<name>     the op's inputs, in its dtype (float32 or float64); grad_y is dL/d(output)
  output.<name>    forward results
  grad.<name>      dL/d<name> for each differentiable input, given input.grad_y

What each op computes (SPEC.md sections 1-6, 10; STE backward unless "ste": false):

  topk               x, grad_y; k | sparsity | block, rescale, ste -> y, mask, r; grad.x
  absmax             x, grad_y -> q (int8), s [..., 1]; grad.x (= grad_y, STE)
  absmean            w, grad_y -> t (int8), s [] ; grad.w (= grad_y, STE)
  sparse_linear      x, w, grad_y; sparsity, k, block, rescale, bits, ste -> y (and y_int, the
                     integer-code form, when bits = 1.58); grad.x, grad.w
  ffn                h, up, gate, down, grad_y; act + sparse_linear's -> y; grad.h/up/gate/down
  gpt                the whole model: input.param.<SPEC name> (every parameter), input.idx,
                     input.targets -> output.logits [B, T, V], output.loss (mean cross-entropy),
                     output.trace.<projection>.input / .output (every projection's input as
                     given to it, before A and sparsify, and its output, in execution order);
                     grad.<SPEC name> = dloss/dparam

Comparison rule: an entry passes when |got - expected| <= atol + rtol * scale, scale = the
largest |expected| (for a matmul, of the same product over absolute values: |A| @ |B|).
Tolerances (rtol; atol = the dtype's smallest normal number):

  kind          what                                               float32   float64
  exact         masks, codes, top-K outputs without rescale,        0         0
                STE gradients without rescale
  elementwise   the absmax scale, dequantized values               1e-6      2e-15
  reduction     l2 factor r and what it multiplies, the absmean    1e-5      1e-12
                scale, matmul outputs, weight / input gradients,
                logits, loss and model gradients

Codes (q, t, y_int) compare exactly except for SPEC 3's boundary flips: a code may differ by
one where the reference's x·s lies within 8 ulps of a half-integer (never where γ or α is a
power of two and x·s is exactly k + ½). A quantized model is compared projection by projection
(SPEC 10): each trace output against the reference on that implementation's own trace input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..quant import absmax_quantize, absmean_ternarize
from ..sparsity import topk_backward, topk_forward
from .gpt import gpt_loss_and_grads, gpt_trace
from .ops import (
    ffn_backward,
    ffn_forward,
    sparse_linear_backward,
    sparse_linear_forward,
    sparse_linear_int,
)

FORMAT_VERSION = 2


def compute(op, params, inputs):
    """The reference results of one case -> (outputs, grads), dicts of arrays."""
    p = dict(params)  # a block [N, M] from JSON works as it is
    g = inputs.get("grad_y")
    if op == "topk":
        ste = p.pop("ste")
        y, mask, r = topk_forward(inputs["x"], **p)
        return {"y": y, "mask": mask, "r": r}, {"x": topk_backward(g, mask, r, ste)}
    if op == "absmax":
        q, s = absmax_quantize(inputs["x"])
        return {"q": q, "s": s}, {"x": g}
    if op == "absmean":
        t, s = absmean_ternarize(inputs["w"])
        return {"t": t, "s": np.asarray(s)}, {"w": g}
    if op == "sparse_linear":
        x, w, ste = inputs["x"], inputs["w"], p.pop("ste")
        out = {"y": sparse_linear_forward(x, w, **p)}
        if p["bits"] == 1.58:
            out["y_int"] = sparse_linear_int(x, w, **{k: v for k, v in p.items() if k != "bits"})
        gx, gw = sparse_linear_backward(g, x, w, ste=ste, **p)
        return out, {"x": gx, "w": gw}
    if op == "ffn":
        args = [inputs[n] for n in ("h", "up", "gate", "down")]
        grads = ffn_backward(g, *args, **p)
        p.pop("ste")
        return {"y": ffn_forward(*args, **p)}, dict(zip(("h", "up", "gate", "down"), grads,
                                                        strict=True))
    if op == "gpt":
        params = {k[len("param."):]: a for k, a in inputs.items() if k.startswith("param.")}
        idx, targets, config = inputs["idx"], inputs["targets"], p["config"]
        out = gpt_trace(params, config, idx, targets)
        loss, grads = gpt_loss_and_grads(params, config, idx, targets)
        outputs = {"logits": out["logits"], "loss": np.asarray(loss, out["logits"].dtype)}
        for name, (x, y) in out["trace"].items():
            outputs.update({f"trace.{name}.input": x, f"trace.{name}.output": y})
        return outputs, grads
    raise ValueError(f"compute: unknown op {op!r}")


def _cases(rng):
    """(op, case, params, inputs) for every golden vector; all randomness from ``rng``."""

    def normal(*shape, dtype=np.float64, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    def rows(*shape, dtype=np.float64):  # each row at its own magnitude, for per-token scales
        return normal(*shape, dtype=dtype) * 10.0 ** rng.integers(-3, 4, (*shape[:-1], 1))

    ties = rng.choice([0.0, 1.0, -1.0, 2.0, -2.0], (4, 12)).astype(np.float32)
    half = rng.integers(-253, 254, (3, 16)) / 2
    half[:, 0] = 127.0  # s = 1: x * s lands exactly on .5 (SPEC 3: round half to even)
    topk = dict(k=None, sparsity=None, block=None, rescale="none", ste=True)
    linear = dict(sparsity=0.0, k=None, block=None, rescale="none", bits=None, ste=True)
    x, w = normal(3, 5, 16), normal(8, 16, scale=0.1)
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    h, up, gate, down = normal(2, 4, 16), normal(24, 16), normal(24, 16), normal(16, 24)
    yield from (
        ("topk", "k3", {**topk, "k": 3}, {"x": normal(4, 16)}),
        ("topk", "ties_k5", {**topk, "k": 5}, {"x": ties}),
        ("topk", "k1", {**topk, "k": 1}, {"x": normal(4, 16, dtype=np.float32)}),
        ("topk", "kD", {**topk, "k": 16}, {"x": normal(4, 16)}),
        ("topk", "sparsity_l2", {**topk, "sparsity": 0.6, "rescale": "l2"}, {"x": rows(3, 20)}),
        ("topk", "masked", {**topk, "k": 4, "ste": False}, {"x": ties}),
        ("topk", "block_16_32", {**topk, "block": [16, 32]}, {"x": normal(3, 64)}),
        ("absmax", "rows", {}, {"x": rows(4, 16, dtype=np.float32)}),
        ("absmax", "half_steps", {}, {"x": half.astype(np.float32)}),
        ("absmax", "tiny", {}, {"x": normal(2, 8, scale=1e-7)}),
        ("absmean", "normal", {}, {"w": normal(8, 16, dtype=np.float32)}),
        ("absmean", "tiny", {}, {"w": normal(4, 4, scale=1e-7)}),
        ("sparse_linear", "dense", linear, {"x": x, "w": w}),
        ("sparse_linear", "topk", {**linear, "sparsity": 0.5}, {"x": x, "w": w}),
        ("sparse_linear", "topk_l2_masked", {**linear, "k": 5, "rescale": "l2", "ste": False},
         {"x": x, "w": w}),
        ("sparse_linear", "bits", {**linear, "bits": 1.58}, {"x": x32, "w": w32}),
        ("sparse_linear", "bits_topk", {**linear, "bits": 1.58, "sparsity": 0.5},
         {"x": x32, "w": w32}),
        ("sparse_linear", "bits_block_l2", {**linear, "bits": 1.58, "block": [2, 4],
                                            "rescale": "l2"}, {"x": x, "w": w}),
        ("ffn", "relu2_sparse_bits", {**linear, "act": "relu2", "sparsity": 0.5, "bits": 1.58},
         {"h": h, "up": up, "gate": gate, "down": down}),
        ("ffn", "silu_dense", {**linear, "act": "silu"},
         {"h": h, "up": up, "gate": gate, "down": down}),
        ("gpt", "bits_topk_l2", {"config": GPT_CONFIG}, _gpt_inputs(rng, GPT_CONFIG)),
        ("gpt", "moe_bits", {"config": {**GPT_CONFIG, "ffn": "moe", "n_experts": 3,
                                        "top_experts": 2}},
         _gpt_inputs(rng, {**GPT_CONFIG, "ffn": "moe", "n_experts": 3, "top_experts": 2})),
    )


GPT_CONFIG = dict(vocab_size=11, context=6, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16,
                  ffn_act="relu2", sparsity=0.5, block=None, rescale="l2", bits=1.58,
                  rope_base=10000.0, norm_eps=1e-6)


def _gpt_inputs(rng, config):
    """Parameters (SPEC 6 names; normal(0, 0.3) matrices, gains near 1), idx and targets."""
    from .gpt import oracle_param_shapes

    inputs = {}
    for name, shape in oracle_param_shapes(config).items():
        scale = 0.1 if len(shape) == 1 else 0.3
        inputs[f"param.{name}"] = (len(shape) == 1) + scale * rng.standard_normal(shape)
    inputs["idx"] = rng.integers(0, config["vocab_size"], (2, config["context"]))
    inputs["targets"] = rng.integers(0, config["vocab_size"], (2, config["context"]))
    return inputs


def write_vectors(out_dir, seed=0):
    """Write every golden vector (and README.txt, this format) to ``out_dir``; -> list of paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "README.txt").write_text(__doc__)
    (out_dir / "SPEC.md").write_text((Path(__file__).parent / "SPEC.md").read_text())
    rng = np.random.default_rng(seed)
    paths = []
    for op, case, params, inputs in _cases(rng):
        first = next(iter(inputs.values()))  # x, w or h: it sets the dtype and, but for
        shape = first.shape                  # sparse_linear (d_in -> d_out), the output shape
        if op == "sparse_linear":
            shape = (*shape[:-1], inputs["w"].shape[0])
        if op != "gpt":  # the model's gradients are of its loss
            inputs = {**inputs, "grad_y": rng.standard_normal(shape).astype(first.dtype)}
        outputs, grads = compute(op, params, inputs)
        arrays = {"format_version": np.array(FORMAT_VERSION), "op": np.array(op),
                  "params": np.array(json.dumps(params, sort_keys=True))}
        for prefix, group in (("input", inputs), ("output", outputs), ("grad", grads)):
            arrays.update({f"{prefix}.{name}": a for name, a in group.items()})
        path = out_dir / f"{op}-{case}.npz"
        np.savez(path, **arrays)
        paths.append(path)
    return paths


def read_vector(path):
    """Load one golden vector -> dict(op, params, inputs, outputs, grads); checks the version."""
    with np.load(path, allow_pickle=False) as data:
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"read_vector: {path} has format_version {version}, this minisparse "
                             f"reads {FORMAT_VERSION}")
        vector = {"op": str(data["op"]), "params": json.loads(str(data["params"])),
                  "inputs": {}, "outputs": {}, "grads": {}}
        for key in data.files:
            prefix, _, name = key.partition(".")
            group = {"input": "inputs", "output": "outputs", "grad": "grads"}.get(prefix)
            if group is not None:
                vector[group][name] = data[key]
    return vector
