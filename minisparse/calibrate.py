"""Training-free threshold sparsity (SPEC section 11, TEAL-style): calibrate one tau per
distinct projection input of every block from one forward pass over training tokens.

For each input site (``attn_in`` of q/k/v, ``attn_o``, ``ffn_in`` of up/gate, ``ffn_down``)
collect |A(x)| over the calibration tokens with the model's A on and all sparsification off,
then tau = a_j, the j-th smallest (1-indexed), j = floor(S n). An MoE block pools its experts:
``ffn_in`` counts each token once (A is per token, so every expert sees the same A(h)),
``ffn_down`` takes every expert's inputs on the tokens routed to it.
"""

from __future__ import annotations

import math

import numpy as np

from .checkpoint import Checkpoint
from .data import CharTokenizer, get_batch, make_dataset
from .model import GPT, GPTConfig
from .moe import MoE
from .sparsity import calibrate_threshold
from .tensor import Tensor, no_grad

SITES = ("attn_in", "attn_o", "ffn_in", "ffn_down")
DEFAULT_TOKENS = 8192


def threshold_config(config: GPTConfig, sparsity: float) -> GPTConfig:
    """The config of the thresholded model: sparsify "threshold", the target S recorded in
    ``sparsity``, no N:M block, no re-scale (SPEC 11)."""
    return GPTConfig.from_dict({**config.to_dict(), "sparsify": "threshold",
                                "sparsity": sparsity, "block": None, "rescale": "none"})


def collect_inputs(model: GPT, idx: np.ndarray) -> list[dict]:
    """Per block, {site: |A(x)| of every collected input, float64 1-D} from one forward pass of
    ``model`` (a threshold model with every tau 0: A on, nothing but exact zeros dropped)."""
    found = [{site: [] for site in SITES} for _ in model.blocks]

    def keep(block, site):
        return lambda a, d_in, d_out: found[block][site].append(np.abs(a).reshape(-1))

    for i, block in enumerate(model.blocks):
        block.attn.q.observe = keep(i, "attn_in")  # k and v multiply the same A(h)
        block.attn.o.observe = keep(i, "attn_o")
        if isinstance(block.ffn, MoE):
            act_quant = block.ffn.experts[0].up.act_quant
            block.ffn.observe_input = lambda h, i=i, q=act_quant: found[i]["ffn_in"].append(
                np.abs(q(Tensor(h)).data).reshape(-1))
            for expert in block.ffn.experts:
                expert.down.observe = keep(i, "ffn_down")
        else:
            block.ffn.up.observe = keep(i, "ffn_in")  # gate multiplies the same A(h)
            block.ffn.down.observe = keep(i, "ffn_down")
    with no_grad():
        model(idx)
    model.observe(None)
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            block.ffn.observe_input = None
    return [{site: np.concatenate(v).astype(np.float64) for site, v in sites.items()}
            for sites in found]


def calibrate(ckpt: Checkpoint, sparsity: float, text: str, *, tokens: int = DEFAULT_TOKENS,
              seed: int = 0) -> tuple[Checkpoint, dict]:
    """A thresholded copy of ``ckpt`` calibrated for sparsity S on ``tokens`` tokens of the
    training split of ``text`` (windows drawn by default_rng(seed)) -> (checkpoint, taus)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    config = threshold_config(ckpt.config, sparsity)
    dtype = next(iter(ckpt.params.values())).dtype
    params = {name: a for name, a in ckpt.params.items() if ".tau." not in name}
    zeros = {f"blocks.{i}.tau.{site}": np.zeros((), dtype)
             for i in range(config.n_layers) for site in SITES}
    model = GPT.from_params(config, {**params, **zeros}, backend="numpy")
    data = make_dataset(text, config.context, CharTokenizer(ckpt.vocab))
    idx, _ = get_batch(np.random.default_rng(seed), data.train,
                       math.ceil(tokens / config.context), config.context)
    taus = {}
    for i, sites in enumerate(collect_inputs(model, idx)):
        for site, values in sites.items():
            taus[f"blocks.{i}.tau.{site}"] = calibrate_threshold(values, sparsity)
    new_params = {**params, **{name: np.array(tau, dtype) for name, tau in taus.items()}}
    new_params = {name: new_params[name] for name, _ in model.named_parameters()}  # SPEC order
    history = {**ckpt.history, "calibration": {"sparsity": sparsity, "tokens": int(idx.size),
                                               "seed": seed, "taus": taus}}
    return Checkpoint(config=config, params=new_params, vocab=ckpt.vocab, step=ckpt.step,
                      settings=ckpt.settings, data=ckpt.data, history=history), taus
