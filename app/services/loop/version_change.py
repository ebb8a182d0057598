"""What a retrain bought, class by class, measured on the same images and said in plain words.

A retrain scores its bounded evaluation set twice: with the version it starts from (before the update) and
with the new one. Per class the record says how image AUROC moved on those same images (with a paired
bootstrap interval: a handful of images is a noisy measure), how the heat map's pixel AUROC and PRO moved,
whether the class's scores moved at all, and the classifier weights its annotations earned (0: the class
still scores with the normal-only distance). It is stored in the new version's config under ``CHANGE_KEY``
and shown by the Training page and `dmad status`; `pool_decision_changes` counts the pool images whose
OK/NG differs between a version and its parent once both have scored them.

Each class's evaluation set is fingerprinted (``EVALUATION_SET_KEY``), so the Metrics page can say where a
curve compares other images than the version before it (an annotated image leaves evaluation).

Example::

    change = measure_change(parent.name, evaluation, before, after, model, trained_on)
    for line in change_lines(change):
        print(line)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.services.line.decisions import class_thresholds
from db.models import Category, Image, ModelVersion, PoolScore
from dmad_core.decision import decide
from dmad_core.metrics import paired_auroc_difference
from dmad_core.model import DMAD, Prediction

CHANGE_KEY = "change"  # in a version's config: what it bought against its parent (`measure_change`)
EVALUATION_SET_KEY = "evaluation_set"  # in a version's config: class -> {"images": n, "digest": sha1}
SCORE_TOLERANCE = 1e-6  # relative: below it, a class's scores did not move
ANNOTATION_KINDS = ("defect_masks", "weak_defects", "confirmed_normals")


def evaluation_fingerprint(images: Sequence[Image]) -> dict[str, dict[str, Any]]:
    """class -> {"images": how many, "digest": a digest of their content hashes}: two versions with the same
    digest were measured on the same images."""
    by_class: dict[str, list[str]] = {}
    for img in images:
        by_class.setdefault(img.category.name, []).append(img.content_hash)
    return {c: {"images": len(h), "digest": hashlib.sha1("\n".join(sorted(h)).encode()).hexdigest()[:16]}
            for c, h in sorted(by_class.items())}


def _pair(before: float | None, after: float | None) -> list[float] | None:
    return None if before is None or after is None else [float(before), float(after)]


def measure_change(parent: str, images: Sequence[Image], before: Sequence[Prediction],
                   after: Sequence[Prediction], model: DMAD, trained_on: dict[str, Any],
                   metrics_before: dict[str, dict[str, float | None]],
                   metrics_after: dict[str, dict[str, float | None]]) -> dict[str, Any]:
    """The record of what the new version bought against ``parent``, per class.

    Args:
        parent: the name of the version the retrain started from.
        images: the evaluation images (rows with category, ground-truth label), in prediction order.
        before, after: the parent's and the new version's predictions of ``images``.
        model: the new model (its classifier weights per class, when it has the classifier scorer).
        trained_on: the new version's `trained_on` record (annotation counts per class).
        metrics_before, metrics_after: per-class metrics of ``before`` and ``after`` on ``images``.

    Returns:
        {"parent": name, "classes": {class: {...}}}, JSON-ready (fractions in 0-1).
    """
    weights = _scorer_weights(model)
    state = model.fitted()
    counts = (trained_on or {}).get("categories", {})
    out: dict[str, Any] = {}
    for category in sorted({img.category.name for img in images}):
        rows = [i for i, img in enumerate(images) if img.category.name == category]
        labels = np.array([int(images[i].gt_label) for i in rows])
        b = np.array([before[i].image_score for i in rows], np.float64)
        a = np.array([after[i].image_score for i in rows], np.float64)
        scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
        moved = bool(np.abs(a - b).max(initial=0.0) > SCORE_TOLERANCE * scale
                     or any(not np.allclose(after[i].patch_scores, before[i].patch_scores,
                                            rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE * scale) for i in rows))
        record: dict[str, Any] = {
            "images": len(rows), "defective": int(labels.sum()), "scores_moved": moved,
            "annotations": {k: int(counts.get(category, {}).get(k, 0)) for k in ANNOTATION_KINDS},
            **weights.get(category, {"image_weight": None, "map_weight": None}),
            # the proposed masks' level chosen on the class's drawn masks (None: none drawn), and GrabCut's choice
            "mask_peak_share": state.mask_peak_shares.get(category),
            "mask_grabcut": category in state.mask_grabcut,
        }
        if 0 < labels.sum() < len(labels):
            d = paired_auroc_difference(labels, b, a)
            record["image_auroc"] = [d.before, d.after, d.low, d.high]
        mb, ma = metrics_before.get(category, {}), metrics_after.get(category, {})
        for name in ("pixel_auroc", "pro"):
            record[name] = _pair(mb.get(name), ma.get(name))
        out[category] = record
    return {"parent": parent, "classes": out}


def _scorer_weights(model: DMAD) -> dict[str, dict[str, float]]:
    """class -> the classifier scorer's image and heat-map weights (none with the mapper scorer)."""
    scorer = model.fitted().scorer
    classes = (scorer.classes_ if scorer is not None else None) or {}
    return {c: {"image_weight": float(s.image_weight), "map_weight": float(s.map_weight)}
            for c, s in classes.items()}


