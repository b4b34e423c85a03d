"""Checkpoints written before the issue-12 refactor (commit cd9ecaa, see tests/data/README.md)
still load and evaluate to the same float32 loss: bit for bit on the NumPy reference, within
float32 rounding on the Numba backend (whose fused attention, RMSNorm and GLU ops, added
later, sum in another order)."""

from pathlib import Path

import numpy as np
import pytest

from minisparse.checkpoint import load_checkpoint
from minisparse.model import GPT

DATA = Path(__file__).parent / "data"
# float32 losses computed by commit cd9ecaa (identical on the numpy and numba backends then)
LOSSES = {"dense": float.fromhex("0x1.b56d620000000p+1"),
          "sparse_ternary": float.fromhex("0x1.b578de0000000p+1")}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_legacy_checkpoint_reproduces_its_loss(name, backend):
    ckpt = load_checkpoint(DATA / f"legacy_{name}.npz")
    rng = np.random.default_rng(7)
    idx = rng.integers(0, ckpt.config.vocab_size, (2, 16))
    targets = rng.integers(0, ckpt.config.vocab_size, (2, 16))
    model = GPT.from_params(ckpt.config, ckpt.params, backend=backend)
    loss = model(idx, targets)[1].item()
    if backend == "numpy":
        assert loss == LOSSES[name]
    else:  # a few float32 ulps of a loss near 3.4 (one ulp: 2.4e-7)
        assert loss == pytest.approx(LOSSES[name], rel=1e-6, abs=0)
