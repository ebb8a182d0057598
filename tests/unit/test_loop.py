"""The active-learning loop through its CLI on tiny synthetic data with the real offline backbone and
a real SQLite database: first version, annotations, retrain, versions, and every bad input refused
without changing anything."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import func, select

from app.services.database import open_database
from app.services.labelstudio.home import MASK_PEAK_SHARES_KEY, PIXEL_THRESHOLD_KEY
from app.services.loop.annotations import record_annotation
from app.services.home_model import load_model
from app.services.loop.reranking import rerank_progress
from app.services.loop.versions import active_version, list_versions
from app.services.read.read_models import VALIDATION_SCORES_KEY
from app.worker import WorkerOptions, run_worker
from db.models import Annotation, Image, Job, ModelVersion, PoolScore
from tests.loop_fixtures import LoopHome, run_cli, trained_home, trained_home_template  # noqa: F401

METRICS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pro"}


def _status(loop: LoopHome, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert run_cli("status", *loop.args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def _defect_images(loop: LoopHome, category: str | None = None) -> list[Image]:
    with open_database(loop.home)() as session:
        query = select(Image).where(Image.role == "pool", Image.gt_label == 1).order_by(Image.id)
        rows = [img for img in session.scalars(query) if category in (None, img.category.name)]
        session.expunge_all()
    return rows


def _counts(loop: LoopHome) -> tuple[int, int, int]:
    with open_database(loop.home)() as session:
        return (session.scalar(select(func.count(Annotation.id))), session.scalar(select(func.count(Job.id))),
                session.scalar(select(func.count(ModelVersion.id))))


def test_first_version_is_active_with_metrics_and_pool_scores(trained_home: LoopHome, capsys) -> None:
    status = _status(trained_home, capsys)
    assert status["active_version"]["name"] == "v0001"
    assert status["active_version"]["mode"] == "scratch"
    for category in ("tiles", "fabric"):
        values = status["metrics"][category][0]["values"]
        assert set(values) == METRICS
        assert 0.5 < values["image_auroc"] <= 1.0  # the synthetic defects are plain to see
    with open_database(trained_home.home)() as session:
        version = active_version(session)
        n_pool = session.scalar(select(func.count(Image.id)).where(Image.role == "pool"))
        scores = list(session.scalars(select(PoolScore).where(PoolScore.version_id == version.id)))
        assert len(scores) == n_pool == 52
        top = max(scores, key=lambda s: s.score)
        assert top.image.gt_label == 1  # the highest-scoring pool image is a real defect
        assert top.patch_map_array().shape == (32, 32)
        x0, y0, x1, y1 = top.top_patches[0]["box"]
        assert 0 <= x0 < x1 <= top.image.width and 0 <= y0 < y1 <= top.image.height
        assert version.config["pixel_threshold"] is not None
        assert load_model(trained_home.home, version).predict  # the folder loads


def test_annotations_reach_a_new_active_version(trained_home: LoopHome, capsys) -> None:
    defects = _defect_images(trained_home, "tiles")[:3]
    for image in defects:
        mask = Path(image.gt_mask_path)
        assert run_cli("annotate", *trained_home.args, image.path, "--mask", mask) == 0
    normal = next(i for i in _pool(trained_home) if i.gt_label == 0)
    assert run_cli("annotate", *trained_home.args, normal.path, "--normal") == 0
    assert run_cli("annotate", *trained_home.args, _defect_images(trained_home, "fabric")[0].path, "--defect") == 0
    assert run_cli("worker", *trained_home.args, "--once", "--sync-every", 0) == 0

    status = _status(trained_home, capsys)
    active = status["active_version"]
    assert (active["name"], active["mode"], active["annotations"]) == ("v0002", "warm_start", 5)
    assert [h["version"] for h in status["metrics"]["tiles"]] == ["v0001", "v0002"]
    counts = active["trained_on"]["categories"]
    assert counts["tiles"]["defect_masks"] == 3 and counts["fabric"]["weak_defects"] == 1
    assert status["queue"]["queued"] == 0 and status["queue"]["failed"] == 0
    ranking = status["pool_ranking"]
    assert ranking["version"] == "v0002" and ranking["complete"] and ranking["scored"] == ranking["pool"] == 52
    assert all(j["type"] != "rerank" for j in status["queue"]["recent"])  # summed up in pool_ranking
    with open_database(trained_home.home)() as session:
        version = active_version(session)
        sizes = version.config["bank_sizes"]["abnormal"]
        assert sizes["seen"] > 0 and sizes["weak"] > 0 and sizes["centre"] > 0
        # the row's copy of the fitted state (FittedState.summary) is what the folder holds, under the keys
        # its readers look up
        summary = load_model(trained_home.home, version).fitted().summary()
        assert {PIXEL_THRESHOLD_KEY, MASK_PEAK_SHARES_KEY, VALIDATION_SCORES_KEY} <= set(summary)
        assert summary["mask_peak_shares"] and {k: version.config[k] for k in summary} == summary
        # one retrain, then the pool's re-ranking under it (the images its evaluation did not score)
        kinds = [job.type for job in session.scalars(select(Job).order_by(Job.id))]
        assert kinds.count("retrain") == 1 and kinds.count("train") == 1 and kinds.count("rerank") >= 1
        progress = rerank_progress(session, version.id)
        assert progress.complete and progress.scored == progress.pool


def _pool(loop: LoopHome) -> list[Image]:
    with open_database(loop.home)() as session:
        rows = list(session.scalars(select(Image).where(Image.role == "pool").order_by(Image.id)))
        session.expunge_all()
    return rows


def test_promote_and_rollback(trained_home: LoopHome, capsys) -> None:
    image = _defect_images(trained_home)[0]
    assert run_cli("annotate", *trained_home.args, image.path, "--mask", image.gt_mask_path) == 0
    assert run_cli("worker", *trained_home.args, "--once", "--sync-every", 0) == 0
    assert run_cli("rollback", *trained_home.args) == 0
    assert _status(trained_home, capsys)["active_version"]["name"] == "v0001"
    assert run_cli("promote", *trained_home.args, "v0002") == 0
    assert _status(trained_home, capsys)["active_version"]["name"] == "v0002"
    assert run_cli("promote", *trained_home.args, "v0009") == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_same_annotation_twice_is_stored_once(trained_home: LoopHome, capsys) -> None:
    image = _defect_images(trained_home)[0]
    outcomes = []
    for _ in range(2):
        capsys.readouterr()
        assert run_cli("annotate", *trained_home.args, image.path, "--mask", image.gt_mask_path, "--json") == 0
        outcomes.append(json.loads(capsys.readouterr().out)["outcome"])
    assert outcomes == ["created", "unchanged"]
    annotations, jobs, _ = _counts(trained_home)
    assert (annotations, jobs) == (1, 2)  # the first training's job + one retrain


def _expect_refused(loop: LoopHome, capsys, argv: list, needle: str) -> None:
    before = _counts(loop)
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert _counts(loop) == before  # nothing stored, nothing queued


def test_bad_input_gets_a_clear_error_and_changes_nothing(trained_home: LoopHome, capsys, tmp_path: Path) -> None:
    image = _defect_images(trained_home)[0]
    small = tmp_path / "small.png"
    PIL.Image.fromarray(np.full((10, 12), 255, np.uint8)).save(small)
    _expect_refused(trained_home, capsys, ["annotate", *trained_home.args, image.path, "--mask", small], "must match the image")

    stranger = tmp_path / "stranger.png"
    PIL.Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(stranger)
    _expect_refused(trained_home, capsys, ["annotate", *trained_home.args, stranger, "--normal"], "dmad ingest")

    _expect_refused(trained_home, capsys, ["annotate", *trained_home.args, image.path, "--defect", "--category",
                                           "bolts"], "unknown category")
    not_png = tmp_path / "mask.png"
    not_png.write_bytes(b"not an image")
    _expect_refused(trained_home, capsys, ["annotate", *trained_home.args, image.path, "--mask", not_png],
                    "not a readable image")


def test_a_corrupt_image_file_is_refused_and_skipped(trained_home: LoopHome, capsys, tmp_path: Path) -> None:
    folder = tmp_path / "washers" / "train" / "good"
    folder.mkdir(parents=True)
    good = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    good.save(folder / "000.png")
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    capsys.readouterr()
    assert run_cli("ingest", *trained_home.args, tmp_path / "washers") == 0
    out = capsys.readouterr().out
    assert "1 normal training images" in out and "001.png" in out  # reported and skipped, not a crash

    # a file that was fine at ingest and is corrupt now: annotating it is refused
    target = _defect_images(trained_home)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(target.path).read_bytes())
    assert run_cli("ingest", *trained_home.args, _single_category(tmp_path / "bent", broken)) == 0
    (tmp_path / "bent" / "test" / "bad" / "broken.png").write_bytes(b"garbage")
    _expect_refused(trained_home, capsys, ["annotate", *trained_home.args,
                                           tmp_path / "bent" / "test" / "bad" / "broken.png", "--defect"], "image")


def _single_category(root: Path, image: Path) -> Path:
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "bad").mkdir(parents=True)
    PIL.Image.open(image).save(root / "train" / "good" / "000.png")
    (root / "test" / "bad" / "broken.png").write_bytes(image.read_bytes())
    return root


def test_a_burst_of_50_annotations_coalesces_into_at_most_two_retrains(trained_home: LoopHome) -> None:
    sessions = open_database(trained_home.home)
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(trained_home.home, sessions,
                              WorkerOptions(poll_seconds=0.2, sync_every_seconds=None)), kwargs={"stop": stop})
    worker.start()
    try:
        pool = _pool(trained_home)[:50]
        t0 = time.monotonic()
        ids = []
        with sessions() as session:
            for image in pool:
                if image.gt_label == 1:
                    with PIL.Image.open(image.gt_mask_path) as im:
                        mask = np.asarray(im.convert("L")) > 127
                    result = record_annotation(session, trained_home.home, image=image.id, kind="defect_mask",
                                               mask=mask, source="ui")
                else:
                    result = record_annotation(session, trained_home.home, image=image.id, kind="normal", source="ui")
                ids.append(result.annotation_id)
        assert time.monotonic() - t0 < 10, "the burst itself must take under 10 s for this test to mean anything"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with sessions() as session:
                busy = session.scalar(select(func.count(Job.id)).where(Job.status.in_(("queued", "running"))))
            if not busy:
                break
            time.sleep(0.5)
    finally:
        stop.set()
        worker.join()
    with sessions() as session:
        retrains = list(session.scalars(select(Job).where(Job.type == "retrain")))
        assert 1 <= len(retrains) <= 2
        assert all(j.status == "succeeded" for j in retrains), [(j.status, j.error) for j in retrains]
        final = active_version(session)
        assert set(ids) <= set(final.trained_on["annotation_ids"])
        assert len(list_versions(session)) == 1 + len(retrains)