def _points(pair: Sequence[float]) -> str:
    return f"{100 * pair[0]:.1f} % -> {100 * pair[1]:.1f} %"


def _masks_text(record: dict[str, Any]) -> str:
    """What the drawn masks set for the class's proposed masks (empty where it has none)."""
    share = record.get("mask_peak_share")
    if share is None:
        return ""
    refined = ", refined by the image's colours (GrabCut)" if record.get("mask_grabcut") else ""
    return f"its proposed masks are cut at {100 * share:.0f} % of each image's peak{refined}, fitted to its drawn masks"


def class_change_text(category: str, record: dict[str, Any]) -> str:
    """One class's change in an engineer's words."""
    counts = record.get("annotations", {})
    masks, weak, normals = (counts.get(k, 0) for k in ANNOTATION_KINDS)
    defects = masks + weak
    masks_said = _masks_text(record)
    if not record.get("scores_moved"):
        if defects == 0 and normals == 0:
            return f"{category}: no annotations of its own; its scores did not change."
        said = ", ".join(s for s in (f"{defects} defect annotation{'s' * (defects != 1)}" if defects else "",
                                     f"{normals} confirmed normal{'s' * (normals != 1)}" if normals else "") if s)
        return (f"{category}: {said}; not yet enough to change its scores, the model keeps the normal-only "
                f"distance" + (f"; {masks_said}." if masks_said else "."))
    parts = [f"{category}: scores moved"]
    auroc = record.get("image_auroc")
    if auroc:
        delta, low, high = 100 * (auroc[1] - auroc[0]), 100 * auroc[2], 100 * auroc[3]
        parts.append(f"image AUROC {_points(auroc)} ({delta:+.1f} points, 90 % interval {low:+.1f} to "
                     f"{high:+.1f}) on the same {record['images']} images")
    for name, label in (("pixel_auroc", "pixel AUROC"), ("pro", "PRO")):
        if record.get(name):
            parts.append(f"{label} {_points(record[name])}")
    if record.get("image_weight") is not None:
        parts.append(f"weight of the annotations: {record['image_weight']:g} (image), {record['map_weight']:g} "
                     f"(heat map)")
    if masks_said:
        parts.append(masks_said)
    return "; ".join(parts) + "."


def change_lines(change: dict[str, Any] | None) -> list[str]:
    """Every class's change (empty for a version trained from scratch)."""
    if not change:
        return []
    return [class_change_text(c, r) for c, r in sorted(change.get("classes", {}).items())]


@dataclass(frozen=True)
class DecisionChanges:
    """Pool images whose OK/NG differs between a version and its parent, among those both scored."""

    changed: int
    compared: int
    to_ng: int  # OK under the parent, NG now
    by_class: dict[str, int]


