"""Shared test helpers (import as ``from helpers import randomize_bn``; tests/ is on sys.path)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEMO_DDP",
    "ROOT",
    "TRAIN",
    "assert_same_forward_backward",
    "one_error_line",
    "randomize_bn",
    "run_command",
    "run_python",
    "subprocess_env",
    "torchrun_train",
]

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "scripts" / "train.py")


# The end-to-end training recipe: xresnet18 on the demo digits at 32 px, 2 epochs of 31 updates
# of 2 ranks x 16 images (trainer.limit_train_batches: a new random 992 of the 4,000 each epoch;
# ~80% val top-1), deterministic. Run A (conftest.demo_ddp_run) trains it once per test run,
# uninterrupted; tests/test_train_e2e.py interrupts copies of it, and the tools of
# tests/test_tools_e2e.py take its checkpoints.
DEMO_DDP = [
    "model=xresnet18",
    "data=demo",
    "data.img_size=32",
    "data.batch_size=16",
    "trainer.limit_train_batches=31",
    "data.workers=0",
    "trainer.epochs=2",
    "sched.warmup_epochs=0",
    "trainer.deterministic=true",
    "trainer.progress_bar=false",
    "trainer.log_interval=5",
]


def torchrun_train(*args: str, restarts: int = 0) -> list[str]:
    """torchrun with 2 CPU ranks (gloo) of scripts/train.py with :data:`DEMO_DDP` and ``args``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={restarts}", TRAIN, *DEMO_DDP, *args,
    ]  # fmt: skip


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a command a test runs: one thread per process (2 shared cores),
    wandb offline and quiet, unbuffered output."""
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PYTHONUNBUFFERED="1",
        **extra,
    )


def run_command(argv: Sequence[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` from the repository root with :func:`subprocess_env`; ``proc.output`` is
    stdout + stderr. ``[sys.executable, SCRIPT | -m MODULE | -c CODE, ...]`` goes through
    :func:`run_python` (a forked interpreter that has imported xvol already)."""
    argv = list(argv)
    if len(argv) > 1 and argv[0] == sys.executable:
        return run_python(argv[1:], timeout=timeout)
    proc = subprocess.run(
        argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


# What every xvol command imports (timm, torch, torchvision, hydra, wandb through timm): about
# 6 CPU-seconds per interpreter, a third of a short CLI run. run_python forks each command from
# one server process per test worker that has imported these once (multiprocessing's
# forkserver), instead of starting a fresh interpreter. The command still is its own process
# (own pid, signals, exit status, file descriptors 1 and 2), run as ``python ARGS`` would run
# it: argv, cwd, environment, sys.path[0], __main__, atexit handlers. What cannot be told apart
# this way stays a real interpreter (fresh=True, or XVOL_TEST_FRESH=1 for the whole suite):
# import-time behaviour (a hidden extra, an ``xvol`` folder in the cwd), environment variables
# read at import (below), torchrun.
_PRELOAD = ["helpers", "xvol.cli.train", "xvol.cli.eval", "xvol.cli.reparam", "xvol.cli.export"]
_IMPORT_TIME_ENV = ("PYTHON", "TRITON_", "TORCH", "CUDA_", "OMP_", "MKL_", "LD_")
_RUN_TIME_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}  # the command applies these
_FORK_ENV: dict[str, str] | None = None  # the server's environment, fixed when it starts
_SERVER_STARTED = False


def _server_env() -> dict[str, str]:
    global _FORK_ENV
    if _FORK_ENV is None:
        _FORK_ENV = {**os.environ, **subprocess_env()}
    return _FORK_ENV


def _fresh_needed(args: Sequence[str], env: dict[str, str]) -> bool:
    if os.environ.get("XVOL_TEST_FRESH") == "1":
        return True
    if args[0] not in ("-m", "-c") and not str(args[0]).endswith(".py"):
        return True
    if args[0] == "-m" and args[1] == "torch.distributed.run":
        return True  # its ranks are real interpreters anyway
    server = _server_env()
    changed = {k for k in env.keys() | server.keys() if env.get(k) != server.get(k)}
    return any(k.startswith(_IMPORT_TIME_ENV) and k not in _RUN_TIME_ENV for k in changed)


