"""Axis ranges and number formats chosen from the data, for the UI's charts and tables.

Why: Vega-Lite picks ticks from the data's range, but the format was fixed, so a nearly flat series got
nine ticks that all read "98.6%" (Metrics) or six-decimal ones (an image's score history). Here the
decimals follow the range, and a flat range is padded so that neighbouring ticks differ at those decimals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

TICKS = 5  # the ticks an axis aims at (Vega-Lite's tickCount)


@dataclass(frozen=True)
class AxisLayout:
    """A quantitative axis: its domain and its d3 format."""

    domain: tuple[float, float]
    format: str
    decimals: int


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def decimals_for(span: float, default: int, most: int, ticks: int = TICKS) -> int:
    """Decimals that tell ``ticks`` evenly spaced ticks over ``span`` apart (``default`` for a flat range),
    at most ``most``."""
    if span <= 0:
        return default
    return max(0, min(most, math.ceil(-math.log10(span / (ticks - 1)) - 1e-9)))


def _layout(values: list[float], default: int, most: int, bounds: tuple[float, float] | None,
            scale: float) -> tuple[tuple[float, float], int]:
    """(domain, decimals) in the values' own unit; ``scale`` converts to the unit the format shows (100
    for percent), in which ``decimals`` counts."""
    lo, hi = min(values), max(values)
    decimals = decimals_for((hi - lo) * scale, default, most)
    unit = 10.0 ** -decimals / scale  # one step of the last shown decimal, in the values' unit
    pad = max(0.05 * (hi - lo), (4 * unit - (hi - lo)) / 2)  # at least four steps in all: ticks one step apart differ
    # outward to whole steps, so that evenly spaced ticks fall on (or between) round values
    lo, hi = math.floor((lo - pad) / unit + 1e-9) * unit, math.ceil((hi + pad) / unit - 1e-9) * unit
    if bounds is not None:  # shift back inside (a share never shows as 100.2 %)
        width = min(hi - lo, bounds[1] - bounds[0])
        if hi > bounds[1]:
            lo, hi = bounds[1] - width, bounds[1]
        if lo < bounds[0]:
            lo, hi = bounds[0], bounds[0] + width
    return (lo, hi), decimals


def share_axis(values: Iterable[float | None]) -> AxisLayout:
    """An axis of shares in [0, 1] (AUROC, AP, PRO...) shown in percent.

    Args:
        values: the plotted values (None and NaN are skipped).

    Returns:
        The domain (within [0, 1]) and a percent format with 0 to 2 decimals.
    """
    finite = _finite(values)
    if not finite:
        return AxisLayout((0.0, 1.0), ".0%", 0)
    domain, decimals = _layout(finite, default=1, most=2, bounds=(0.0, 1.0), scale=100.0)
    return AxisLayout(domain, f".{decimals}%", decimals)


def number_axis(values: Iterable[float | None]) -> AxisLayout:
    """An axis of plain numbers (anomaly scores).

    Args:
        values: the plotted values (None and NaN are skipped).

    Returns:
        The domain and a fixed-point format with 0 to 4 decimals.
    """
    finite = _finite(values)
    if not finite:
        return AxisLayout((0.0, 1.0), ".1f", 1)
    domain, decimals = _layout(finite, default=2, most=4, bounds=None, scale=1.0)
    return AxisLayout(domain, f".{decimals}f", decimals)
