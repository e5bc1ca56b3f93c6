"""The run-directory lock: one holder, refused second launches naming it, released by death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from xvol.engine import RunDirError, RunDirLock, lock_run_dir


def test_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with RunDirLock(tmp_path) as first:
        assert first.held
        with pytest.raises(RunDirError) as err:
            RunDirLock(tmp_path).acquire()
        message = str(err.value)
        assert message.startswith(f"{tmp_path} is in use by another launch (pid {os.getpid()} ")
        assert "\n" not in message
    RunDirLock(tmp_path).acquire()  # released on exit from the block


def test_lock_run_dir_on_one_process(tmp_path: Path) -> None:
    lock = lock_run_dir(tmp_path, is_main=True)
    assert lock is not None and lock.held
    with pytest.raises(RunDirError, match="in use"):
        lock_run_dir(tmp_path, is_main=True)
    lock.release()
    assert lock_run_dir(tmp_path, is_main=False) is None  # other ranks never touch the file


@pytest.mark.slow  # a subprocess (or several seconds): make test, not test-fast
def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = textwrap.dedent(f"""
        import time
        from xvol.engine import RunDirLock
        RunDirLock({str(tmp_path)!r}).acquire()
        open({str(ready)!r}, "w").close()
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        with pytest.raises(RunDirError, match=f"pid {proc.pid} "):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    RunDirLock(tmp_path).acquire()  # no stale lock after kill -9


def test_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    """A DataLoader worker forked while rank 0 holds the lock must not hold it after rank 0."""
    lock = RunDirLock(tmp_path)
    lock.acquire()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its fork hooks have run): outlive the parent's lock
        os.write(write_end, b"x")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(read_end, 1) == b"x"
        lock.release()
        again = RunDirLock(tmp_path)
        again.acquire()
        again.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
