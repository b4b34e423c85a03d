"""Shared test setup: hypothesis profiles, lesson fast mode, and the device / SIMD-path
fixtures the kernel and PyTorch tests run on.

In CI (``CI`` set) hypothesis runs with its built-in ``ci`` profile: derandomized, no
deadline, no example database -- the same examples on every run.
"""

import os

import pytest
from hypothesis import settings

from minisparse.kernels import simd

settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Lessons executed under pytest (nbmake) run in their fast mode; the kernel inherits this.
os.environ.setdefault("MINISPARSE_FAST", "1")


@pytest.fixture(params=["cpu", "cuda"])
def torch_device(request):
    """Each PyTorch test on the CPU and, where one is present, on a CUDA device."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    return torch.device(request.param)


@pytest.fixture(params=simd.LEVELS)
def level(request, monkeypatch):
    """Run the ternary kernels on each SIMD path (MINISPARSE_SIMD); skip those the CPU lacks."""
    if request.param not in simd.host_levels():
        pytest.skip(f"this CPU runs only {simd.host_levels()}, not {request.param}")
    monkeypatch.setenv("MINISPARSE_SIMD", request.param)
    return request.param
