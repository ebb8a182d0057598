"""The model on the line: per-class OK/NG thresholds calibrated on validation normals only, overrides kept
as a history, and `dmad predict` on files, folders and globs (awkward images, JSON Lines and CSV, heat
maps, --fail-on-ng, --ingest into the pool with retention). A real trained home (tests/ui_fixtures.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import func, select

from app.home_folder import Home
from app.services.line import decisions
from app.services.loop import versions
from app.services.line.prediction import LineModel, find_images
from app.services.home_model import load_model
from db.models import Image, PoolScore
from dmad_core.decision import calibrate_threshold
from tests.loop_fixtures import run_cli
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401


def data_folder(prepared: PreparedHome) -> Path:
    """The synthetic dataset the template home was ingested from (one folder per class)."""
    return prepared.home.root.parent.parent / "ui-template" / "data"


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_thresholds_are_calibrated_on_validation_normals_only(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        version = versions.active_version(session)
        model = load_model(ui_home.home, version)
        train_hashes = set(session.scalars(select(Image.content_hash).where(Image.role == "train_normal")))
        pool_hashes = set(session.scalars(select(Image.content_hash).where(Image.role != "train_normal")))
        thresholds = decisions.class_thresholds(session, version)
    # the images calibration read are normal training images the model held out, never a pool/test image
    validation = {item.hash for item in model.fitted().validation_items}
    assert validation and validation <= train_hashes and not validation & pool_hashes
    rate = version.config[decisions.DECISION_KEY]["false_alarm_rate"]
    for category, scores in model.fitted().validation_scores.items():
        assert thresholds[category].source == "calibrated"
        assert thresholds[category].threshold == pytest.approx(calibrate_threshold(scores, rate))
        assert thresholds[category].validation_normals == len(scores)
    assert set(thresholds) == {"tiles", "fabric"}


def test_an_override_is_recorded_shown_and_reset(ui_home: PreparedHome, capsys) -> None:  # noqa: F811
    home = ["--home", ui_home.home.root]
    assert run_cli("thresholds", *home, "set", "tiles", "0.5", "--note", "line 3 trial") == 0
    assert run_cli("thresholds", *home, "set", "tiles", "0.75", "--note", "too many false alarms") == 0
    capsys.readouterr()
    assert run_cli("thresholds", *home, "--json") == 0
    rows = {r["class"]: r for r in json.loads(capsys.readouterr().out)["thresholds"]}
    assert rows["tiles"]["threshold"] == 0.75 and rows["tiles"]["source"] == "override"
    assert rows["tiles"]["note"] == "too many false alarms" and rows["fabric"]["source"] == "calibrated"
    # rates implied on the annotated images: one confirmed normal and two defects per class
    assert rows["tiles"]["annotated_normals"] == 1 and rows["tiles"]["annotated_defects"] == 2
    assert rows["tiles"]["annotated_miss_rate"] is not None
    with ui_home.sessions()() as session:
        version = versions.active_version(session)
        assert [h.threshold for h in decisions.threshold_history(session, version, "tiles")] == [0.5, 0.75]
    assert run_cli("thresholds", *home, "reset", "tiles") == 0
    assert "tiles: " in capsys.readouterr().out
    with ui_home.sessions()() as session:
        assert decisions.class_thresholds(session, versions.active_version(session))["tiles"].source == "calibrated"
    assert run_cli("thresholds", *home, "set", "washer", "1.0") == 2
    assert "has no class 'washer'" in capsys.readouterr().err


def test_predict_a_folder_of_awkward_images(ui_home: PreparedHome, tmp_path: Path, capsys) -> None:  # noqa: F811
    folder = tmp_path / "line" / "tiles"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)).save(folder / "one-pixel.png")
    PIL.Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8), "L").save(folder / "grey.png")
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    big = np.zeros((7072, 7072, 3), dtype=np.uint8)  # 50 megapixels; flat, so the PNG stays small
    big[::64] = 200
    PIL.Image.fromarray(big).save(folder / "fifty-megapixels.png", compress_level=1)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    out = tmp_path / "scores.jsonl"
    code = run_cli("predict", "--home", ui_home.home.root, tmp_path / "line", "--output", out,
                   "--heatmaps", tmp_path / "maps")
    assert code == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "corrupt.png" in err and "4 scored with v0002" in err and "1 skipped" in err
    records = {Path(r["path"]).name: r for r in _jsonl(out.read_text())}
    assert set(records) == {"one-pixel.png", "grey.png", "rgba.png", "fifty-megapixels.png"}
    for r in records.values():
        assert r["class"] == "tiles" and r["model_version"] == "v0002" and r["decision"] in ("OK", "NG")
        assert (r["decision"] == "NG") == (r["score"] > r["threshold"]) and np.isfinite(r["score"])
        assert r["top_patches"] and len(r["top_patches"][0]["box"]) == 4
    assert (records["fifty-megapixels.png"]["width"], records["fifty-megapixels.png"]["height"]) == (7072, 7072)
    maps = sorted((tmp_path / "maps").glob("*.png"))
    assert len(maps) == 4
    with PIL.Image.open(next(m for m in maps if m.name.startswith("grey"))) as im:
        assert im.size == (80, 96)


def test_predict_decides_by_the_class_threshold_and_fails_on_ng(ui_home: PreparedHome, tmp_path: Path,  # noqa: F811
                                                               capsys) -> None:
    home = ["--home", ui_home.home.root]
    images = data_folder(ui_home) / "tiles" / "test"
    pattern = str(images / "*" / "*.png")
    assert run_cli("thresholds", *home, "set", "tiles", "-1000000") == 0  # everything is NG
    capsys.readouterr()
    assert run_cli("predict", *home, pattern, "--fail-on-ng") == 3
    records = _jsonl(capsys.readouterr().out)
    assert records and {r["decision"] for r in records} == {"NG"} and {r["class"] for r in records} == {"tiles"}
    assert {r["threshold_source"] for r in records} == {"override"}
    assert run_cli("thresholds", *home, "set", "tiles", "1000000") == 0  # nothing is
    capsys.readouterr()
    out = tmp_path / "scores.csv"
    assert run_cli("predict", *home, pattern, "--fail-on-ng", "--output", out) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(records) and {r["decision"] for r in rows} == {"OK"}
    assert json.loads(rows[0]["top_patches"])[0]["box"]
    # the class comes from --category when the folders do not name one; an unknown class is refused
    assert run_cli("predict", *home, tmp_path / "nothing-here") == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert run_cli("predict", *home, pattern, "--category", "washer") == 2
    assert "has no class 'washer'" in capsys.readouterr().err


def test_predict_ingest_feeds_the_pool_once_and_retention_bounds_it(ui_home: PreparedHome,  # noqa: F811
                                                                    tmp_path: Path, capsys) -> None:
    from dataclasses import replace

    home = ["--home", ui_home.home.root]
    folder = tmp_path / "today"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    sessions = ui_home.sessions()

    def line_images() -> tuple[int, int]:
        with sessions() as session:
            stored = session.scalar(select(func.count(Image.id)).where(Image.path.startswith(str(ui_home.home.images_dir))))
            scored = session.scalar(select(func.count(PoolScore.id)).join(Image, Image.id == PoolScore.image_id)
                                    .where(Image.path.startswith(str(ui_home.home.images_dir)),
                                           PoolScore.version_id == ui_home.version_ids[-1]))
        return int(stored), int(scored)

    assert run_cli("predict", *home, folder, "--category", "fabric", "--ingest") == 0
    assert "5 new in the pool" in capsys.readouterr().err
    assert line_images() == (5, 5)
    assert len(list(ui_home.home.images_dir.rglob("*.png"))) == 5
    assert run_cli("predict", *home, folder, "--category", "fabric", "--ingest") == 0  # the same bytes again
    assert "0 new in the pool" in capsys.readouterr().err
    assert line_images() == (5, 5)

    settings = ui_home.home.load_settings()
    ui_home.home.save_settings(replace(settings, line_pool_max_images=3))
    for i in range(5, 7):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert run_cli("predict", *home, folder, "--category", "fabric", "--ingest") == 0
    assert line_images() == (3, 3)
    assert len(list(ui_home.home.images_dir.rglob("*.png"))) == 3


def test_find_images_reports_what_names_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    files, problems = find_images([str(tmp_path / "a"), str(tmp_path / "a" / "x.png"), str(tmp_path / "*.jpg"),
                                   str(tmp_path / "empty"), str(tmp_path / "missing.png")])
    assert files == [(tmp_path / "a" / "x.png").resolve()]
    assert [reason for _, reason in problems] == ["the pattern matches no file",
                                                  "no image file (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp) in the folder",
                                                  "no such file or folder"]


def test_line_model_refuses_an_unknown_class(ui_home: PreparedHome) -> None:  # noqa: F811
    from app.services.line.prediction import LineImage
    from dmad_core.errors import Invalid, NotFound

    line = LineModel.load(ui_home.home, ui_home.sessions())
    with pytest.raises(NotFound, match="knows fabric, tiles"):
        line.check_category("washer")
    with pytest.raises(Invalid, match="unreadable image"):
        LineImage.from_bytes(b"GIF89a?", "tiles")
    with pytest.raises(Invalid, match="over the limit"):
        buffer = __import__("io").BytesIO()
        PIL.Image.new("L", (3000, 3000)).save(buffer, format="PNG")
        LineImage.from_bytes(buffer.getvalue(), "tiles", max_pixels=1_000_000)
    assert Home.at(ui_home.home.root).images_dir.name == "images"
