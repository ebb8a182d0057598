"""One scoring contract (app/services/line/inference.py): one image gets the same OK/NG and the same threshold
from every path that judges a part: the Inspect upload (the worker's job), the pool image's verdict on
Inspect, `dmad predict`, `dmad serve`'s /v1/score and the exported ONNX file; and the same again after an
engineer's override (`dmad thresholds set`). A real trained home (tests/ui_fixtures.py), nothing stubbed.

Cost: two ONNX exports and one worker run on the shared trained home (about 40 s of the suite on 2 cores).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

from app.api.scoring import ServeConfig, create_app
from app.services.read import ui_queries as queries
from app.services.loop import versions
from app.services.line.inference import Judge
from app.ui.uploads import save_upload
from app.worker import WorkerOptions, run_worker
from db.models import PoolScore
from tests.loop_fixtures import run_cli
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401

TOKEN = "one-answer"
INSPECT = Path(__file__).resolve().parents[2] / "app" / "ui" / "pages" / "2_Inspect.py"


def answers(prepared: PreparedHome, image_id: int, tmp: Path,
            capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    """(decision, threshold, source, score) of one pool image from each of the five paths."""
    home, sessions = prepared.home, prepared.sessions()
    with sessions() as session:
        info = queries.image_info(session, image_id)
        active = versions.active_version(session)
        stored = session.query(PoolScore).filter_by(image_id=image_id, version_id=active.id).one()
        verdict = Judge.for_version(session, active.id).verdict(info.category, stored.score)
    got: dict[str, dict[str, Any]] = {"pool": {"decision": verdict.decision, "threshold": verdict.threshold,
                                               "source": verdict.threshold_source, "score": stored.score}}
    # ... which the Inspect page shows for the pool image (the fixture names the home in $DMAD_HOME)
    at = AppTest.from_file(str(INSPECT), default_timeout=60)
    at.query_params["image_id"] = str(image_id)
    at.run()
    assert not at.exception
    shown = f"**{verdict.decision}** under {active.name}: the class's threshold is {verdict.threshold:.4f}"
    assert any(shown in e.value for e in [*at.warning, *at.success])

    # the Inspect upload, scored by the worker's own code
    data = Path(info.path).read_bytes()
    path = save_upload(home, "part.png", data)
    with sessions() as session:
        job = queries.enqueue_score_upload(session, path, info.category)
    assert run_worker(home, sessions, WorkerOptions(once=True, sync_every_seconds=None), threading.Event()) >= 1
    with sessions() as session:
        result = queries.job(session, job.id).result
    got["upload"] = {"decision": result["decision"], "threshold": result["threshold"],
                     "source": result["threshold_source"], "score": result["score"]}

    # dmad predict
    capsys.readouterr()
    assert run_cli("predict", "--home", home.root, "--category", info.category, info.path) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got["predict"] = {"decision": record["decision"], "threshold": record["threshold"],
                      "source": record["threshold_source"], "score": record["score"]}

    # /v1/score
    app = create_app(home, sessions, ServeConfig(feed=False), token=TOKEN)
    with TestClient(app) as client:
        r = client.post(f"/v1/score?category={info.category}", content=data,
                        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    got["serve"] = {"decision": body["decision"], "threshold": body["threshold"], "source": body["threshold_source"],
                    "score": body["score"]}

    # the exported ONNX file, run without the home
    out = tmp / "line.onnx"
    assert run_cli("export", "--home", home.root, out) == 0
    capsys.readouterr()
    assert run_cli("predict", "--home", tmp / "no-home", "--model", out, "--category", info.category, info.path) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got["onnx"] = {"decision": record["decision"], "threshold": record["threshold"],
                   "source": record["threshold_source"], "score": record["score"]}
    return got


def same_answer(got: dict[str, dict[str, Any]]) -> dict[str, Any]:
    reference = got["predict"]
    for path, answer in got.items():
        assert answer["decision"] == reference["decision"], (path, got)
        assert answer["threshold"] == pytest.approx(reference["threshold"], abs=1e-6), (path, got)
        assert answer["source"] == reference["source"], (path, got)
        assert answer["score"] == pytest.approx(reference["score"], abs=1e-3), (path, got)
    return reference


def test_one_image_gets_one_answer_everywhere_before_and_after_an_override(
        ui_home: PreparedHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    image_id = ui_home.defect_ids[0]
    before = same_answer(answers(ui_home, image_id, tmp_path / "before", capsys))
    assert before["source"] == "calibrated"
    # the score must sit clear of the threshold for the comparison to mean something (exports agree to 1e-4)
    assert abs(before["score"] - before["threshold"]) > 1e-3

    # an override that turns the decision over: every path follows it
    flipped = before["score"] + 0.5 if before["decision"] == "NG" else before["score"] - 0.5
    with ui_home.sessions()() as session:
        category = queries.image_info(session, image_id).category
    assert run_cli("thresholds", "--home", ui_home.home.root, "set", category, f"{flipped}", "--note", "trial") == 0
    after = same_answer(answers(ui_home, image_id, tmp_path / "after", capsys))
    assert after["source"] == "override" and after["threshold"] == pytest.approx(flipped)
    assert after["decision"] != before["decision"]
