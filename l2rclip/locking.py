"""An exclusive lock on a stage's output folder, held for the life of the process that writes it.

Killing only `dvc repro` leaves its child (the trainer) running; without a lock the next repro
starts a second trainer on the same folder and the two overwrite each other's checkpoints. The
lock is an OS advisory lock (`fcntl.flock`) on a file beside the folder, so it disappears with
its process however that ends (even `kill -9`): a stale lock file never blocks anything. The
holder writes its PID into the file, so a refused run can say who holds it. POSIX only.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OutputLockedError(RuntimeError):
    """Another live process holds the lock on an output folder."""


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`: `<folder>.lock` beside it (never inside a DVC output)."""
    return folder.with_name(folder.name + ".lock")


@contextmanager
def exclusive_output(folder: Path) -> Iterator[Path]:
    """Hold the lock of `folder` while the block runs; fail at once if another process holds it.

    Raises:
        OutputLockedError: naming the folder, the lock file and the holder's PID.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise OutputLockedError(
                f"{folder} is being written by another process (PID {holder}, lock {path}); wait for it "
                f"to finish or stop it (kill {holder}) before running this stage again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield path
    finally:
        handle.close()  # releases the lock; the file stays, harmless, for the next holder
