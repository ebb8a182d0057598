"""The paper's loop one setting away: `dmad init --scorer mapper` makes a home whose versions score with the
score mapper (square images, abnormal bank with seen and anomaly-centre parts), retrained by the worker on an
annotation; `dmad status` says which scorer the home uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from app.home_folder import Home
from app.services.database import open_database
from app.services.home_model import load_model
from app.services.loop.versions import active_version
from db.models import Image
from tests.loop_fixtures import LoopHome, run_cli, tiny_dataset


@pytest.fixture(scope="module")
def mapper_home(tmp_path_factory: pytest.TempPathFactory) -> LoopHome:
    root = tmp_path_factory.mktemp("mapper")
    loop = LoopHome(Home.at(root / "home"), root / "data")
    folders = tiny_dataset(loop.data)[:1]  # one class is enough to see the loop
    assert run_cli("init", *loop.args, "--scorer", "mapper", "--train-epochs", 2, "--retrain-epochs", 1) == 0
    assert run_cli("ingest", *loop.args, *folders) == 0
    assert run_cli("train", *loop.args) == 0
    return loop


def test_a_mapper_home_trains_and_retrains_with_the_mapper(mapper_home: LoopHome, capsys) -> None:
    with open_database(mapper_home.home)() as session:
        defect = session.scalars(select(Image).where(Image.role == "pool", Image.gt_label == 1)
                                 .order_by(Image.id)).first()
        path, mask = defect.path, defect.gt_mask_path
    assert run_cli("annotate", *mapper_home.args, path, "--mask", mask) == 0
    assert run_cli("worker", *mapper_home.args, "--once", "--sync-every", 0) == 0
    with open_database(mapper_home.home)() as session:
        version = active_version(session)
        assert version.name == "v0002"
        engine = version.config["engine"]
        assert engine["score"]["scorer"] == "mapper" and engine["backbone"]["geometry"] == "square"
        sizes = version.config["bank_sizes"]["abnormal"]
        assert sizes["seen"] > 0 and sizes["centre"] > 0  # rebuilt from the mask, with its perturbations
        model = load_model(mapper_home.home, version)
    assert model.uses_mapper and model.fitted().net is not None and model.fitted().scorer is None
    assert model.fitted().mapper_config.lambda_annotated > 0  # the semi-supervised regime: the mask trains it
    capsys.readouterr()
    assert run_cli("status", *mapper_home.args, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["scorer"] == "mapper" and status["active_version"]["scorer"] == "mapper"
    capsys.readouterr()
    assert run_cli("status", *mapper_home.args) == 0
    assert "scorer: mapper" in capsys.readouterr().out


def test_an_unknown_scorer_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_cli("init", "--home", tmp_path / "h", "--scorer", "forest")
    assert "invalid choice: 'forest'" in capsys.readouterr().err
