"""Prepared homes for the UI tests: a real database, real image files, and two real model versions
trained through the product's own CLI and services (v0001 unsupervised; then defect masks and confirmed
normals; v0002 warm-started on them), so every page shows real model output: pool scores, heat maps,
top patches and per-class metrics.

A first training takes a minute or two here, so the trained home is built once per test session (cached
under pytest's base temporary folder) and each test gets a light copy of its database and masks
(`copy_prepared`; `full=True` also copies the feature cache and model folders, for tests that retrain).

Import the fixtures you use into a test module (`from tests.ui_fixtures import ui_home, ...`).
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.cli import main as dmad
from app.home_folder import Home
from app.services.loop.annotations import record_annotation
from app.services.loop.training import train_version
from app.worker import rerank_now
from db.engine import cached_engine, session_factory, upgrade_to_head
from db.models import Image, ModelVersion, PoolScore
from db.repositories import PoolScoreRow, get_or_create_category, store_pool_scores
from dmad_core.data.synthetic import make_normal_image, make_synthetic_category

CATEGORIES = (("tiles", "grid"), ("fabric", "weave"))
N_TRAIN, N_GOOD, N_DEFECT = 6, 4, 6  # per category: normal training images; pool images without / with a defect
ANNOTATED_DEFECTS = 2  # per category, with their ground-truth masks, before v0002; plus one confirmed normal
HOME_ENV = "DMAD_HOME"
_READY = "ready"


@dataclass(frozen=True)
class PreparedHome:
    home: Home
    url: str
    pool_ids: list[int]  # pool images, defective and normal
    defect_ids: list[int]  # pool images with a synthetic defect
    version_ids: list[int]  # oldest first; the last one is active
    annotated_ids: list[int]  # images annotated before the last version was trained

    def sessions(self) -> sessionmaker[Session]:
        return session_factory(cached_engine(self.url))


# -- building a home ----------------------------------------------------------------------------------
def empty_home(root: Path) -> Home:
    """A home with an up-to-date, empty database."""
    home = Home.at(root)
    home.create()
    upgrade_to_head(home.db_url())
    return home


def _gt_mask(image: Image) -> np.ndarray:
    with PIL.Image.open(image.gt_mask_path) as im:
        return np.asarray(im.convert("L")) > 127


def _describe(home: Home, annotated: list[int]) -> PreparedHome:
    sessions = session_factory(cached_engine(home.db_url()))
    with sessions() as session:
        pool = session.execute(select(Image.id, Image.gt_label).where(Image.role == "pool").order_by(Image.id)).all()
        version_ids = list(session.scalars(select(ModelVersion.id).order_by(ModelVersion.created_at, ModelVersion.id)))
    return PreparedHome(home, home.db_url(), [i for i, _ in pool], [i for i, label in pool if label == 1],
                        version_ids, annotated)


def build_home(root: Path) -> PreparedHome:
    """Synthetic categories ingested and trained with the real CLI (v0001, unsupervised), then defect
    masks and a confirmed normal per category, then a warm-started retrain (v0002, active). Both
    versions scored the pool and recorded metrics; nothing is stubbed."""
    folders = [make_synthetic_category(root / "data", name, n_train=N_TRAIN, n_test_good=N_GOOD,
                                       n_test_defect=N_DEFECT, texture=texture, seed=5)
               for name, texture in CATEGORIES]
    home = Home.at(root / "home")
    args = ["--home", str(home.root)]
    assert dmad(["init", *args, "--train-epochs", "2", "--retrain-epochs", "1"]) == 0
    assert dmad(["ingest", *args, *map(str, folders)]) == 0
    assert dmad(["train", *args]) == 0
    sessions = session_factory(cached_engine(home.db_url()))
    annotated = []
    with sessions() as session:
        pool = list(session.scalars(select(Image).where(Image.role == "pool").order_by(Image.id)))
        for name, _texture in CATEGORIES:
            in_category = [im for im in pool if im.category.name == name]
            for image in [im for im in in_category if im.gt_label == 1][:ANNOTATED_DEFECTS]:
                record_annotation(session, home, image=image.id, kind="defect_mask", mask=_gt_mask(image),
                                  source="cli", enqueue_retrain=False)
                annotated.append(image.id)
            normal = next(im for im in in_category if im.gt_label == 0)
            record_annotation(session, home, image=normal.id, kind="normal", source="cli", enqueue_retrain=False)
            annotated.append(normal.id)
    time.sleep(0.01)  # distinct creation times: the charts order versions by them
    train_version(home, sessions, warm_start=True)
    rerank_now(home, sessions)  # the promotion queued the pool's re-ranking: done here, as a worker would
    return _describe(home, annotated)


def copy_prepared(src: PreparedHome, dest: Path, full: bool = False) -> PreparedHome:
    """A copy of a prepared home at `dest` (a home folder). Pages only read the database and masks, so
    by default the feature cache and model folders stay in the source (the copy's versions point
    there, read-only); `full` copies them too, for a worker that retrains."""
    skip = () if full else ("features", "models", "logs", "run")
    shutil.copytree(src.home.root, dest, ignore=lambda folder, names: [n for n in names if
                                                                         Path(folder) == src.home.root and n in skip])
    if full:
        with sqlite3.connect(dest / "dmad.db") as db:
            db.execute("UPDATE model_versions SET folder = replace(folder, ?, ?)", (str(src.home.root), str(dest)))
    home = Home.at(dest)
    return replace(src, home=home, url=home.db_url())


def add_bulk_pool(prepared: PreparedHome, n: int = 10_000, category: str = "bulk", size: int = 48) -> float:
    """Add `n` generated pool images (real files, registered rows) and a score of each under the active
    version, as a pool of production size; returns the seconds it took.

    Running the model on 10,000 images would take the test an hour, so each score is a real score row of
    the home's own pool, reused with jitter: the same grid size, score range and top patches.

    Images are small BMP variations of one texture (a distinct pixel makes each file distinct), written
    once and registered with one bulk insert: `add_image` per file would dominate the test's time."""
    start = time.perf_counter()
    folder = prepared.home.root.parent / "bulk"
    folder.mkdir(parents=True, exist_ok=True)
    base = make_normal_image("dots", size, np.random.default_rng(7))
    rng = np.random.default_rng(11)
    sessions = prepared.sessions()
    with sessions() as session:
        cat = get_or_create_category(session, category)
        session.flush()
        rows = []
        for i in range(n):
            pixels = base.copy()
            pixels[i // size % size, i % size] = (i * 7 % 256, i * 13 % 256, i * 29 % 256)
            pixels[0, 0] = (i >> 16 & 255, i >> 8 & 255, i & 255)
            buffer = io.BytesIO()
            PIL.Image.fromarray(pixels).save(buffer, format="BMP")
            data = buffer.getvalue()
            path = folder / f"{i:05d}.bmp"
            path.write_bytes(data)
            rows.append({"category_id": cat.id, "content_hash": hashlib.sha256(data).hexdigest(),
                         "path": str(path), "role": "pool", "width": size, "height": size})
        session.execute(insert(Image), rows)
        ids = list(session.scalars(select(Image.id).where(Image.category_id == cat.id).order_by(Image.id)))
        version_id = prepared.version_ids[-1]
        # Scores shaped like the real ones: each generated image takes a real pool score row of the
        # version (its grid, score and top patches, boxes scaled to the small image) with a little jitter.
        real = session.scalars(select(PoolScore).join(Image, Image.id == PoolScore.image_id)
                               .where(PoolScore.version_id == version_id, Image.category_id != cat.id)).all()
        templates = [(r.score, r.patch_map_array().astype(np.float32), r.image.width, list(r.top_patches))
                     for r in real]
        scores = []
        for k, image_id in enumerate(ids):
            score, grid, width, top = templates[k % len(templates)]
            factor = float(1.0 + 0.05 * rng.standard_normal())
            scale = size / width
            top = [{"box": [round(v * scale) for v in p["box"]], "score": p["score"] * factor} for p in top]
            scores.append(PoolScoreRow(image_id, score * factor, grid * factor, top))
        store_pool_scores(session, version_id, scores)
        session.commit()
    return time.perf_counter() - start


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ui_template(tmp_path_factory: pytest.TempPathFactory) -> PreparedHome:
    """The trained home, built once per test session (every module that imports this shares the folder)."""
    root = tmp_path_factory.getbasetemp() / "ui-template"
    if not (root / _READY).exists():
        shutil.rmtree(root, ignore_errors=True)
        prepared = build_home(root)
        (root / _READY).write_text(",".join(map(str, prepared.annotated_ids)))
    annotated = [int(i) for i in (root / _READY).read_text().split(",")]
    return _describe(Home.at(root / "home"), annotated)


@pytest.fixture
def ui_home(ui_template: PreparedHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PreparedHome]:
    """A copy of the trained home for this test, named by $DMAD_HOME for the app under test."""
    prepared = copy_prepared(ui_template, tmp_path / "home")
    monkeypatch.setenv(HOME_ENV, str(prepared.home.root))
    yield prepared


@pytest.fixture
def ui_empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A home whose database exists but holds nothing."""
    home = empty_home(tmp_path / "home")
    monkeypatch.setenv(HOME_ENV, str(home.root))
    return home


@pytest.fixture
def ui_no_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A home folder without a database (before `dmad init`)."""
    home = Home.at(tmp_path / "home")
    monkeypatch.setenv(HOME_ENV, str(home.root))
    return home
