"""The Review queue's order (app/services/loop/review_queue.py) on a prepared home: hottest first as before,
class-balanced rounds by default, each image with a reason and its score against its class's threshold.
Cost: the shared prepared home, then well under a second a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.services.loop import review_queue
from app.services.read import ui_queries as queries
from app.services.line.decisions import class_thresholds
from db.models import ModelVersion
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401


def _everything(ui: PreparedHome) -> queries.ReviewFilter:
    return queries.ReviewFilter(ui.version_ids[-1], hide_annotated=False)


def test_top_is_the_score_order_with_its_reason(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        offered = review_queue.offer(session, None, _everything(ui_home), limit=8, strategy="top")
        ranked = queries.review_page(session, _everything(ui_home), limit=8)
    assert [o.image.image_id for o in offered] == [r.image_id for r in ranked]
    assert all(o.reason == f"hottest of {o.image.category}" for o in offered)
    assert offered[0].versus_threshold.endswith("the threshold")


def test_default_is_class_balanced_and_puts_the_line_in_front(ui_home: PreparedHome,  # noqa: F811
                                                              ui_template: PreparedHome) -> None:  # noqa: F811
    flt = _everything(ui_home)
    with ui_home.sessions()() as session:
        # the template's feature cache: the copy's versions read it (the similarity's input)
        offered = review_queue.offer(session, ui_template.home, flt, limit=12)
        page2 = review_queue.offer(session, ui_template.home, flt, limit=6, offset=6)
        version = session.get(ModelVersion, flt.version_id)
        thresholds = {c: t.threshold for c, t in class_thresholds(session, version).items()}
        pool = queries.review_page(session, flt, limit=100)
    ids = [o.image.image_id for o in offered]
    assert len(set(ids)) == 12 and ids[6:] == [o.image.image_id for o in page2]
    for i in range(0, 12, 2):  # each round offers one image of each class
        assert {o.image.category for o in offered[i:i + 2]} == {"fabric", "tiles"}
    for category in ("fabric", "tiles"):
        mine = [o for o in offered if o.image.category == category]
        assert mine[0].reason == f"hottest of {category}"
        assert mine[0].image.score == max(r.score for r in pool if r.category == category)
        line = next(o for o in mine if o.pick == "line")
        assert line.reason.startswith(f"on the OK/NG line of {category}")
        before = {o.image.image_id for o in mine[:mine.index(line)]}
        left = [r for r in pool if r.category == category and r.image_id not in before]
        assert abs(line.image.score - thresholds[category]) == min(abs(r.score - thresholds[category]) for r in left)
    assert any(o.reason.startswith("unlike anything labelled") for o in offered)  # features were read
    for o in offered:
        assert o.threshold == thresholds[o.image.category]
        assert o.versus_threshold == review_queue.versus_threshold(o.image.score, o.threshold)


def test_random_is_seeded(ui_home: PreparedHome) -> None:  # noqa: F811
    with ui_home.sessions()() as session:
        a, b, c = (review_queue.offer(session, None, _everything(ui_home), limit=20, strategy="random", seed=s)
                   for s in (1, 1, 2))
    assert [o.image.image_id for o in a] == [o.image.image_id for o in b] != [o.image.image_id for o in c]
    assert sorted(o.image.image_id for o in a) == sorted(ui_home.pool_ids)


def test_score_against_threshold_and_short_line_labels() -> None:
    assert review_queue.versus_threshold(2.3, 1.0) == "2.3x the threshold"
    assert review_queue.versus_threshold(0.5, -0.25) == "+0.75 from the threshold"
    digest = "469a0253" + "0" * 56
    line = queries.ScoredImage(1, str(Path("/h/images/46") / f"{digest}.png"), "fabric", 8, 8, 1.0, [],
                               np.zeros((2, 2), np.float16), 1)
    assert line.label == "fabric · line · 469a0253"


def test_disagree_offers_where_the_two_terms_part_and_the_pool_keeps_both_terms(ui_home: PreparedHome) -> None:  # noqa: F811
    """The re-ranking stores each image's kNN and classifier terms (classes with annotations have both); the
    ``disagree`` order's "disagree" pick is, each time, the remaining image of its class whose two terms lie
    furthest apart, with a reason that says so."""
    from sqlalchemy import select

    from db.models import Category, Image, PoolScore

    flt = _everything(ui_home)
    with ui_home.sessions()() as session:
        rows = session.execute(select(Category.name, PoolScore.image_id, PoolScore.knn_score, PoolScore.classifier_score)
                               .join(Image, Image.id == PoolScore.image_id).join(Category, Category.id == Image.category_id)
                               .where(PoolScore.version_id == flt.version_id)).all()
        # no home: no similarities, so no near-copy waits at the back and each pick is the gap's alone
        offered = review_queue.offer(session, None, flt, limit=16, strategy="disagree")
    assert rows and all(k is not None and q is not None for _, _, k, q in rows)  # every class was annotated
    gap = {i: abs(k - q) for _, i, k, q in rows}
    assert len(set(gap.values())) > 1  # the terms do part somewhere
    picks = [o for o in offered if o.pick == "disagree"]
    assert {o.image.category for o in picks} == {"fabric", "tiles"}
    for o in picks:
        before = {p.image.image_id for p in offered[:offered.index(o)]}
        left = [i for c, i, _, _ in rows if c == o.image.category and i not in before]
        assert gap[o.image.image_id] == max(gap[i] for i in left)
        assert o.reason.startswith(f"the distance and the defect classifier of {o.image.category} disagree on it")
