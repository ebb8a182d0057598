"""Axis decimals chosen from the data's range: neighbouring ticks never read the same, and no axis shows
more decimals than its range needs."""

from __future__ import annotations

import math

import pytest

from annotation.server import ServerStatus
from app.ui.context import LABEL_STUDIO_BRIEF
from app.ui.formats import number_axis, share_axis


def tick_labels(domain: tuple[float, float], decimals: int, scale: float, ticks: int = 5) -> list[str]:
    """The labels of ``ticks`` evenly spaced ticks over ``domain``, as the axis format writes them."""
    lo, hi = domain
    return [f"{(lo + (hi - lo) * k / (ticks - 1)) * scale:.{decimals}f}" for k in range(ticks)]


@pytest.mark.parametrize("values", [[0.986] * 9, [0.9861, 0.9864], [0.5, 0.99], [1.0, 1.0], [0.0], [0.9, 0.95, 1.0]])
def test_share_ticks_differ_and_stay_within_0_to_100_percent(values: list[float]) -> None:
    layout = share_axis(values)
    labels = tick_labels(layout.domain, layout.decimals, 100.0)
    assert len(set(labels)) == len(labels), labels  # the Metrics page once had nine ticks all "98.6%"
    assert 0.0 <= layout.domain[0] <= min(values) and max(values) <= layout.domain[1] <= 1.0
    assert layout.format == f".{layout.decimals}%" and layout.decimals <= 2


@pytest.mark.parametrize(("values", "decimals"), [([8.563570022583008] * 3, 2), ([1.2, 9.8], 0),
                                                  ([8.5635, 8.5637], 4), ([0.31, 0.42, 0.55], 2)])
def test_score_axis_decimals_follow_the_range(values: list[float], decimals: int) -> None:
    layout = number_axis(values)
    assert layout.decimals == decimals  # a flat score history showed six
    labels = tick_labels(layout.domain, layout.decimals, 1.0)
    assert len(set(labels)) == len(labels), labels
    assert layout.domain[0] <= min(values) and max(values) <= layout.domain[1]


def test_missing_values_are_skipped() -> None:
    assert share_axis([None, math.nan]).domain == (0.0, 1.0)
    assert number_axis([None, 2.0, math.nan]).decimals == 2


@pytest.mark.parametrize(("status", "state"), [
    (ServerStatus(running=True, pid=7, url="u", healthy=True), "running"),
    (ServerStatus(running=True, pid=7, url="u", healthy=False, starting=True), "starting"),
    (ServerStatus(running=True, pid=7, url="u", healthy=False), "not answering"),
    (ServerStatus(running=False, pid=None, url="u", healthy=False), "not running"),
])
def test_label_studio_is_said_starting_while_it_starts(status: ServerStatus, state: str) -> None:
    assert status.state == state
    assert LABEL_STUDIO_BRIEF[state].startswith(state)  # every page words it the same