def pool_decision_changes(session: Session, version: ModelVersion) -> DecisionChanges | None:
    """OK/NG flips between ``version`` and its parent on the pool images both have scored, each judged by
    its own version's thresholds (overrides included). None without a parent, or when the parent's pool
    scores are no longer kept."""
    if version.parent_id is None:
        return None
    parent = session.get(ModelVersion, version.parent_id)
    if parent is None:
        return None
    new_t = {c: t.threshold for c, t in class_thresholds(session, version).items()}
    old_t = {c: t.threshold for c, t in class_thresholds(session, parent).items()}
    old = aliased(PoolScore)
    rows = session.execute(
        select(Category.name, PoolScore.score, old.score)
        .join(old, (old.image_id == PoolScore.image_id) & (old.version_id == parent.id))
        .join(Image, Image.id == PoolScore.image_id).join(Category, Category.id == Image.category_id)
        .where(PoolScore.version_id == version.id)).all()
    if not rows:
        return None
    changed, to_ng, by_class = 0, 0, {}
    for name, new, previous in rows:
        if name not in new_t or name not in old_t:
            continue
        now, was = decide(new, new_t[name]), decide(previous, old_t[name])
        if now != was:
            changed += 1
            to_ng += int(now == "NG")
            by_class[name] = by_class.get(name, 0) + 1
    return DecisionChanges(changed, len(rows), to_ng, by_class)


def change_report(session: Session, version_id: int) -> dict[str, Any] | None:
    """What a version bought against its parent, for `dmad status` and the Training page: the stored record,
    its lines in words, and the pool images whose OK/NG it changed. None for a version trained from scratch."""
    version = session.get(ModelVersion, version_id)
    change = (version.config or {}).get(CHANGE_KEY) if version is not None else None
    if not change:
        return None
    flips = pool_decision_changes(session, version)
    return {**change, "lines": change_lines(change), "pool_decisions": None if flips is None else asdict(flips)}


def pool_decisions_text(flips: dict[str, Any] | None) -> str | None:
    """The pool's OK/NG changes in words (None when the two versions share no scored pool image)."""
    if not flips:
        return None
    by_class = ", ".join(f"{c} {n:,}" for c, n in sorted(flips["by_class"].items()))
    return (f"{flips['changed']:,} of {flips['compared']:,} pool images scored by both versions changed OK/NG "
            f"({flips['to_ng']:,} to NG)" + (f": {by_class}" if by_class else ""))


def evaluation_set_changes(versions: Sequence[Any]) -> list[str]:
    """Where a class's evaluation set differs from the version before it (oldest first), in words: across
    those points a metric's curve compares other images (an annotated image leaves evaluation)."""
    out, last = [], {}
    for v in versions:
        for category, now in sorted(((v.config or {}).get(EVALUATION_SET_KEY) or {}).items()):
            before = last.get(category)
            if before is not None and before["digest"] != now["digest"]:
                out.append(f"{category} at {v.name}: {before['images']} -> {now['images']} images")
            last[category] = now
    return out


def change_rows(versions: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per version and class that was measured against its parent on the same images."""
    rows = []
    for v in versions:
        change = (v.config or {}).get(CHANGE_KEY)
        for category, r in sorted(((change or {}).get("classes") or {}).items()):
            auroc = r.get("image_auroc")
            rows.append({
                "version": v.name, "against": change["parent"], "class": category, "images": r["images"],
                "image AUROC before (%)": None if not auroc else round(100 * auroc[0], 1),
                "after (%)": None if not auroc else round(100 * auroc[1], 1),
                "change (points)": None if not auroc else round(100 * (auroc[1] - auroc[0]), 1),
                "90 % interval": None if not auroc else f"{100 * auroc[2]:+.1f} to {100 * auroc[3]:+.1f}",
                "pixel AUROC change": None if not r.get("pixel_auroc") else
                round(100 * (r["pixel_auroc"][1] - r["pixel_auroc"][0]), 1),
                "scores moved": "yes" if r.get("scores_moved") else "no",
            })
    return rows
