"""Prepared homes for the UI tests: a real database, real image files, model versions, pool scores and
metrics, built through the same repositories and services the product uses.

Pool scores come from `score_pool`, the one function to swap for the engine's real `score_pool` once it
exists; until then it derives plausible heat maps from the synthetic ground-truth masks.

Import the fixtures you use into a test module (`from tests.ui_fixtures import ui_home, ...`).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from app.home import Home
from app.services import versions
from app.services.annotations import record_annotation
from db.engine import cached_engine, session_factory, upgrade_to_head
from db.models import Image, ModelVersion, PoolScore
from db.repositories import (
    PoolScoreRow,
    add_image,
    build_trained_on,
    get_or_create_category,
    record_metrics,
    store_pool_scores,
)
from dmad_core.data.synthetic import make_normal_image, make_synthetic_category

CATEGORIES = (("tiles", "grid"), ("fabric", "weave"))
IMAGE_SIZE = 128
GRID = 16  # patch grid of the fake scorer: 8-pixel patches on a 128-pixel image
HOME_ENV = "DMAD_HOME"


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


# -- the scorer stand-in ------------------------------------------------------------------------------
def _gt_mask(image: Image) -> np.ndarray:
    if image.gt_mask_path:
        with PIL.Image.open(image.gt_mask_path) as im:
            return np.asarray(im.convert("L")) > 127
    return np.zeros((image.height, image.width), dtype=bool)


def score_pool(session: Session, home: Home, version: ModelVersion, images: Sequence[Image]) -> list[PoolScoreRow]:
    """Pool scores of `images` under `version`. Stand-in for the engine's `score_pool`: swap this body
    for the real call and every UI test runs on real model output.

    The fake heat map is the defect's coverage of each patch over a noisy normal level; later versions
    (trained with more annotations) separate defects from normal texture a little better. Each top patch
    is a 3x3-cell window around a hot cell, so neighbouring patches of one defect overlap as a real
    receptive field does."""
    gain = 1.0 + 0.15 * (int(version.name[1:]) - 1)
    rows = []
    for image in images:
        rng = np.random.default_rng([image.id, int(version.name[1:])])
        mask = _gt_mask(image)
        gh, gw = GRID, GRID
        cover = mask[: mask.shape[0] // gh * gh, : mask.shape[1] // gw * gw]
        cover = cover.reshape(gh, mask.shape[0] // gh, gw, mask.shape[1] // gw).mean(axis=(1, 3))
        grid = 0.3 + 0.04 * rng.standard_normal((gh, gw)) + 0.7 * gain * np.sqrt(cover)
        grid = np.clip(grid, 0.0, None).astype(np.float32)
        ph, pw = image.height / gh, image.width / gw
        order = np.argsort(grid, axis=None)[::-1][:5]
        top = []
        for flat in order:
            r, c = divmod(int(flat), gw)
            box = [max(0, round((c - 1) * pw)), max(0, round((r - 1) * ph)),
                   min(image.width, round((c + 2) * pw)), min(image.height, round((r + 2) * ph))]
            top.append({"box": box, "score": float(grid[r, c])})
        rows.append(PoolScoreRow(image.id, float(grid.max()), grid, top))
    return rows


def _metrics(version_number: int) -> dict[str, dict[str, float]]:
    """Plausible per-class metrics that improve as annotations arrive."""
    out = {}
    for i, (category, _texture) in enumerate(CATEGORIES):
        base = 0.82 + 0.03 * i + 0.05 * (version_number - 1)
        out[category] = {
            "image_auroc": min(0.999, base), "pixel_auroc": min(0.999, base + 0.08), "pro": min(0.99, base - 0.05),
            "image_ap": min(0.999, base + 0.02), "pixel_ap": min(0.99, base - 0.30),
            "image_f1max": min(0.99, base - 0.04), "pixel_f1max": min(0.99, base - 0.28),
        }
    return out


# -- building a home ----------------------------------------------------------------------------------
def empty_home(root: Path) -> Home:
    """A home with an up-to-date, empty database."""
    home = Home.at(root)
    home.create()
    upgrade_to_head(home.db_url())
    return home


def _version(session: Session, home: Home, parent_id: int | None) -> ModelVersion:
    name, tmp = versions.new_version_dir(home, session)
    (tmp / "config.json").write_text('{"preset": "offline"}')
    return versions.commit_version(session, home, name, tmp, {"preset": "offline"}, parent_id,
                                   build_trained_on(session), status="candidate",
                                   message="trained by the UI test fixture")


def build_home(root: Path) -> PreparedHome:
    """Two synthetic categories; v0001 trained unsupervised, then two defect masks and a confirmed
    normal per category, then v0002 trained on them and active. Both versions scored the pool and
    have metrics."""
    home = empty_home(root / "home")
    sessions = session_factory(cached_engine(home.db_url()))
    pool: list[Image] = []
    defects: list[int] = []
    with sessions() as session:
        for i, (name, texture) in enumerate(CATEGORIES):
            folder = make_synthetic_category(root / "data", name, n_train=4, n_test_good=4, n_test_defect=6,
                                             size=IMAGE_SIZE, seed=i, texture=texture)
            for path in sorted((folder / "train" / "good").glob("*.png")):
                add_image(session, name, path, "train_normal")
            for path in sorted((folder / "test").glob("*/*.png")):
                defect = path.parent.name != "good"
                mask = folder / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
                image = add_image(session, name, path, "pool", gt_label=int(defect),
                                  gt_mask_path=mask if defect else None,
                                  defect_type=path.parent.name if defect else None)
                pool.append(image)
                if defect:
                    defects.append(image.id)
        session.commit()

        v1 = _version(session, home, None)
        versions.promote(session, v1.id)
        store_pool_scores(session, v1.id, score_pool(session, home, v1, pool))
        record_metrics(session, v1.id, _metrics(1))
        session.commit()

        annotated = []
        for name, _texture in CATEGORIES:
            in_category = [im for im in pool if im.category.name == name]
            for image in [im for im in in_category if im.gt_label == 1][:2]:
                record_annotation(session, home, image=image.id, kind="defect_mask", mask=_gt_mask(image),
                                  source="cli", enqueue_retrain=False)
                annotated.append(image.id)
            normal = next(im for im in in_category if im.gt_label == 0)
            record_annotation(session, home, image=normal.id, kind="normal", source="cli", enqueue_retrain=False)
            annotated.append(normal.id)
        time.sleep(0.01)  # distinct creation times: the charts order versions by them

        v2 = _version(session, home, v1.id)
        versions.promote(session, v2.id)
        store_pool_scores(session, v2.id, score_pool(session, home, v2, pool))
        record_metrics(session, v2.id, _metrics(2))
        session.commit()
        return PreparedHome(home, home.db_url(), [im.id for im in pool], defects, [v1.id, v2.id], annotated)


def add_bulk_pool(prepared: PreparedHome, n: int = 10_000, category: str = "bulk", size: int = 48) -> float:
    """Add `n` generated pool images (real files, registered rows) and a score of each under the active
    version, as a pool of production size; returns the seconds it took.

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
        grid_side = 6
        scores = []
        for image_id in ids:
            grid = (0.2 + 0.5 * rng.random((grid_side, grid_side))).astype(np.float32)
            r, c = divmod(int(grid.argmax()), grid_side)
            cell = size // grid_side
            top = [{"box": [c * cell, r * cell, (c + 1) * cell, (r + 1) * cell], "score": float(grid.max())}]
            scores.append(PoolScoreRow(image_id, float(grid.max()), grid, top))
        store_pool_scores(session, version_id, scores)
        session.commit()
    return time.perf_counter() - start


def pool_score_count(prepared: PreparedHome, version_id: int) -> int:
    with prepared.sessions()() as session:
        return len(session.scalars(select(PoolScore.id).where(PoolScore.version_id == version_id)).all())


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture
def ui_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PreparedHome]:
    """A prepared home, named by $DMAD_HOME for the app under test."""
    prepared = build_home(tmp_path)
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


@pytest.fixture(scope="module")
def ui_big_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PreparedHome]:
    """A prepared home with 10,000 more scored pool images (built once per module; read-only)."""
    prepared = build_home(tmp_path_factory.mktemp("ui-big"))
    seconds = add_bulk_pool(prepared)
    print(f"\nbuilt 10,000 pool images and scores in {seconds:.1f} s")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(HOME_ENV, str(prepared.home.root))
        yield prepared
