"""A training run's output directory: held by one run at a time, and known writable up front.

``claim(out_dir)`` is a context manager: it creates the directory, takes an exclusive
``flock`` on ``out_dir/.minisparse.lock`` (holding our pid) and writes and removes a probe
file, so a locked, read-only or otherwise unwritable ``--out`` is refused at once instead of
at the first checkpoint, hundreds of steps later. The kernel drops a flock when its process
dies, so a lock left by a killed run is simply taken over (with a message naming the old pid).
"""

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (the rest still applies)
    fcntl = None

LOCK_NAME = ".minisparse.lock"


class OutputDirError(OSError):
    """The output directory is in use by another run, or cannot be written."""


@contextmanager
def claim(out_dir):
    """Hold ``out_dir`` for this process; refuse at once if another run holds it."""
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create output directory {out_dir}: "
                             f"{e.strerror or e}") from None
    if not out_dir.is_dir():
        raise OutputDirError(f"output path {out_dir} exists and is not a directory")
    lock_path = out_dir / LOCK_NAME
    fd = _lock(lock_path, out_dir)
    try:
        _probe_writable(out_dir)
        yield out_dir
    finally:
        lock_path.unlink(missing_ok=True)  # while still holding it: see _lock
        os.close(fd)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a run that failed before writing anything leaves no litter


def _lock(lock_path: Path, out_dir: Path) -> int:
    """Open and flock ``lock_path`` (non-blocking) and write our pid into it; -> the fd."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OutputDirError(f"cannot write to output directory {out_dir}: "
                                 f"{e.strerror or e}") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirError(f"{out_dir} is in use by another training run (pid {holder}); "
                                 "wait for it to finish or choose another --out") from None
        # The previous holder unlinks the file before it unlocks; if that happened between our
        # open and our flock, we hold a lock on a deleted file: start again on the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.read(fd, 64).decode("ascii", "replace").strip()
    if stale:  # a clean exit removes the file: this one belongs to a run that was killed
        print(f"minisparse: taking over the lock of {out_dir} left by pid {stale}, which is no "
              "longer running", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _probe_writable(out_dir: Path) -> None:
    probe = out_dir / f".minisparse.probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputDirError(f"cannot write to output directory {out_dir}: "
                             f"{e.strerror or e}") from None
    finally:
        probe.unlink(missing_ok=True)


def check_free_space(out_dir, nbytes: int) -> None:
    """Refuse to start when ``out_dir``'s file system has less than ``nbytes`` free."""
    free = shutil.disk_usage(out_dir).free
    if free < nbytes:
        raise OutputDirError(f"only {free / 2**20:.1f} MB free in {out_dir}; a checkpoint of "
                             f"this run needs about {nbytes / 2**20:.1f} MB")