def run_python(
    args: Sequence[str],
    *,
    cwd: str | Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    fresh: bool = False,
) -> subprocess.CompletedProcess:
    """``python ARGS`` (a script and its arguments, ``-m MODULE ...`` or ``-c CODE ...``) in
    ``cwd`` with ``env`` (default :func:`subprocess_env`), as a finished process with
    ``stdout``, ``stderr`` and ``output`` (both). Forked from a server that imported xvol (see
    above) unless ``fresh`` or the command needs a new interpreter."""
    global _SERVER_STARTED
    args = [str(a) for a in args]
    env = subprocess_env() if env is None else dict(env)
    if fresh or _fresh_needed(args, env):
        proc = subprocess.run(
            [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
        return proc
    ctx = multiprocessing.get_context("forkserver")
    if not _SERVER_STARTED:
        # the server starts with this environment and sys.path; its commands get their own
        ctx.set_forkserver_preload(_PRELOAD)
        saved = dict(os.environ)
        os.environ.update(_server_env())
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _SERVER_STARTED = True
    with tempfile.TemporaryDirectory(prefix="xvol-run-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        child = ctx.Process(target=_forked_main, args=(args, str(cwd), env, str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(
                args, timeout, output=out.read_text(errors="replace"),
                stderr=err.read_text(errors="replace"),
            )  # fmt: skip
        proc = subprocess.CompletedProcess(
            [sys.executable, *args], child.exitcode, out.read_text(errors="replace"),
            err.read_text(errors="replace"),
        )  # fmt: skip
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def _forked_main(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """The forked command: what ``python ARGS`` does after start-up, then os._exit."""
    import atexit
    import io
    import runpy
    import threading
    import traceback

    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    # std streams as a fresh interpreter makes them for files: stdout block-buffered and stderr
    # line-buffered, both unbuffered under PYTHONUNBUFFERED (what is lost on a kill -9 is too)
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))

    def stream(fd: int, **kw: Any) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "w", closefd=False)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(binary, encoding="utf-8", write_through=unbuffered, **kw)

    sys.stdout = sys.__stdout__ = stream(1)
    sys.stderr = sys.__stderr__ = stream(2, errors="backslashreplace", line_buffering=True)
    if env.get("PYTHONDONTWRITEBYTECODE"):
        sys.dont_write_bytecode = True
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = ["-m", *args[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(args)
            sys.path.insert(0, str(Path(cwd, args[0]).resolve().parent))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        # as at interpreter exit: join threads, then the atexit handlers (those registered by
        # the imports the server made too, as a fresh interpreter would have them)
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
    os._exit(code & 0xFF)


def assert_same_forward_backward(
    ref: nn.Module, other: nn.Module, x: torch.Tensor, rtol: float, atol: float
) -> None:
    """``other`` computes what ``ref`` does on ``x``: output, input gradient, parameter
    gradients and buffers after the step (BN running statistics) agree within the tolerances."""
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(xi) for m, xi in zip((ref, other), xs)]
    torch.testing.assert_close(outs[1], outs[0], rtol=rtol, atol=atol)
    grad_out = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad_out)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=rtol, atol=atol)
    for (name, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=name)
    for (name, a), (_, b) in zip(ref.named_buffers(), other.named_buffers()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)


def one_error_line(proc: subprocess.CompletedProcess, last: bool = True) -> str:
    """The one ``error:`` line of a failed ``scripts/train.py`` run (exit 1, no traceback
    anywhere; ``last``: it is also the last line on stderr). ``proc.output``: stdout + stderr."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    if last:
        assert proc.stderr.rstrip().splitlines()[-1] == errors[0], output[-3000:]
    return errors[0]


@torch.no_grad()
def condition_bn_for_training(module: nn.Module, generator: torch.Generator | None = None
                              ) -> nn.Module:  # fmt: skip
    """Random BN running stats (as :func:`randomize_bn`) and small positive affine parameters
    (gamma in [0.2, 0.5], beta in [-0.1, 0.1]), for gradient checks of a whole network.

    A training step's gradients are a test of the backward only if the network is well
    conditioned. randomize_bn's gammas of magnitude 0.5-1.5 (a fifth negative) compound over a
    deep residual stack: in an xresnet50 a 1e-6 relative perturbation of the X-volution outputs
    moved parameter gradients by up to 0.1 (rel. to their size), so correct backends disagreed
    on an H200 by 1.4% in fp32. With these, the same perturbation moved them 2e-5 to 5e-5 on
    most draws (not all: a check using this must test its own draw's conditioning), and no
    gamma is zero (timm's zero_init_last would zero every residual branch's gradient).
    Returns ``module`` for chaining.
    """
    randomize_bn(module, generator)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            c = m.num_features
            m.weight.copy_(0.2 + 0.3 * torch.rand(c, generator=generator, dtype=torch.float64))
            m.bias.copy_(-0.1 + 0.2 * torch.rand(c, generator=generator, dtype=torch.float64))
    return module


@torch.no_grad()
def randomize_bn(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm of ``module`` random running stats and affine parameters.

    Default BN init (mean 0, var 1, gamma 1, beta 0) makes folding an identity and hides bugs
    such as a swapped mean/var or a missing eps; every equivalence test calls this first.
    Returns ``module`` for chaining.
    """
    for m in module.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        c = m.num_features
        kw = {"generator": generator, "dtype": torch.float64}

        def draw(lo: float, hi: float, kw: dict = kw, c: int = c) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(c, **kw)

        if m.running_mean is not None:
            m.running_mean.copy_(draw(-1.0, 1.0))
            m.running_var.copy_(draw(0.5, 2.0))
        if m.weight is not None:
            m.weight.copy_(draw(0.5, 1.5) * torch.where(draw(0, 1) < 0.2, -1.0, 1.0))
            m.bias.copy_(draw(-1.0, 1.0))
    return module
