"""Process-group setup from the launcher's environment, nanoGPT style.

One code path for every launch: ``python scripts/train.py`` (one process), ``torchrun`` (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment) and Slurm tasks started by submitit
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Only :func:`read_dist_env` looks at the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "read_dist_env",
    "setup_distributed",
    "cleanup_distributed",
    "resolve_device",
    "all_reduce_sum",
    "all_gather_objects",
    "barrier",
    "claim_error_report",
    "default_store",
    "reported_error",
    "report_to_launcher",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"  # "torchrun", "slurm" or "none"
    master_addr: str | None = None
    master_port: int | None = None
    agent_store: bool = False  # torchrun's agent hosts the TCPStore at MASTER_ADDR:PORT
    restart_count: int = 0  # torchrun --max-restarts attempt number

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Let a library that reads os.environ see ``env`` (a no-op when it is os.environ)."""
    if env is os.environ:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The rank layout of this process, from torchrun's or Slurm's variables (torchrun first).

    Slurm variables count only inside a submitit task (SUBMITIT_EXECUTOR=slurm): a plain
    ``python scripts/train.py`` in an sbatch script also sees SLURM_NTASKS and must stay one
    process. MASTER_ADDR defaults to the first node of the job and MASTER_PORT to a port derived
    from the job id, the same for every task of the job.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            launcher="torchrun",
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )
    if env.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_PROCID" in env:
        # submitit's own reading of the Slurm job: hostlist parsing, the first node as master,
        # a port derived from the job id (the same for every task) unless MASTER_PORT is set.
        from submitit.helpers import TorchDistributedEnvironment

        with _environ(env):
            slurm = TorchDistributedEnvironment()
        return DistEnv(
            rank=slurm.rank,
            local_rank=slurm.local_rank,
            world_size=slurm.world_size,
            local_world_size=slurm.local_world_size,
            launcher="slurm",
            master_addr=env.get("MASTER_ADDR") or slurm.master_addr,
            master_port=slurm.master_port,
        )
    return DistEnv()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` is this rank's GPU when CUDA is present, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


_GROUPS_STARTED = 0  # process groups this process has joined (one per sweep job)


def setup_distributed(
    device: str = "auto", timeout_min: float = 30.0
) -> tuple[DistEnv, torch.device]:
    """Join the process group when there is more than one process (nccl on CUDA, gloo on CPU)."""
    denv = read_dist_env()
    dev = resolve_device(device, denv.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if denv.distributed and not dist.is_initialized():
        timeout = timedelta(minutes=timeout_min)
        store = None
        if denv.agent_store and denv.master_addr and denv.master_port:
            # torchrun keeps one agent TCPStore across --max-restarts attempts: without a
            # per-attempt namespace, the new ranks read the dead ranks' gloo/nccl addresses
            # ("Gloo connectFullMesh failed ... Connection refused") and the restart fails.
            # Likewise each job of a --multirun sweep (one process, one group per job) gets its
            # own: every rank runs the same jobs in the same order, so the counts agree.
            global _GROUPS_STARTED
            _GROUPS_STARTED += 1
            store = dist.PrefixStore(
                f"/xvol/attempt_{denv.restart_count}/group_{_GROUPS_STARTED}",
                dist.TCPStore(denv.master_addr, denv.master_port, is_master=False, timeout=timeout),
            )
        else:
            if denv.master_addr is not None:
                os.environ.setdefault("MASTER_ADDR", denv.master_addr)
            if denv.master_port is not None:
                os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method=None if store is not None else "env://",
            store=store,
            rank=denv.rank,
            world_size=denv.world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return denv, dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op on one process); returns the tensor for chaining."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` in rank order (one entry on one process)."""
    if not _active():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()


def report_to_launcher(message: str) -> None:
    """Hand torchrun this rank's cause of failure (its TORCHELASTIC_ERROR_FILE), so that the
    ChildFailedError summary shows ``message`` instead of "To enable traceback see ..."."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    stamp = str(int(time.time()))
    data = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": stamp}}
    }
    try:
        with open(path, "w") as fh:
            json.dump(data, fh)
    except OSError:
        pass


# ----------------------------------------------------------------------------- failures

_ERROR_KEY = "xvol/error/first"


def default_store() -> dist.Store | None:
    """The key-value store of the default process group (None on one process). Kept by the
    caller, it outlives destroy_process_group; under torchrun it is the agent's, which outlives
    every rank, so a rank can still read another's failure after the group broke."""
    if not _active():
        return None
    return dist.distributed_c10d._get_default_store()


def claim_error_report(store: dist.Store, rank: int, message: str) -> int | None:
    """Post this rank's failure; return the rank whose failure was posted first (this one or
    another), the one that reports it, so that the user reads one message, from the rank that
    met it. None when the store is gone (the rank hosting it exited)."""
    try:
        store.set(f"xvol/error/{rank}", message)
        first = store.compare_set(_ERROR_KEY, "", str(rank))
        return int(first)
    except (RuntimeError, ValueError):
        return None


def reported_error(store: dist.Store | None) -> tuple[int, str] | None:
    """(rank, message) of the first failure a rank posted, if any: what another rank reads when
    its own collective fails because that rank left (gloo's "Connection closed by peer")."""
    if store is None:
        return None
    try:
        if not store.check([_ERROR_KEY]):
            return None
        rank = int(store.get(_ERROR_KEY))
        return rank, store.get(f"xvol/error/{rank}").decode()
    except (RuntimeError, ValueError):
        return None
