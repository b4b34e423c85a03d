"""Writes legacy_*.npz with the code of commit cd9ecaa and prints their losses (see README.md)."""

import json

import numpy as np

from minisparse.checkpoint import Checkpoint, save_checkpoint
from minisparse.model import GPT, GPTConfig

vocab = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz .,\n")))
out = {}
variants = [("dense", {}),
            ("sparse_ternary", dict(sparsity=0.5, bits=1.58, rescale="l2", ffn_act="silu"))]
for name, extra in variants:
    cfg = GPTConfig(vocab_size=len(vocab), context=16, d_model=16, n_layers=1, n_heads=2, **extra)
    model = GPT(cfg, np.random.default_rng(123), backend="numpy")
    save_checkpoint(f"tests/data/legacy_{name}.npz",
                    Checkpoint(config=cfg, params=model.state_dict(), vocab=vocab, step=0))
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(vocab), (2, 16))
    tgt = rng.integers(0, len(vocab), (2, 16))
    loss = {}
    for backend in ("numpy", "numba"):
        m = GPT.from_params(cfg, model.state_dict(), backend=backend)
        loss[backend] = float(m(idx, tgt)[1].item())
    out[name] = {"loss_numpy": loss["numpy"].hex(), "loss_numba": loss["numba"].hex()}
print(json.dumps(out, indent=1))
