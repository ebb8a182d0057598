"""The home's feature cache under a budget: after a job the worker evicts down to it, keeping the entries
of normal training and annotated images; an evicted pool image is scored again from its file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from app.services.cache_budget import enforce, protected_hashes
from app.services.line.prediction import LineImage, LineModel
from app.services.home_model import engine_config
from db.models import Image
from dmad_core.cache import FeatureCache
from tests.ui_fixtures import PreparedHome, copy_prepared, ui_template  # noqa: F401


def test_eviction_keeps_what_retrains_read_and_a_pool_image_is_scored_again(ui_template: PreparedHome,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    prepared = copy_prepared(ui_template, tmp_path / "home", full=True)
    home = prepared.home
    cache = FeatureCache(home.features_dir, engine_config(home).backbone.cache_key())
    with prepared.sessions()() as session:
        protected = protected_hashes(session)
        pool = session.execute(select(Image.content_hash, Image.path, Image.category_id)
                               .where(Image.role == "pool", Image.content_hash.not_in(protected))).all()
    before = {p.stem for _, _, p in cache.entries()}
    assert protected <= before and {h for h, _, _ in pool} & before  # pool features were cached by training
    line = LineModel.load(home, prepared.sessions())
    category = line.categories[0]
    scored_before = line.score([LineImage.from_file(pool[0][1], category)])[0].score

    home.save_settings(replace(home.load_settings(), feature_cache_max_bytes=0))
    report = enforce(home, prepared.sessions())
    after = {p.stem for _, _, p in cache.entries()}
    assert after == protected & before and report.evicted == len(before - protected)
    # an evicted pool image: the backbone reads it again, and it scores the same
    fresh = LineModel.load(home, prepared.sessions())
    assert abs(fresh.score([LineImage.from_file(pool[0][1], category)])[0].score - scored_before) < 1e-4

    home.save_settings(replace(home.load_settings(), feature_cache_max_bytes=None))
    assert enforce(home, prepared.sessions()) is None
