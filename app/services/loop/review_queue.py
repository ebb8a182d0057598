"""The Review queue: which pool images an inspector is offered next, in what order, and why.

One function, ``offer``, orders the pool for the Review page and for the benchmark that measures the
order against a simulated inspector (``benchmarks/active_loop.py``), so what is measured is what ships.

Strategies (``STRATEGIES``):
- ``top``: the active version's image score, hottest first (the order Review had before; SQL paging);
- ``random``: a seeded shuffle (a baseline, and an unbiased spot check);
- ``balanced``: class-balanced rounds of each class's hottest, so that no class starves;
- ``default``: class-balanced rounds that cycle, within each class, through its hottest image, the image
  nearest its OK/NG threshold (where a label changes a decision), and the hot image least like anything
  labelled or offered so far (diversity in feature space); near-duplicates of what is already labelled
  or offered (twenty near-copies of one part from the line's feed) go to the back of the class's line.
- ``disagree``: as ``default``, with the pick "unlike" replaced by the image on which the scorer's two
  terms disagree most (the kNN distance against the class's defect classifier, both as image scores in
  the class's unit): unusual but unlike any drawn defect, or like one but close to normal. A class without
  a classifier yet (no annotation) takes its hottest instead; an image the line's feed scored carries its
  terms from the next re-ranking. Measured against the others, not the default (docs/results.md).

Similarity is measured on each image's cached patch features (``<home>/features``, written when the pool
is ranked), mean-pooled, centred on its class and normalised: reading them costs a file read per candidate,
no backbone. An image without cached features is simply not compared.

Each offered image carries a reason in an inspector's words ("hottest of tire", "on the OK/NG line of
bottle", "unlike anything labelled", "looks like 3 parts already marked normal") and its score against the
class's OK/NG threshold in force (``app.services.line.decisions``): "2.3x the threshold".
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.home_folder import Home
from app.services.line.decisions import class_thresholds
from app.services.read.ui_queries import ReviewFilter, ScoredImage, filtered, review_page, scored_images
from db.models import Annotation, Category, Image, ModelVersion, PoolScore
from dmad_core.cache import FeatureCache
from dmad_core.config import DMADConfig

Strategy = Literal["top", "random", "balanced", "default", "disagree"]
STRATEGIES: tuple[str, ...] = ("top", "random", "balanced", "default", "disagree")
DEFAULT_STRATEGY: Strategy = "default"

# Within a class, the default order cycles through these picks.
DEFAULT_CYCLE: tuple[str, ...] = ("hottest", "line", "hottest", "unlike")
DISAGREE_CYCLE: tuple[str, ...] = ("hottest", "line", "hottest", "disagree")


@dataclass(frozen=True)
class QueueSettings:
    """The knobs of the default order (measured in benchmarks/active_loop.py, docs/results.md)."""

    cycle: tuple[str, ...] = DEFAULT_CYCLE
    duplicate_quantile: float = 0.02  # closer than this quantile of the class's pairwise distances: a near-copy
    like_normal_quantile: float = 0.05  # "looks like N parts already marked normal" below this quantile
    unlike_from_hottest: int = 3  # "unlike" picks among the class's hottest k x (pending) candidates
    candidates_margin: int = 20  # candidates read per class beyond what the page needs
    labelled_max: int = 400  # labelled images of a class compared with (the newest)


@dataclass(frozen=True)
class Offered:
    """One image as Review offers it."""

    image: ScoredImage
    reason: str  # in an inspector's words
    pick: str  # "hottest", "line", "unlike", "disagree", "random", "duplicate"
    threshold: float | None  # the class's OK/NG threshold in force
    like_normals: int = 0  # confirmed normals it looks like

    @property
    def versus_threshold(self) -> str:
        """The score against the class's threshold, e.g. "2.3x the threshold"."""
        return versus_threshold(self.image.score, self.threshold)


def versus_threshold(score: float, threshold: float | None) -> str:
    """``score`` in units of the class's OK/NG threshold ("2.3x the threshold", "0.4x the threshold");
    where the threshold is not positive, by how much it lies above or below it."""
    if threshold is None:
        return "no threshold"
    if threshold > 0:
        return f"{score / threshold:.1f}x the threshold"
    return f"{score - threshold:+.2f} from the threshold"


@dataclass
class _Candidate:
    image_id: int
    category: str
    score: float
    content_hash: str
    embedding: np.ndarray | None = None
    like_normals: int = 0
    taken: bool = False
    dup_cut: float = -1.0  # a distance at or below this to a labelled or offered image: a near-copy
    labelled: np.ndarray | None = None  # the class's labelled images' embeddings (rows)
    disagreement: float | None = None  # |kNN term - classifier term| (None: either term unknown)


