"""Where a file came from: the checkout's git revision, which training checkpoints, deploy
sidecars and eval records each store under ``git``.

Its own module because three commands and the trainer record it, and none of them owns it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__all__ = ["git_revision"]


def git_revision(path: str | Path | None = None) -> dict[str, Any]:
    """The checkout's commit and whether it had local edits (None outside a git checkout)."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if rev else None
    return {"revision": rev, "dirty": bool(status) if status is not None else None}
