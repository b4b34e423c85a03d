"""The functional oracle of SPEC section 10: pure NumPy reference functions (in progress)."""

from .gpt import gpt_forward, gpt_loss_and_grads  # noqa: F401  (SPEC 10, the whole model)
