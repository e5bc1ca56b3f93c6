"""Rank-aware logging: rank 0 speaks (console and <run dir>/train.log), other ranks only warn.

Everything in xvol logs through ``logging.getLogger("xvol...")``; there is no print() in the
library. The console handler comes from the launcher (Hydra's job_logging, console only, so that
ranks never share a log file); :func:`setup_logging` adds rank 0's file and quiets other ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["get_logger", "log_to_files", "setup_logging"]

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0 and not getattr(record, "_xvol_ranked", False):
            record.msg = f"[rank {self.rank}] {record.msg}"
            record._xvol_ranked = True  # type: ignore[attr-defined]
        return True


def get_logger(name: str = "xvol") -> logging.Logger:
    return logging.getLogger(name if name.startswith("xvol") else f"xvol.{name}")


def setup_logging(rank: int, log_file: str | Path | None = None) -> logging.Logger:
    """Rank 0 logs INFO (and to ``log_file`` when given); other ranks log WARNING and up."""
    logger = logging.getLogger("xvol")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    if rank != 0:  # filters on handlers see records of every child logger ("xvol.engine...")
        for handler in logging.getLogger().handlers + logger.handlers:
            if not any(isinstance(f, _RankFilter) for f in handler.filters):
                handler.addFilter(_RankFilter(rank))
    if rank == 0 and log_file is not None:
        path = Path(log_file).resolve()
        known = set()
        for handler in list(logger.handlers):  # a --multirun sweep: the last job's train.log
            name = getattr(handler, "baseFilename", None)
            if isinstance(handler, logging.FileHandler) and name != str(path):
                logger.removeHandler(handler)
                handler.close()
            else:
                known.add(name)
        if str(path) not in known:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, mode="a")
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
    return logger


def log_to_files(level: int, message: str) -> None:
    """Write one record to the log files only (train.log): for a line the launcher prints to
    the console itself, such as the final ``error: ...``."""
    logger = logging.getLogger("xvol")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
