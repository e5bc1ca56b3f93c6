"""Aggregate eval records (results/*.json from tools/eval.py) into a leaderboard.

Usage:
    python tools/leaderboard.py                          # results/ -> results/leaderboard.*
    xvol-leaderboard --results-dir results --out-dir site/
    xvol-leaderboard --skip-bad                          # skip malformed records, with a warning

Writes OUT/leaderboard.md, .csv and .html, and one OUT/leaderboard_<val>.png per val set, and
prints the markdown. The leaderboard holds nothing of its own: every number comes from a record,
so its files are regenerated (overwritten) on each run. Records are grouped by val set (the data
fingerprint: same files, same labels); numbers from different val sets, or from different data
backends, are never ranked against each other in a pair. Per val set:

- the ranked table (model, form, weights, data backend, seed, ...);
- seeds: records of the same model, recipe (``recipe``: the training config less the model,
  seed and run bookkeeping, see xvol.formats.record.recipe_fingerprint), form, weights, backend and
  eval settings are seeds of one experiment: mean, std and n of their top-1;
- X-volution vs baseline paired by seed: the same recipe and backend with the baseline
  backbone, the difference per seed, its mean and a 95% t-interval, and a plain sentence when
  the interval contains zero (the seeds do not tell the two apart);
- X-volution vs baseline: each X-volution record against the best baseline record of the same
  backbone (xresnet50 <-> resnet50, by the stored ``arch``) and eval settings, with the deltas;
- deploy vs training form: each deploy record against the record of the training checkpoint it
  was re-parameterized from (same source sha256, weights and backend), with whether the per-image
  predictions are identical (equal ``predictions_sha256``);
- a PNG: mean top-1 per seed group as bars from 0 with ± std error bars, and top-1 vs GMACs.

A deploy record without a seed takes the seed and recipe of its training checkpoint's record.
A malformed record (not JSON, nested too deep, too large, wrong schema, missing or mistyped
key, numbers that contradict each other) or a duplicate (the same checkpoint, weights, val set,
backend, eval transform and precision twice) is an error naming the file; --skip-bad skips it.

Every field of a record is text from outside: each output escapes it for its own syntax
(xvol/results/render.py), and a link goes only to a record file found here, as a
percent-encoded relative path. The tables and statistics are the results library (xvol/results/);
this module reads the directory, writes the files and holds the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from xvol.cli.common import ToolError, setup_tool_logging, tool_args, tool_errors
from xvol.extras import MissingExtra, require
from xvol.formats.files import write_text_atomic
from xvol.results import inherit_seeds, rank, read_rows, val_sets
from xvol.results.render import (
    PLOT_NAME,
    plot,
    record_href,
    sections,
    to_csv,
    to_html,
    to_markdown,
)

__all__ = ["OUTPUT_NAMES", "build_leaderboard", "build_parser", "main"]

log = logging.getLogger("xvol.tools.leaderboard")

OUTPUT_NAMES = ("leaderboard.md", "leaderboard.csv", "leaderboard.html")


def build_leaderboard(
    results_dir: str | Path = "results",
    out_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Validate the records, then write leaderboard.{md,csv,html} and leaderboard_<val>.png per
    val set; returns paths, counts per val set and the markdown. Nothing is written when a
    record is refused."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ToolError(f"no results directory {results_dir} (run tools/eval.py first)")
    rows = read_rows(sorted(results_dir.glob("*.json")), skip_bad)
    if not rows:
        raise ToolError(f"no eval records (*.json) in {results_dir} (run tools/eval.py first)")
    out = Path(out_dir) if out_dir is not None else results_dir
    rows = rank(inherit_seeds(rows))
    sets = val_sets(rows)
    secs = sections(sets, {r.record_path: record_href(r.record_path, out) for r in rows})
    markdown = to_markdown(secs)
    paths = {name.rsplit(".", 1)[1]: out / name for name in OUTPUT_NAMES}
    pngs = [out / s.plot_name for s in secs]
    try:
        require("matplotlib", "plot", "the leaderboard's PNG plots")
    except MissingExtra as err:  # the tables are the result; the plots are a view of them
        log.warning("%s; writing the tables without plots", err)
        pngs = []
    for vs, png in zip(sets, pngs):
        plot(vs, png)
    for stale in out.glob("leaderboard_*.png"):  # val sets no longer in the results
        if stale not in pngs and PLOT_NAME.fullmatch(stale.name):
            stale.unlink()
    for key, text in (("md", markdown), ("csv", to_csv(rows)), ("html", to_html(secs))):
        write_text_atomic(paths[key], text)
    return {
        "records": len(rows),
        "val_sets": [
            {
                "id": vs.id,
                "records": len(vs.rows),
                "backends": vs.backends,
                "baseline_pairs": len(vs.baseline_pairs),
                "deploy_pairs": len(vs.deploy_pairs),
                "seed_groups": len(vs.groups),
                "paired": [
                    {
                        "backend": c.backend,
                        "n": c.diff.n,
                        "mean": c.diff.mean,
                        "std": c.diff.std,
                        "lo": c.diff.lo,
                        "hi": c.diff.hi,
                        "seeds": list(c.seeds),
                    }
                    for c in vs.comparisons
                ],
            }
            for vs in sets
        ],
        "baseline_pairs": sum(len(vs.baseline_pairs) for vs in sets),
        "deploy_pairs": sum(len(vs.deploy_pairs) for vs in sets),
        "files": {**{k: str(v) for k, v in paths.items()}, "png": [str(p) for p in pngs]},
        "markdown": markdown,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xvol-leaderboard",
        description=(
            "Aggregate eval records (tools/eval.py) into leaderboard.md/.csv/.html and one PNG "
            "per val set; seeds of one recipe are averaged, X-volution models are paired with "
            "their baselines (by seed, with a 95% interval) and deploy checkpoints with their "
            "training form, within one data backend. Prints the markdown."
        ),
        epilog=(
            "examples:\n"
            "  xvol-leaderboard\n"
            "  xvol-leaderboard --results-dir results --out-dir site/\n"
            "  xvol-leaderboard --skip-bad"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[tool_args()],
    )
    parser.add_argument("--results-dir", default="results", help="where the records are")
    parser.add_argument("--out-dir", help="where the leaderboard files go (default: results dir)")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed/duplicate records (warn) instead of failing",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_tool_logging()
    with tool_errors("xvol-leaderboard", args.debug):
        result = build_leaderboard(args.results_dir, args.out_dir, args.skip_bad)
    print(result["markdown"])
    files = result["files"]
    log.info("wrote %s", ", ".join([files["md"], files["csv"], files["html"], *files["png"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
