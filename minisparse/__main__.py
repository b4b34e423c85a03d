"""``python -m minisparse`` (and the ``minisparse`` command) runs the command line."""

import sys


def run() -> int:
    """Import the command line and run it; a Ctrl-C while NumPy and Numba load exits 130 with
    one line, like a Ctrl-C at any later moment (``cli.main`` handles those)."""
    try:
        from .cli import main
    except KeyboardInterrupt:
        print("minisparse: error: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