def offer(session: Session, home: Home | None, f: ReviewFilter, limit: int, offset: int = 0,
          strategy: str = DEFAULT_STRATEGY, seed: int = 0, settings: QueueSettings = QueueSettings()) -> list[Offered]:
    """One page of the pool as Review offers it.

    Args:
        session: a database session.
        home: the home (its feature cache gives the similarities); None: no similarity is used.
        f: the Review filter (version, classes, minimum score, hide annotated).
        limit: images on the page.
        offset: images before the page.
        strategy: one of ``STRATEGIES``.
        seed: the ``random`` strategy's seed.
        settings: the default order's knobs.

    Returns:
        The page's images, each with its reason and threshold.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    version = session.get(ModelVersion, f.version_id)
    if version is None:
        return []
    thresholds = {c: t.threshold for c, t in class_thresholds(session, version).items()}
    if strategy == "top":
        rows = review_page(session, f, limit, offset)
        return [Offered(r, f"hottest of {r.category}", "hottest", thresholds.get(r.category)) for r in rows]
    need = offset + limit
    if strategy == "random":
        ids = [r[0] for r in session.execute(_base(f).order_by(PoolScore.image_id))]
        _random.Random(seed).shuffle(ids)
        picks = [(i, "random") for i in ids[offset:need]]
        by_id = {r.image_id: r for r in scored_images(session, f.version_id, [i for i, _ in picks])}
        return [Offered(by_id[i], f"random pick of {by_id[i].category}", p, thresholds.get(by_id[i].category))
                for i, p in picks if i in by_id]
    per_class = _candidates(session, f, thresholds, need + settings.candidates_margin, strategy == "disagree")
    diverse = strategy in ("default", "disagree")
    if diverse and home is not None:
        _embed(session, home, version, f, per_class, settings)
    cycle = {"balanced": ("hottest",), "disagree": DISAGREE_CYCLE}.get(strategy, settings.cycle)
    order = _balanced_rounds(per_class, thresholds, cycle, need, settings, diverse=diverse)
    page = order[offset:need]
    by_id = {r.image_id: r for r in scored_images(session, f.version_id, [c.image_id for c, _ in page])}
    out = []
    for cand, pick in page:
        row = by_id.get(cand.image_id)
        if row is not None:
            out.append(Offered(row, _reason(pick, cand), pick, thresholds.get(cand.category), cand.like_normals))
    return out


def _reason(pick: str, cand: _Candidate) -> str:
    text = {"hottest": f"hottest of {cand.category}", "line": f"on the OK/NG line of {cand.category}",
            "unlike": "unlike anything labelled", "duplicate": f"like an image already offered of {cand.category}",
            "disagree": f"the distance and the defect classifier of {cand.category} disagree on it",
            }.get(pick, pick)
    if cand.like_normals:
        text += f"; looks like {cand.like_normals} part{'s' if cand.like_normals > 1 else ''} already marked normal"
    return text


# -- reading the pool --------------------------------------------------------------------------------
def _base(f: ReviewFilter) -> Any:
    return filtered(select(PoolScore.image_id, Category.name, PoolScore.score, Image.content_hash,
                           PoolScore.knn_score, PoolScore.classifier_score).select_from(PoolScore), f)


def _candidates(session: Session, f: ReviewFilter, thresholds: dict[str, float], n: int,
                disagreeing: bool = False) -> dict[str, list[_Candidate]]:
    """Per class: its ``n`` hottest images, its ``n`` nearest the threshold and, with ``disagreeing``, the
    ``n`` on which the scorer's two terms disagree most (one list, hottest first)."""
    classes = list(f.categories) or list(session.scalars(select(Category.name).order_by(Category.name)))
    out: dict[str, list[_Candidate]] = {}
    gap = func.abs(PoolScore.knn_score - PoolScore.classifier_score)
    for category in classes:
        query = _base(f).where(Category.name == category)
        rows = list(session.execute(query.order_by(PoolScore.score.desc(), PoolScore.image_id).limit(n)))
        if category in thresholds:
            rows += session.execute(query.order_by(func.abs(PoolScore.score - thresholds[category]),
                                                   PoolScore.image_id).limit(n))
        if disagreeing:
            rows += session.execute(query.where(PoolScore.classifier_score.is_not(None))
                                    .order_by(gap.desc(), PoolScore.image_id).limit(n))
        seen: set[int] = set()
        cands = [_Candidate(int(i), c, float(s), h, disagreement=None if k is None or q is None else abs(k - q))
                 for i, c, s, h, k, q in rows if not (i in seen or seen.add(i))]
        if cands:
            out[category] = sorted(cands, key=lambda c: (-c.score, c.image_id))
    return out


