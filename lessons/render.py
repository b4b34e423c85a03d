"""Execute lessons in full mode and store their outputs in place, so they read on GitHub.

    python -m lessons.render                         # every lesson (from the repository root)
    python -m lessons.render 04_tiny_transformer     # some of them (name, file or path)

Each notebook runs top to bottom in a fresh kernel with ``MINISPARSE_FAST`` unset (full mode)
and this checkout first on ``PYTHONPATH``. Its metadata then records ``code_sha256`` -- the
hash of its code cells, which tests/test_lessons.py compares with the committed code, so
stored outputs always come from the committed code -- the wall and CPU seconds the run took
and the machine's load. Noise is stripped: widget state and carriage-return progress bars.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from pathlib import Path

LESSONS = Path(__file__).resolve().parent
ROOT = LESSONS.parent
CELL_TIMEOUT = 1800  # seconds; a full-mode lesson should take minutes, not half an hour


def code_sha256(nb) -> str:
    """sha256 of the code cells' sources, each followed by a NUL (so cell boundaries count)."""
    sources = (_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    return hashlib.sha256("".join(s + "\0" for s in sources).encode()).hexdigest()


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _clean(nb) -> None:
    """Drop what would only add noise to the diff: widget state, per-cell timestamps,
    progress-bar redraws."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        kept = []
        for out in cell.outputs:
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                continue
            if out.get("output_type") == "stream" and "\r" in out.text:
                # keep each line's last redraw, as a terminal would show it
                out.text = "\n".join(line.rsplit("\r", 1)[-1] for line in out.text.split("\n"))
            kept.append(out)
        cell.outputs = kept


def render(path: Path) -> float:
    """Execute one notebook in full mode, store its outputs and metadata; -> seconds taken."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_fast = os.environ.pop("MINISPARSE_FAST", None)  # the kernel inherits our environment
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        t0, cpu0 = time.perf_counter(), _children_cpu_seconds()
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(LESSONS)}}).execute()
        seconds = time.perf_counter() - t0
        cpu_seconds = _children_cpu_seconds() - cpu0  # the kernel's, once it has exited
    finally:
        if env_fast is not None:
            os.environ["MINISPARSE_FAST"] = env_fast
    for seconds_taken, index in _slowest_cells(nb):
        print(f"  code cell {index}: {seconds_taken:.0f} s", flush=True)
    _clean(nb)
    nb.metadata["minisparse"] = {
        "code_sha256": code_sha256(nb), "mode": "full", "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1), "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 1)}
    nbformat.write(nb, path)
    return seconds


def _when(stamp):
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # Python < 3.11 wants +00:00


def _slowest_cells(nb, n=3):
    """[(seconds, cell index)] of the n slowest cells, from nbclient's execution timestamps."""
    times = []
    for i, cell in enumerate(nb.cells):
        stamps = cell.metadata.get("execution", {})
        start, end = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
        if start and end:
            taken = _when(end) - _when(start)
            times.append((taken.total_seconds(), i))
    return sorted(times, reverse=True)[:n]


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children (the kernels): unlike the
    wall time, it hardly depends on what else the machine is running."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _resolve(name: str) -> Path:
    candidates = [Path(name), LESSONS / name, LESSONS / f"{name}.ipynb"]
    for path in candidates:
        if path.is_file() and path.suffix == ".ipynb":
            return path.resolve()
    raise SystemExit(f"render: no lesson {name!r} (expected e.g. 04_tiny_transformer or "
                     f"lessons/04_tiny_transformer.ipynb)")


def main(argv=None) -> int:
    names = sys.argv[1:] if argv is None else argv
    paths = [_resolve(n) for n in names] or sorted(LESSONS.glob("*.ipynb"))
    for path in paths:
        print(f"rendering {path.name} in full mode ...", flush=True)
        seconds = render(path)
        print(f"  {path.name}: {seconds:.0f} s, outputs stored", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
