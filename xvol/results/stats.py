"""The statistics of the leaderboard, as pure functions of numbers: the spread of seeds and the
95% t-interval of seed-paired differences.

scipy is not an xvol dependency: its t quantile is used when it is installed, else a table that
is exact to the precision shown.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "Spread", "paired_interval", "spread", "t_quantile_975"]

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1..30, to 3 decimals; past 30
# the quantile moves by < 0.05 and 40/60/120/inf are interpolated (linear in 1/df).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_T975_TAIL = ((30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))


def t_quantile_975(df: int) -> float:
    """t(0.975, df): scipy's when installed, else the table above."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        if df <= len(_T975):
            return _T975[df - 1]
        for (d0, t0), (d1, t1) in zip(_T975_TAIL, _T975_TAIL[1:]):
            if df <= d1:  # linear in 1/df, as t is near its limit
                w = (1 / d0 - 1 / df) / (1 / d0 - (0 if math.isinf(d1) else 1 / d1))
                return t0 + w * (t1 - t0)
        return 1.960
    return float(t.ppf(0.975, df))


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (None below n = 2) and n of some values."""

    n: int
    mean: float
    std: float | None


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    std = statistics.stdev(values) if len(values) >= 2 else None
    return Spread(len(values), statistics.fmean(values), std)


@dataclass(frozen=True)
class Interval:
    """Paired differences: mean, sample std, n and the 95% t-interval [lo, hi] (None where n is
    too small: no mean without a pair, no std or interval below 2)."""

    n: int
    mean: float | None
    std: float | None
    lo: float | None
    hi: float | None

    @property
    def contains_zero(self) -> bool | None:
        return None if self.lo is None or self.hi is None else self.lo <= 0.0 <= self.hi


def paired_interval(diffs: Sequence[float]) -> Interval:
    """Mean, sample std, n and the 95% t-interval of paired differences (None below n = 2)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if n else None
    std = statistics.stdev(diffs) if n >= 2 else None
    lo = hi = None
    if mean is not None and std is not None:
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return Interval(n, mean, std, lo, hi)
