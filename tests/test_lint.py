"""The code stays ruff-clean under pyproject's [tool.ruff] rules; in the suite so CI checks it."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    pytest.importorskip("ruff")  # a dev dependency
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "minisparse", "tests",
                           "lessons/render.py", "lessons/solutions"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
