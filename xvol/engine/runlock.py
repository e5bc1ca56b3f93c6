"""One launch per run directory: rank 0 holds an exclusive lock on ``<run dir>/.lock``.

Two launches into one directory would both append to metrics.jsonl and rotate the same
checkpoint files (each deleting the other's temp files). ``fcntl.flock`` is released by the
kernel when the holder dies, kill -9 included, so a crashed launch never leaves a stale lock.
Forked children (DataLoader workers) drop their inherited descriptor at once, so a worker that
outlives a killed rank 0 does not keep the run locked. Only rank 0 locks (one holder per run,
however many ranks or nodes); :func:`lock_run_dir` tells the other ranks the outcome.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from xvol.engine.dist import all_gather_objects
from xvol.engine.log import get_logger

__all__ = ["LOCK_NAME", "RunDirError", "RunDirLock", "lock_run_dir"]

log = get_logger(__name__)

LOCK_NAME = ".lock"

_HELD: set[int] = set()  # descriptors of locks held by this process


def _drop_inherited() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # the parent still holds the lock through its own descriptor
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited)


class RunDirError(RuntimeError):
    """The run directory cannot be used by this launch; the message names it."""


class RunDirLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock`` (context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirError naming the holder (pid, host, start time)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"{self.run_dir} is in use by another launch ({holder}): wait for it to end, or "
                "pick another run_name"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Unlock (the file stays: unlinking it would race with a launch waiting to lock it)."""
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, is_main: bool) -> RunDirLock | None:
    """Collective: rank 0 locks ``run_dir``; every rank raises RunDirError when it is in use.

    Returns rank 0's held lock (None on other ranks); it is released when the process exits.
    """
    lock, error = None, None
    if is_main:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except RunDirError as err:
            lock, error = None, str(err)
    error = all_gather_objects(error)[0]
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunDirError(str(error))
    return lock
