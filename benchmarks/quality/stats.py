"""The quality benchmarks' statistics, one home for every driver (study, defaults, coupled, coupled_test, ...): a
metric's summary over seeds (mean, sample standard deviation, count), the ratio of two means, and the study's rule
"ahead beyond seed spread". Standard library only."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple


class Summary(NamedTuple):
    """A metric over seeds: its mean, its sample standard deviation (statistics.stdev; 0 for one seed) and n."""

    mean: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}"


def summary(values: Sequence[float]) -> Summary:
    """The mean, sample standard deviation and count of the seeds' metrics."""
    values = [float(v) for v in values]
    return Summary(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def ratio(mine: float, reference: float) -> float:
    """mine / reference, 1 when both are 0 (and infinite when only the reference is)."""
    return mine / reference if reference else (1.0 if mine == 0 else math.inf)


def clears(mine: Summary, reference: Summary) -> bool:
    """The study's rule, on summaries: mine's mean - std above the reference's mean + std (the bands do not touch)."""
    return mine.mean - mine.std > reference.mean + reference.std


def ahead_beyond_spread(mine: Sequence[float], reference: Sequence[float]) -> bool:
    """The study's rule on the seeds' metrics: mean - std (sample std) entirely above the reference's mean + std."""
    return clears(summary(mine), summary(reference))
