"""OK/NG decisions: a per-class image threshold calibrated on validation normal images for a target
false-alarm rate, and the error rates a threshold implies on scored images.

A unified model's classes score on different scales (a tire's ordinary patch is not a bottle's), so one
global threshold rejects too much of one class and misses defects of another. Each class gets the lowest
threshold at which at most ``false_alarm_rate`` of its validation normals score above it. Only validation
normals are read: no defect, no test image. With n validation normals the smallest false-alarm rate one
can check is about 1/(n+1); a lower target gives the highest validation score (nothing above it), and the
application says so wherever it shows the threshold.

Example:
    >>> calibrate_threshold([0.1, 0.2, 0.3, 0.4], false_alarm_rate=0.25)
    0.3
    >>> decide(0.35, 0.3)
    'NG'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Decision = Literal["OK", "NG"]


def decide(score: float, threshold: float) -> Decision:
    """NG when the image score is above the class's threshold (equal is OK, as calibrated)."""
    return "NG" if score > threshold else "OK"


def calibrate_threshold(normal_scores: Sequence[float], false_alarm_rate: float) -> float:
    """The lowest threshold with at most ``false_alarm_rate`` of ``normal_scores`` above it.

    Args:
        normal_scores: image scores of the class's validation normal images (at least one).
        false_alarm_rate: the share of normal images allowed to be called NG, in [0, 1).

    Returns:
        One of the scores: the (n - allowed)-th smallest, where allowed = floor(rate * n).
    """
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in [0, 1), got {false_alarm_rate}")
    scores = sorted(float(s) for s in normal_scores)
    if not scores:
        raise ValueError("no validation normal scores to calibrate on")
    allowed = math.floor(false_alarm_rate * len(scores) + 1e-9)
    return scores[len(scores) - 1 - allowed]


def calibrate_thresholds(validation_scores: Mapping[str, Sequence[float]], false_alarm_rate: float) -> dict[str, float]:
    """``calibrate_threshold`` for every class that has validation scores."""
    return {c: calibrate_threshold(s, false_alarm_rate) for c, s in validation_scores.items() if len(s)}


@dataclass(frozen=True)
class ErrorRates:
    """What a threshold implies on scored images of known kind (None where there are none)."""

    false_alarm_rate: float | None  # share of the normal images called NG
    miss_rate: float | None  # share of the defective images called OK
    normals: int
    defects: int


def error_rates(threshold: float, normal_scores: Sequence[float], defect_scores: Sequence[float]) -> ErrorRates:
    """The false-alarm and miss rates of ``threshold`` on normal and defective image scores."""
    alarms = sum(decide(s, threshold) == "NG" for s in normal_scores)
    misses = sum(decide(s, threshold) == "OK" for s in defect_scores)
    return ErrorRates(alarms / len(normal_scores) if normal_scores else None,
                      misses / len(defect_scores) if defect_scores else None, len(normal_scores), len(defect_scores))
