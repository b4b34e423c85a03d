"""minisparse.torch: the SPEC model in PyTorch (the ``torch`` extra).

- ``functions``: top-K / N:M / threshold sparsification with the straight-through estimator,
  int8 and ternary fake quantization, ``qsparse_linear`` (SPEC 1-5, 11);
- ``modules``: ``QSparseLinear`` (a drop-in for a bias-free ``nn.Linear``), the GLU and MoE
  feed-forwards; ``model``: ``GPT``, whose ``state_dict`` uses SPEC 6's names;
- ``train``: the SPEC 9 recipe on one or many processes (``torchrun -m minisparse.torch.train``);
- ``convert``: safetensors / torch files <-> minisparse checkpoints.

``import minisparse`` never imports torch; this package does.
"""

from .functions import block_topk_mask, qsparse_linear, threshold, topk, topk_mask
from .model import GPT
from .modules import GLU, MoE, QSparseLinear

__all__ = ["GLU", "GPT", "MoE", "QSparseLinear", "block_topk_mask", "qsparse_linear",
           "threshold", "topk", "topk_mask"]
