"""Shared test setup: hypothesis profiles and lesson fast mode.

In CI (``CI`` set) hypothesis runs with its built-in ``ci`` profile: derandomized, no
deadline, no example database -- the same examples on every run.
"""

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# Lessons executed under pytest (nbmake) run in their fast mode; the kernel inherits this.
os.environ.setdefault("MINISPARSE_FAST", "1")
