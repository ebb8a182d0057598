"""Holds the home's feature cache to its budget (``HomeSettings.feature_cache_max_bytes``) after each job:
least recently used entries go first, never those of the images every retrain reads (the normal training
images, which the normal bank is built from, and the annotated ones, which its abnormal parts and the
classifiers are). A pool image whose features went is read by the backbone again when it is next scored.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.home_model import engine_config
from db.models import Annotation, Image
from dmad_core.cache import EvictionReport, FeatureCache


def protected_hashes(session: Session) -> set[str]:
    """Content hashes of the normal training images and of every annotated image."""
    training = session.scalars(select(Image.content_hash).where(Image.role == "train_normal"))
    annotated = session.scalars(select(Image.content_hash).join(Annotation, Annotation.image_id == Image.id)
                                .where(Annotation.deleted_at.is_(None)))
    return set(training) | set(annotated)


def enforce(home: Home, sessions: sessionmaker[Session]) -> EvictionReport | None:
    """Evict down to the budget (None when the home sets no budget)."""
    budget = home.load_settings().feature_cache_max_bytes
    if budget is None:
        return None
    with sessions() as session:
        protected = protected_hashes(session)
    cache = FeatureCache(home.features_dir, engine_config(home).backbone.cache_key())
    return cache.evict(budget, protected)
