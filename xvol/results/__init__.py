"""The results library behind xvol-leaderboard: eval records (xvol.formats.record) in, tables
and plots out.

- :mod:`xvol.results.table`: typed rows (:class:`Row`, built from a validated record), grouping
  by val set and by seed, and pairing (X-volution with its baseline, deploy with its training
  form, seed with seed), always within one evaluation: one val set and one data backend;
- :mod:`xvol.results.stats`: the statistics (mean and std over seeds, the 95% t-interval of
  seed-paired differences), pure functions of numbers;
- :mod:`xvol.results.render`: markdown, HTML, CSV and PNG, each escaping record text for its
  own syntax.

The command itself (reading a directory, writing the files) is xvol/cli/leaderboard.py.
"""

from xvol.results.stats import Interval, Spread, paired_interval, spread, t_quantile_975
from xvol.results.table import (
    BaselinePair,
    Deltas,
    DeployPair,
    Row,
    SeedComparison,
    SeedGroup,
    ValSet,
    baseline_pairs,
    deploy_pairs,
    inherit_seeds,
    rank,
    read_rows,
    seed_comparisons,
    seed_groups,
    val_sets,
)

__all__ = [
    "BaselinePair",
    "Deltas",
    "DeployPair",
    "Interval",
    "Row",
    "SeedComparison",
    "SeedGroup",
    "Spread",
    "ValSet",
    "baseline_pairs",
    "deploy_pairs",
    "inherit_seeds",
    "paired_interval",
    "rank",
    "read_rows",
    "seed_comparisons",
    "seed_groups",
    "spread",
    "t_quantile_975",
    "val_sets",
]
