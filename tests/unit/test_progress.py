"""Progress of long steps: bars that show in a log file (not only on a terminal) without flooding it, and
reports from the coreset selection and the neighbour searches, which change nothing they compute."""

from __future__ import annotations

import io

import numpy as np

from dmad_core import progress_bar
from dmad_core.config import BankConfig
from dmad_core.coreset import greedy_coreset
from dmad_core.items import ImageItem
from dmad_core.memory import DualMemory
from dmad_core.progress_bar import REPORTS_PER_STEP


def test_a_bar_writes_whole_lines_when_stderr_is_not_a_terminal(monkeypatch):
    log = io.StringIO()  # not a tty: tqdm's disable=None printed nothing here
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress_bar, "LOG_DELAY_S", 0.0)
    monkeypatch.setattr(progress_bar, "LOG_INTERVAL_S", 0.0)
    for _ in progress_bar.make_bar(range(3), desc="training mapper", unit="epoch"):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines and all("training mapper" in line for line in lines)
    assert "3/3" in lines[-1]


def test_a_disabled_bar_writes_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress_bar, "LOG_DELAY_S", 0.0)
    monkeypatch.setattr(progress_bar, "LOG_INTERVAL_S", 0.0)
    with progress_bar.make_bar(total=2, desc="predict", unit="img", enabled=False) as bar:
        bar.update(2)
    assert log.getvalue() == ""


def test_coreset_reports_a_bounded_number_of_times_and_selects_the_same_points():
    x = np.random.default_rng(3).normal(size=(3000, 16)).astype(np.float32)
    reports: list[tuple[float, str]] = []
    quiet = greedy_coreset(x, 200, seed=5)
    loud = greedy_coreset(x, 200, seed=5, progress=lambda f, m: reports.append((f, m)), desc="normal bank coreset")
    np.testing.assert_array_equal(quiet, loud)
    assert 1 <= len(reports) <= REPORTS_PER_STEP
    assert reports[-1] == (1.0, "normal bank coreset: 200/200 patches selected")
    assert [f for f, _ in reports] == sorted(f for f, _ in reports)


def test_building_the_banks_and_the_neighbour_search_report_progress():
    rng = np.random.default_rng(4)
    items = [ImageItem.from_array(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), "a") for _ in range(30)]
    feats = [rng.normal(size=(6, 6, 8)).astype(np.float32) for _ in items]
    outliers = [rng.normal(size=(6, 6, 8)).astype(np.float32) for _ in range(3)]
    memory = DualMemory(BankConfig(coreset_ratio=0.2, outlier_coreset_ratio=0.2), dim=8, seed=0)
    built: list[tuple[float, str]] = []
    memory.build(items, feats, outliers, progress=lambda f, m: built.append((f, m)))
    assert any(m.startswith("normal bank coreset (a):") for _, m in built)  # per class, named
    assert any(m.startswith("outlier bank coreset:") for _, m in built)
    assert all(0.0 <= f <= 1.0 for f, _ in built) and built[-1][0] == 1.0
    memory.set_annotations([], [], net_scores=None)  # builds the abnormal bank's index
    searched: list[tuple[float, str]] = []
    flat = [f.reshape(-1, 8) for f in feats]
    nn_n, _ = memory.neighbours(items, flat, exclude=True, progress=lambda f, m: searched.append((f, m)),
                                desc="nearest neighbours: normal")
    assert searched[-1] == (1.0, "nearest neighbours: normal: 30/30 images") and len(searched) <= 30
    again, _ = memory.neighbours(items, flat, exclude=True)  # from the cache, without reports
    assert all(np.array_equal(a, b) for a, b in zip(nn_n, again, strict=True))
