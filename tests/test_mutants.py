"""The mutation suite: every wrong implementation in mutants.py is caught by the harness at its
default settings, every correct one passes (issue 13). Run with --durations to see the time
each mutant takes to be caught."""

import pytest
from mutants import NUMPY_CONTROLS, NUMPY_MUTANTS, torch_cases

from minisparse.oracle.harness import OPS, check

try:
    import torch
except ImportError:
    torch = None

TORCH_MUTANTS, TORCH_CONTROLS = torch_cases() if torch is not None else ([], [])
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def test_the_suite_is_big_enough_and_covers_every_op():
    assert len(NUMPY_MUTANTS) + len(TORCH_MUTANTS) >= 30
    assert set(NUMPY_CONTROLS) == set(OPS)


@pytest.mark.parametrize("op, fn", NUMPY_MUTANTS, ids=[fn.__name__ for _, fn in NUMPY_MUTANTS])
def test_numpy_mutant_is_caught(op, fn):
    report = check(op, fn)
    assert not report.passed, f"{fn.__doc__}\n{report}"
    assert "failing input" in str(report)


@pytest.mark.parametrize("op", sorted(NUMPY_CONTROLS))
def test_numpy_control_passes(op):
    report = check(op, NUMPY_CONTROLS[op])
    assert report.passed, str(report)


@needs_torch
@pytest.mark.parametrize("i", range(len(TORCH_MUTANTS)))
def test_torch_mutant_is_caught(i):
    op, fn = TORCH_MUTANTS[i]
    report = check(op, fn)
    assert not report.passed, f"{fn.__doc__}\n{report}"


@needs_torch
@pytest.mark.parametrize("i", range(len(TORCH_CONTROLS)))
def test_torch_control_passes(i):
    op, fn = TORCH_CONTROLS[i]
    report = check(op, fn)
    assert report.passed, f"{fn.__doc__}\n{report}"
