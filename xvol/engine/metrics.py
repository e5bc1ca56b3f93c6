"""Metrics: top-k counts, the per-run JSONL file, and the optional wandb sink (rank 0 only).

Every record is a flat dict with ``kind`` ("train": one optimizer step, "epoch": one finished
epoch with its evaluation), ``epoch`` (1-based, as in the logs and ``epoch_NNNN.pt``: the epoch
the step belongs to, or the epoch finished) and ``global_step``. On resume the file is cut back
to what the checkpoint has seen, so a run that was stopped and resumed logs each step exactly
once. The file is read back as input: a line that is not such a record (not a JSON object,
nested too deeply, over 1 MiB, epoch/step not integers) is named in one warning, never read,
and left where it is.
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


MAX_LINE_CHARS = 1 << 20  # a record is a few hundred characters


def _parse_record(line: str) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, why the line is not a metrics record)."""
    if len(line) > MAX_LINE_CHARS:
        return None, f"longer than {MAX_LINE_CHARS >> 20} MiB"
    try:
        value = json.loads(line)
    except RecursionError:
        return None, "nested too deeply"
    except ValueError:  # JSONDecodeError, and integers of more digits than Python reads
        return None, "not JSON"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    for key in ("epoch", "step", "global_step"):
        if key in value and (not isinstance(value[key], int) or isinstance(value[key], bool)):
            return None, f"{key!r} is not an integer"
    if value.get("kind") == "epoch" and "epoch" not in value:
        return None, "an epoch record without 'epoch'"
    return value, None


class JsonlMetrics:
    """Append-only JSONL metrics file (one JSON object per line, flushed per record)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def read(self) -> list[dict[str, Any]]:
        """All complete records; a half-written last line (kill -9 mid-write) is ignored."""
        return [record for _, record in self._lines() if record is not None]

    def _lines(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Each line with its record (None: not a record, warned about once per read)."""
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        out: list[tuple[str, dict[str, Any] | None]] = []
        bad: dict[str, list[int]] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record, why = _parse_record(line)
            if why == "not JSON" and number == len(lines) and not text.endswith("\n"):
                continue  # a write cut by kill -9: dropped when the file is cut back
            if why is not None:
                bad.setdefault(why, []).append(number)
            out.append((line, record))
        if bad:
            numbers = sorted(n for ns in bad.values() for n in ns)
            shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
            log.warning(
                "%s: line%s %s %s not metrics records (%s): not read and left in place; "
                "delete them if you did not add them on purpose",
                self.path,
                "s" if len(numbers) > 1 else "",
                shown,
                "are" if len(numbers) > 1 else "is",
                "; ".join(f"{why}: {len(ns)}" for why, ns in bad.items()),
            )
        return out

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> int:
        """Rewrite the file (atomically) with only the records ``keep`` accepts; returns dropped.
        Lines that are not records stay where they were."""
        self.close()
        kept, dropped = [], 0
        for line, record in self._lines():
            if record is None or keep(record):
                kept.append(line)
            else:
                dropped += 1
        if self.path.exists():
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return dropped

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