def _embed(session: Session, home: Home, version: ModelVersion, f: ReviewFilter,
           per_class: dict[str, list[_Candidate]], settings: QueueSettings) -> None:
    """Mean-pooled cached features of the candidates and of the labelled images of their classes;
    sets each candidate's embedding (centred on its class) and how many confirmed normals it looks like."""
    engine = (version.config or {}).get("engine")
    if not engine:
        return
    cache = FeatureCache(home.features_dir, DMADConfig.from_dict(engine).backbone.cache_key())
    for category, cands in per_class.items():
        labelled = session.execute(
            select(Image.content_hash, Annotation.kind).join(Annotation, Annotation.image_id == Image.id)
            .join(Category, Category.id == Image.category_id)
            .where(Category.name == category, Annotation.deleted_at.is_(None))
            .order_by(Annotation.id.desc()).limit(settings.labelled_max)).all()
        vecs = [_pooled(cache, c.content_hash) for c in cands]
        hashes = {c.content_hash for c in cands}  # shown labelled images (hide_annotated off) are no "others"
        lab = [(_pooled(cache, h), kind) for h, kind in labelled if h not in hashes]
        lab = [(v, k) for v, k in lab if v is not None]
        known = [v for v in vecs if v is not None] + [v for v, _ in lab]
        if len(known) < 3:
            continue
        centre = np.mean(known, axis=0)
        for cand, v in zip(cands, vecs, strict=True):
            cand.embedding = None if v is None else _unit(v - centre)
        lab_normals = [_unit(v - centre) for v, k in lab if k == "normal"]
        lab_all = [_unit(v - centre) for v, _ in lab]
        embedded = [c for c in cands if c.embedding is not None]
        if len(embedded) < 3:
            continue
        cand_mat = np.stack([c.embedding for c in embedded])
        pair = 1.0 - cand_mat @ cand_mat.T
        pair = pair[np.triu_indices(len(embedded), 1)]
        like_cut = float(np.quantile(pair, settings.like_normal_quantile))
        dup_cut = float(np.quantile(pair, settings.duplicate_quantile))
        labelled_mat = np.stack(lab_all) if lab_all else None
        for c in embedded:
            c.dup_cut, c.labelled = dup_cut, labelled_mat
            if lab_normals:
                d = 1.0 - np.stack(lab_normals) @ c.embedding
                c.like_normals = int((d <= like_cut).sum())


def _pooled(cache: FeatureCache, content_hash: str) -> np.ndarray | None:
    feats = cache.get(content_hash)
    if feats is None:
        return None
    return np.asarray(feats, dtype=np.float32).reshape(-1, feats.shape[-1]).mean(axis=0)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


# -- the order ---------------------------------------------------------------------------------------
def _balanced_rounds(per_class: dict[str, list[_Candidate]], thresholds: dict[str, float], cycle: Sequence[str],
                     need: int, settings: QueueSettings, diverse: bool) -> list[tuple[_Candidate, str]]:
    """Round after round, one image of each class (classes by name), picked by the class's next step of
    ``cycle``; with ``diverse``, near-copies of anything labelled or already offered wait at the back."""
    order: list[tuple[_Candidate, str]] = []
    steps = {c: 0 for c in per_class}
    offered: dict[str, list[np.ndarray]] = {c: [] for c in per_class}
    while len(order) < need:
        progressed = False
        for category in sorted(per_class):
            pending = [c for c in per_class[category] if not c.taken]
            if not pending:
                continue
            pick = cycle[steps[category] % len(cycle)]
            steps[category] += 1
            fresh = [c for c in pending if not (diverse and _is_copy(c, offered[category]))] if diverse else pending
            if not fresh:
                chosen, pick = pending[0], "duplicate"
            elif pick == "line" and category in thresholds:
                chosen = min(fresh, key=lambda c: (abs(c.score - thresholds[category]), c.image_id))
            elif pick == "disagree" and any(c.disagreement is not None for c in fresh):
                chosen = max((c for c in fresh if c.disagreement is not None),
                             key=lambda c: (c.disagreement or 0.0, c.score, -c.image_id))
            elif pick == "unlike" and diverse:
                pool = fresh[:max(1, settings.unlike_from_hottest * len(cycle))]
                chosen = max(pool, key=lambda c: (_novelty(c, offered[category]), c.score))
                if _novelty(chosen, offered[category]) <= 0:
                    chosen, pick = fresh[0], "hottest"
            else:
                chosen, pick = fresh[0], "hottest"
            chosen.taken = True
            if chosen.embedding is not None:
                offered[category].append(chosen.embedding)
            order.append((chosen, pick))
            progressed = True
            if len(order) >= need:
                break
        if not progressed:
            break
    return order


def _others(c: _Candidate, offered: list[np.ndarray]) -> np.ndarray | None:
    mats = [m for m in (c.labelled, np.stack(offered) if offered else None) if m is not None]
    return np.concatenate(mats) if mats else None


def _is_copy(c: _Candidate, offered: list[np.ndarray]) -> bool:
    others = _others(c, offered)
    if c.embedding is None or others is None:
        return False
    return float((1.0 - others @ c.embedding).min()) <= c.dup_cut


def _novelty(c: _Candidate, offered: list[np.ndarray]) -> float:
    """Distance to the nearest labelled or offered image of the class (0 without features or others)."""
    others = _others(c, offered)
    if c.embedding is None or others is None:
        return 0.0
    return float((1.0 - others @ c.embedding).min())
