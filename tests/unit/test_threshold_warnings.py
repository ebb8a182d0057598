"""Honest thresholds: a class calibrated on too few validation normals for the home's false-alarm rate
(with n normals the smallest checkable rate is about 1/(n+1)) says so, with what to do, wherever its
threshold is shown: `dmad thresholds` (text and JSON), the Training page, `/v1/version` and the version's
record. The trained test home holds out one validation normal per class against a 1 % target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from app.api.scoring import ServeConfig, create_app
from app.services.loop import versions
from app.services.line.decisions import DECISION_KEY, normals_needed, rate_warning, smallest_checkable_rate
from tests.loop_fixtures import run_cli
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

TRAINING = Path(__file__).resolve().parents[2] / "app" / "ui" / "pages" / "3_Training.py"


def test_the_rate_n_normals_support() -> None:
    assert smallest_checkable_rate(99) == pytest.approx(0.01) and normals_needed(0.01) == 99
    assert normals_needed(0.1) == 9 and normals_needed(0.0) is None
    assert rate_warning("tiles", 99, 0.01) is None and rate_warning("tiles", 3, None) is None
    text = rate_warning("tiles", 2, 0.01)
    assert text is not None and "2 validation normals cannot support" in text
    assert "Ingest more normal images of tiles" in text and "about 99 validation normals" in text
    assert "0.333 or more" in text  # the rate 2 normals support: accept it


def test_too_few_validation_normals_are_said_everywhere(ui_home: PreparedHome, capsys) -> None:  # noqa: F811
    home = ui_home.home
    with ui_home.sessions()() as session:
        record = versions.active_version(session).config[DECISION_KEY]
    normals = record["validation_normals"]
    assert normals and all(n < normals_needed(record["false_alarm_rate"]) for n in normals.values())
    # the version's record
    assert set(record["warnings"]) == set(normals) and "Ingest more normal images" in record["warnings"]["tiles"]

    # dmad thresholds, JSON and text
    capsys.readouterr()
    assert run_cli("thresholds", "--home", home.root, "--json") == 0
    rows = {r["class"]: r for r in json.loads(capsys.readouterr().out)["thresholds"]}
    for category, n in normals.items():
        assert rows[category]["supported_false_alarm_rate"] == pytest.approx(1 / (n + 1))
        assert f"{n} validation normal" in rows[category]["warning"]
    assert run_cli("thresholds", "--home", home.root) == 0
    assert capsys.readouterr().out.count("    warning: ") == len(normals)

    # the Training page
    at = AppTest.from_file(str(TRAINING), default_timeout=60)
    at.run()
    assert not at.exception
    shown = [w.value for w in at.warning if "cannot support a false-alarm rate" in w.value]
    assert len(shown) == len(normals) and all("Ingest more normal images" in w for w in shown)

    # /v1/version
    with TestClient(create_app(home, ui_home.sessions(), ServeConfig(feed=False), token="t")) as client:
        r = client.get("/v1/version", headers={"Authorization": "Bearer t"})
    assert r.status_code == 200, r.text
    classes = r.json()["classes"]
    for category, n in normals.items():
        assert classes[category]["validation_normals"] == n
        assert classes[category]["warning"] == rows[category]["warning"]
