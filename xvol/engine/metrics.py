"""Metrics: top-k counts, the per-run JSONL file, and the optional wandb sink (rank 0 only).

Every record is a flat dict with ``kind`` ("train": one optimizer step, "epoch": one finished
epoch with its evaluation), ``epoch`` (1-based, as in the logs and ``epoch_NNNN.pt``: the epoch
the step belongs to, or the epoch finished) and ``global_step``. On resume the file is cut back
to what the checkpoint has seen, so a run that was stopped and resumed logs each step exactly
once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from xvol.engine.log import get_logger
from xvol.formats.files import write_text_atomic

__all__ = ["better", "topk_correct", "JsonlMetrics", "WandbSink", "MetricsLogger"]

log = get_logger(__name__)


@torch.no_grad()
def topk_correct(
    logits: torch.Tensor,
    target: torch.Tensor,
    ks: Sequence[int],
    topk: torch.Tensor | None = None,
) -> torch.Tensor:
    """How many rows have the target among the k highest logits, for each k (float tensor).

    Counts rather than percentages so that ranks can be summed before dividing; k is capped at
    the number of classes (top-5 of a 3-class problem is 100%). ``topk``: the logits' top
    ``min(max(ks), classes)`` indices, when the caller has them already (xvol-eval keeps them).
    """
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices if topk is None else topk[:, :maxk]
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]).float()


def better(a: float | None, b: float | None, mode: str) -> bool:
    """Is ``a`` a better value of a tracked metric than the best so far, ``b``, under ``mode``
    (max/min)? The one comparison of best values (best.pt, the checkpoints' ``best_metric`` and the
    ranking of checkpoints.json): a missing or non-finite value never becomes best, and anything
    finite beats one."""
    if a is None or not math.isfinite(a):
        return False
    if b is None or not math.isfinite(b):
        return True
    return a > b if mode == "max" else a < b


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable by any reader
    return value


class JsonlMetrics:
    """Append-only JSONL metrics file (one JSON object per line, flushed per record)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a half-written last line (kill -9 mid-write) is ignored."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite the file (atomically) with only the records ``keep`` accepts; returns dropped."""
        self.close()
        records = self.read()
        kept = [r for r in records if keep(r)]
        if self.path.exists():
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; a failed write (full disk) raises OSError naming the file."""
        line = json.dumps({k: _plain(v) for k, v in record.items()}) + "\n"
        try:
            if self._fh is None:
                self._fh = open(self.path, "a")  # noqa: SIM115 - kept open for the run
            self._fh.write(line)
            self._fh.flush()
        except OSError as err:
            self.close()
            reason = f"cannot append a metrics record: {err.strerror or err}"
            raise OSError(err.errno, reason, str(self.path)) from err

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:  # what a failed write left in the buffer: already reported
                pass


class WandbSink:
    """A wandb run on rank 0; ``run_id`` continues a run (``resume="allow"``) after a restart.

    ``mode`` is online, offline or disabled; offline and disabled need no network. The run's
    files go under ``<run dir>/wandb``.
    """

    def __init__(
        self,
        *,
        run_dir: str | Path,
        name: str,
        config: dict[str, Any],
        run_id: str | None = None,
        project: str = "xvol",
        entity: str | None = None,
        mode: str = "offline",
        tags: Iterable[str] = (),
        group: str | None = None,
        notes: str | None = None,
    ) -> None:
        from xvol.extras import require

        wandb = require("wandb", "wandb", "logger=wandb (or use logger=default)")

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=mode,
            id=run_id,  # None: wandb picks a new id, kept in the checkpoint
            resume="allow",
            dir=str(run_dir),
            name=name,
            config=config,
            tags=list(tags),
            group=group,
            notes=notes,
        )
        self.id: str = self.run.id

    def write(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "train")
        data = {
            f"{kind}/{k}": _plain(v)
            for k, v in record.items()
            if k not in ("kind", "global_step") and isinstance(_plain(v), int | float)
        }
        self.run.log(data, step=int(record["global_step"]))

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MetricsLogger:
    """Fans one record out to the JSONL file and wandb; does nothing on ranks other than 0."""

    def __init__(self, jsonl: JsonlMetrics | None = None, wandb: WandbSink | None = None) -> None:
        self.jsonl = jsonl
        self.wandb = wandb

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(record)
        if self.wandb is not None:
            self.wandb.write(record)

    def truncate_after(self, epochs_done: int, global_step: int) -> None:
        """Drop records a resumed run will write again (those past the checkpoint, which has
        finished ``epochs_done`` epochs and ``global_step`` updates)."""
        if self.jsonl is None:
            return

        def keep(r: dict[str, Any]) -> bool:
            if r.get("kind") == "epoch":
                return int(r["epoch"]) <= epochs_done
            return int(r.get("global_step", 0)) <= global_step

        dropped = self.jsonl.truncate(keep)
        if dropped:
            log.info(
                "metrics: dropped %d records past the checkpoint from %s", dropped, self.jsonl.path
            )

    def close(self, exit_code: int = 0) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.close(exit_code)
