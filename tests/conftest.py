"""Shared pytest fixtures. Helpers meant for import live in tests/helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Every command a test launches (training runs, tools, torchrun ranks, the GPU check's
# rehearsal) inherits one intra-op thread per process: the suite runs 3 xdist workers on 2
# cores, and OpenMP threads of concurrent processes spinning at barriers on busy cores made
# such runs several times slower. This process's own thread count is set already (torch is
# imported above); tests that want threads set them, and an explicit setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    """The controller (or the only process) makes one scratch directory for the whole test run;
    xdist workers, started after this, inherit its path (:func:`shared_dir`)."""
    if not hasattr(config, "workerinput") and "XVOL_TEST_SHARED" not in os.environ:
        os.environ["XVOL_TEST_SHARED"] = tempfile.mkdtemp(prefix="xvol-shared-")
        config._xvol_shared = os.environ["XVOL_TEST_SHARED"]  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = getattr(config, "_xvol_shared", None)
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)
        os.environ.pop("XVOL_TEST_SHARED", None)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """A scratch directory shared by every xdist worker of this test run, for outputs that
    several test files read: each is made once, under a lock, by the first worker to ask."""
    return Path(os.environ["XVOL_TEST_SHARED"])


@pytest.fixture(scope="session")
def demo_ddp_run(shared_dir: Path) -> Path:
    """Run A: helpers.DEMO_DDP under torchrun with 2 CPU ranks, uninterrupted (about a minute
    on 2 cores), made once per test run. Its directory is ``<shared>/demo-ddp/A``, alone there;
    tests read it and write elsewhere."""
    from filelock import FileLock
    from helpers import run_command, torchrun_train

    out = shared_dir / "demo-ddp"
    with FileLock(str(shared_dir / "demo-ddp.lock")):
        if not (shared_dir / "demo-ddp.ok").exists():
            shutil.rmtree(out, ignore_errors=True)  # a failed attempt of another worker
            proc = run_command(torchrun_train("run_name=A", f"paths.output_dir={out}"), 420)
            assert proc.returncode == 0, proc.output[-4000:]
            (shared_dir / "demo-ddp.ok").touch()
    return out / "A"


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator, so every test draws the same numbers on every run."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def out_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A scratch directory per test module for run directories of subprocess runs. Not
    tmp_path_factory: pytest prunes old basetemp dirs when other sessions start, which would
    delete run dirs under a long test (several test sessions may share one machine)."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_").replace("_", "-")
    path = Path(tempfile.mkdtemp(prefix=f"xvol-{name}-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def single_thread_module() -> Iterator[None]:
    """:func:`single_thread` for a whole module (autouse it there): tiny tensors gain nothing
    from intra-op threads, and on a shared CPU OpenMP barriers stall on busy cores (runtimes
    here varied 7x with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread for tests on tiny tensors: threading gains nothing there, and on a
    shared, loaded CPU the worker threads' spinning made such tests ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Files of the longest tests run first: under pytest-xdist (--dist loadfile, `make test`) a
# worker takes whole files in collection order, so a multi-minute file collected last would run
# alone at the end while the other core idles. The order of tests inside a file is kept.
LONG_FIRST = (
    "test_train_e2e.py",
    "test_gpu_check.py",
    "test_kernels.py",
    "test_train_refusals.py",
    "test_train_finetune.py",
    "test_tools_e2e.py",  # late enough to find run A made (conftest.demo_ddp_run)
    # then the files with a few subprocess runs of 5-30 s each, so that quick unit files end it
    "test_train_config.py",
    "test_packaging.py",
    "test_load.py",
    "test_reparam_device.py",
    "test_data_dist.py",
    "test_tools.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))
