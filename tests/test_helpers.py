"""tests/helpers.run_python: a forked command behaves as ``python ARGS`` in a fresh interpreter
(what the suite's command-line tests rely on), and a hung one times out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import run_python, subprocess_env

pytestmark = pytest.mark.slow  # interpreters and a fork server (about 20 s)

SCRIPT = """
import atexit, json, os, sys
atexit.register(lambda: print("atexit ran"))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE"),
                  "path0": sys.path[0], "main": __name__}))
print("to stderr", file=sys.stderr)
if sys.argv[-1] == "raise":
    raise ValueError("boom")
if sys.argv[-1] == "kill":
    os.kill(os.getpid(), 9)
sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "probe.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.parametrize("last", ["0", "3", "raise", "kill"])
def test_a_forked_script_runs_as_a_fresh_interpreter_would(
    script: Path, tmp_path: Path, last: str
) -> None:
    env = subprocess_env(PROBE="probe value")
    args = [str(script), "a b", last]
    forked = run_python(args, cwd=tmp_path, env=env)
    fresh = run_python(args, cwd=tmp_path, env=env, fresh=True)
    expected = {"raise": 1, "kill": -9}[last] if last in ("raise", "kill") else int(last)
    assert forked.returncode == fresh.returncode == expected
    assert forked.stdout == fresh.stdout and "probe value" in forked.stdout  # unbuffered
    if last != "kill":
        assert forked.stdout.endswith("atexit ran\n")
    tail = (lambda text: text.splitlines()[-1]) if last == "raise" else (lambda text: text)
    assert tail(forked.stderr) == tail(fresh.stderr)
    buffered = run_python(args, cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": ""})
    assert buffered.stdout == ("" if last == "kill" else forked.stdout)  # lost in the buffer
    if last == "raise":
        assert forked.stderr.startswith("to stderr\nTraceback (most recent call last):")


def test_module_and_code_forms(tmp_path: Path) -> None:
    for args in (["-m", "json.tool", "--help"], ["-c", "import sys; print(sys.argv)", "x"]):
        forked, fresh = run_python(args, cwd=tmp_path), run_python(args, cwd=tmp_path, fresh=True)
        assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
        assert forked.returncode == 0 and forked.stdout


def test_a_hung_command_times_out_and_is_killed() -> None:
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_python(["-c", "import time; print('started', flush=True); time.sleep(60)"], timeout=3)
    assert "started" in info.value.output


def test_import_time_environment_gets_a_fresh_interpreter() -> None:
    """Forked commands find xvol imported; one whose environment changes a variable read at
    import (of torch, Triton) gets a fresh interpreter."""
    code = "import sys; print('xvol.cli.train' in sys.modules)"
    assert run_python(["-c", code]).stdout == "True\n"
    assert run_python(["-c", code], fresh=True).stdout == "False\n"
    assert run_python(["-c", code], env=subprocess_env(TRITON_INTERPRET="1")).stdout == "False\n"
