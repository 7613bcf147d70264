"""The standard error of a mean, as lm-evaluation-harness reports it: one definition for ``mc``'s
accuracies and the judge's mean score."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> float:
    """Sample standard deviation (n − 1) over √n; NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
