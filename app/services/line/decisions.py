"""OK/NG thresholds of a model version, per class: calibrated at training for the home's target
false-alarm rate (``dmad_core.decision``), overridable by an engineer, and what each threshold implies.

Where they live:
- the calibrated ones in the version's config (``DECISION_KEY``: the target rate and one threshold per
  class), written once with the version;
- overrides in ``threshold_overrides``, one row per change, never updated: the newest row of a class is
  in force, the older ones are its history (who, when, why), and a row without a threshold returns the
  class to its calibrated value. A version's folder is never touched.

Versions trained before per-class calibration fall back to their validation scores at the home's rate.
A version that recorded neither has no threshold for a class until an engineer sets one: no decision is
ever made against the model's one global ``image_threshold`` (the highest validation score over every
class, which judges each class by the noisiest one's scale).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.services.read.read_models import VALIDATION_SCORES_KEY
from db.engine import write_transaction
from db.models import Annotation, Category, Image, ModelVersion, PoolScore, ThresholdOverride
from dmad_core.decision import ErrorRates, calibrate_thresholds, error_rates
from dmad_core.errors import Invalid, NotFound

T = TypeVar("T")
DECISION_KEY = "decision"  # in a version's config: {"false_alarm_rate": r, "thresholds": {class: t}}
DEFAULT_FALSE_ALARM_RATE = 0.01


def smallest_checkable_rate(normals: int) -> float:
    """The smallest false-alarm rate ``normals`` validation normals can check: about 1/(n+1) (one false
    alarm among n normals is already 1/n; below 1/(n+1) the calibrated threshold is simply their highest
    score, whatever the target)."""
    return 1.0 / (max(0, int(normals)) + 1)


def normals_needed(false_alarm_rate: float) -> int | None:
    """The validation normals a class needs to check ``false_alarm_rate`` (1/(n+1) <= rate); None for a
    rate of 0, which no number of normals can check."""
    return math.ceil(1.0 / false_alarm_rate - 1.0 - 1e-9) if false_alarm_rate > 0 else None


def rate_warning(category: str, normals: int, false_alarm_rate: float | None) -> str | None:
    """What to say where a class's threshold is shown when its validation normals are too few to support
    the target false-alarm rate, with what to do; None when they suffice (or nothing was calibrated)."""
    if false_alarm_rate is None:
        return None
    smallest = smallest_checkable_rate(normals)
    if false_alarm_rate >= smallest - 1e-12:
        return None
    needed = normals_needed(false_alarm_rate)
    need = "more" if needed is None else f"about {needed}"
    return (f"{category}: {normals} validation normal{'s' if normals != 1 else ''} cannot support a false-alarm "
            f"rate of {100 * false_alarm_rate:.3g} % (the smallest rate they can check is about "
            f"{100 * smallest:.3g} %, 1/(n+1)). Ingest more normal images of {category} and retrain ({need} "
            f"validation normals are needed; they are held out from its normal training images, a share set by "
            f"validation_fraction), or accept "
            f"the rate {normals} normals support: false_alarm_rate {smallest:.3g} or more in the home's settings.json "
            f"(`dmad init --false-alarm-rate`), for the next version.")


def calibrated_decision(validation_scores: dict[str, list[float]], false_alarm_rate: float) -> dict[str, Any]:
    """The record a new version stores under ``DECISION_KEY``: the target rate, the thresholds, the
    validation normals each rests on, and a warning per class whose normals are too few for the rate."""
    counts = {c: len(s) for c, s in validation_scores.items()}
    warnings = {c: rate_warning(c, n, false_alarm_rate) for c, n in counts.items()}
    return {"false_alarm_rate": float(false_alarm_rate),
            "thresholds": calibrate_thresholds(validation_scores, false_alarm_rate),
            "validation_normals": counts,
            "supported_false_alarm_rate": {c: smallest_checkable_rate(n) for c, n in counts.items()},
            "warnings": {c: w for c, w in warnings.items() if w}}


@dataclass(frozen=True)
class ClassThreshold:
    """The threshold in force for one class of a version, and where it comes from."""

    category: str
    threshold: float
    source: Literal["calibrated", "override", "exported"]  # "exported": a `dmad export` file that named none
    calibrated: float | None  # what calibration gave (None: the version recorded no validation scores)
    false_alarm_target: float | None  # the rate the calibrated threshold was chosen for
    validation_normals: int  # how many normals it was calibrated on
    note: str = ""  # the override's note
    set_at: datetime | None = None  # when the override was made

    @property
    def supported_false_alarm_rate(self) -> float | None:
        """The smallest false-alarm rate its validation normals can check (None: not calibrated)."""
        return None if self.false_alarm_target is None else smallest_checkable_rate(self.validation_normals)

    @property
    def warning(self) -> str | None:
        """Said wherever the threshold is shown when its validation normals cannot support its target."""
        return rate_warning(self.category, self.validation_normals, self.false_alarm_target)


def _calibrated(config: dict[str, Any], false_alarm_rate: float) -> dict[str, Any]:
    recorded = config.get(DECISION_KEY)
    if recorded:
        return recorded
    return calibrated_decision(config.get(VALIDATION_SCORES_KEY) or {}, false_alarm_rate)


def class_thresholds(session: Session, version: ModelVersion,
                     false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> dict[str, ClassThreshold]:
    """Every class's threshold in force for ``version`` (``false_alarm_rate`` serves only versions that
    recorded no calibration)."""
    config = dict(version.config or {})
    decision = _calibrated(config, false_alarm_rate)
    calibrated: dict[str, float] = decision.get("thresholds", {})
    counts: dict[str, int] = decision.get("validation_normals", {})
    target = decision.get("false_alarm_rate")
    out: dict[str, ClassThreshold] = {
        category: ClassThreshold(category, float(value), "calibrated", float(value), target,
                                 int(counts.get(category, 0)))
        for category, value in sorted(calibrated.items()) if value is not None}
    for row, category in _newest_overrides(session, version.id):
        base = out.get(category)
        if row.threshold is None:
            continue  # back to the calibrated threshold
        out[category] = ClassThreshold(
            category, float(row.threshold), "override", base.calibrated if base else None,
            base.false_alarm_target if base else None, base.validation_normals if base else 0, row.note, row.created_at)
    return out


def _newest_overrides(session: Session, version_id: int) -> list[tuple[ThresholdOverride, str]]:
    rows = session.execute(
        select(ThresholdOverride, Category.name).join(Category, Category.id == ThresholdOverride.category_id)
        .where(ThresholdOverride.version_id == version_id).order_by(ThresholdOverride.id)).all()
    newest: dict[str, ThresholdOverride] = {}
    for row, category in rows:
        newest[category] = row
    return [(row, category) for category, row in newest.items()]


def threshold_for(thresholds: Mapping[str, T], category: str, version: str) -> T:
    """The class's threshold (a ClassThreshold, or an exported file's number), or NotFound naming the
    classes the version knows."""
    try:
        return thresholds[category]
    except KeyError:
        raise NotFound(f"model {version} has no class {category!r}; it knows "
                       f"{', '.join(sorted(thresholds)) or 'none'}") from None


def set_threshold(session: Session, version: ModelVersion, category: str, threshold: float | None,
                  note: str = "") -> ClassThreshold:
    """Record an engineer's threshold for one class of ``version`` (None: back to the calibrated one);
    returns the threshold now in force. A class the version was trained on but never calibrated (a version
    older than calibration) can be given one here."""
    trained = {c for c, counts in ((version.trained_on or {}).get("categories") or {}).items()
               if counts.get("normal_images")}
    threshold_for({**dict.fromkeys(trained), **class_thresholds(session, version)}, category, version.name)
    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
        raise Invalid(f"a threshold must be a finite number, got {threshold!r}")
    with write_transaction(session):
        category_id = session.scalar(select(Category.id).where(Category.name == category))
        session.add(ThresholdOverride(version_id=version.id, category_id=category_id,
                                      threshold=None if threshold is None else float(threshold), note=note))
    return class_thresholds(session, version)[category]


def threshold_history(session: Session, version: ModelVersion, category: str) -> list[ThresholdOverride]:
    """The overrides of one class of a version, oldest first."""
    return list(session.scalars(
        select(ThresholdOverride).join(Category, Category.id == ThresholdOverride.category_id)
        .where(ThresholdOverride.version_id == version.id, Category.name == category)
        .order_by(ThresholdOverride.id)))


@dataclass(frozen=True)
class ImpliedRates:
    """What a class's threshold implies: on the validation normals it was calibrated on, and on the
    images inspectors annotated (scored by the version; they trained it, so the miss rate is optimistic)."""

    validation: ErrorRates
    annotated: ErrorRates


def implied_rates(session: Session, version: ModelVersion, category: str, threshold: float) -> ImpliedRates:
    """False-alarm and miss rates of ``threshold`` for one class of ``version``."""
    validation = ((version.config or {}).get(VALIDATION_SCORES_KEY) or {}).get(category, [])
    rows = session.execute(
        select(Annotation.kind, PoolScore.score)
        .join(PoolScore, (PoolScore.image_id == Annotation.image_id) & (PoolScore.version_id == version.id))
        .join(Image, Image.id == Annotation.image_id).join(Category, Category.id == Image.category_id)
        .where(Category.name == category, Annotation.deleted_at.is_(None))).all()
    normals = [float(s) for kind, s in rows if kind == "normal"]
    defects = [float(s) for kind, s in rows if kind != "normal"]
    return ImpliedRates(error_rates(threshold, validation, []), error_rates(threshold, normals, defects))


def threshold_warnings(session: Session, version_id: int,
                       false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> list[str]:
    """The warnings of a version's thresholds (``ClassThreshold.warning``), one per class that has one."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise NotFound(f"there is no model version {version_id}")
    return [t.warning for t in class_thresholds(session, version, false_alarm_rate).values() if t.warning]


def thresholds_with_rates(session: Session, version: ModelVersion,
                          false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> list[tuple[ClassThreshold, ImpliedRates]]:
    """Every class's threshold in force with what it implies (`dmad thresholds` and the Training page)."""
    return [(t, implied_rates(session, version, t.category, t.threshold))
            for t in class_thresholds(session, version, false_alarm_rate).values()]
