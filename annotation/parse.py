"""One reading of a Label Studio annotation, shared by the webhook receiver and the sync.

The webhook and the sync must agree exactly on what an annotation means, or a sync after a missed
webhook would store something different from what the webhook would have stored. Both call
:func:`parse_annotation`.

Meaning of an annotation (``kind``):

* verdict ``normal`` -> ``"normal"``. An explicit verdict wins over a brush mask left in the
  annotation, because the model's pre-annotation is copied into new annotations and an inspector who
  clicks "normal" should not have to erase it first.
* otherwise a non-empty brush mask (all brush regions, all labels, united) -> ``"defect_mask"``;
* otherwise verdict ``defect`` -> ``"defect_no_mask"``;
* otherwise (nothing chosen, nothing drawn, or a skipped task) -> ``None``: nothing to store.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from annotation.project import VERDICT_NAME, VERDICTS
from annotation.rle import rle_to_mask

KINDS: tuple[str, ...] = ("defect_mask", "normal", "defect_no_mask")


class PayloadError(ValueError):
    """Bad input from Label Studio (or from whoever posts to the receiver); ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ParsedAnnotation:
    external_id: str  # Label Studio's annotation id, as text
    task_id: int
    image_id: int  # our image id, from the task's data
    kind: str | None  # one of KINDS, or None for an empty annotation
    mask: np.ndarray | None  # bool H x W for "defect_mask", else None
    updated_at: datetime  # timezone-aware


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise PayloadError(f"{what} must be an integer")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        value = int(value)
    if isinstance(value, int) and 0 <= value < 2**63:
        return value
    raise PayloadError(f"{what} must be a non-negative integer")


def parse_time(value: Any, what: str = "annotation.updated_at") -> datetime:
    """ISO 8601 text (as in webhook payloads) or a datetime (as from the SDK); naive means UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str) and len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise PayloadError(f"{what} is not an ISO 8601 time: {value!r}") from exc
    else:
        raise PayloadError(f"{what} must be an ISO 8601 time")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def task_image_id(task: Any) -> int:
    """Our image id from a task (``task.data.image_id``)."""
    if not isinstance(task, dict):
        raise PayloadError("task must be an object")
    data = task.get("data")
    if not isinstance(data, dict):
        raise PayloadError("task.data must be an object")
    if "image_id" not in data:
        raise PayloadError("task.data.image_id is missing (not a task pushed by dmad?)")
    return _int(data["image_id"], "task.data.image_id")


def annotation_id(annotation: Any) -> str:
    if not isinstance(annotation, dict):
        raise PayloadError("annotation must be an object")
    if "id" not in annotation:
        raise PayloadError("annotation.id is missing")
    return str(_int(annotation["id"], "annotation.id"))


def _brush_mask(result: dict[str, Any], image_size: tuple[int, int] | None) -> np.ndarray:
    value = result.get("value")
    if not isinstance(value, dict):
        raise PayloadError("brush result has no value object")
    if value.get("format", "rle") != "rle":
        raise PayloadError(f"brush format {value.get('format')!r} is not supported (only rle)")
    width = _int(result.get("original_width"), "brush original_width")
    height = _int(result.get("original_height"), "brush original_height")
    if not (0 < width <= 100_000 and 0 < height <= 100_000):
        raise PayloadError(f"brush size {width}x{height} is not a plausible image size", 422)
    if image_size is not None and (height, width) != tuple(image_size):
        h, w = image_size
        raise PayloadError(f"mask is {width}x{height} but the image is {w}x{h}", 422)
    rle = value.get("rle")
    if not isinstance(rle, list):
        raise PayloadError("brush value.rle must be a list of integers")
    try:
        return rle_to_mask(rle, height, width)
    except ValueError as exc:
        raise PayloadError(str(exc), 422) from exc


def parse_annotation(
    annotation: dict[str, Any], task: dict[str, Any], image_size: tuple[int, int] | None = None
) -> ParsedAnnotation:
    """Reads one annotation of one task. ``image_size`` is the image's (height, width) when known: every
    brush mask must have exactly that size. Raises :class:`PayloadError` (400 shape, 422 content)."""
    external_id = annotation_id(annotation)
    if not isinstance(task, dict):
        raise PayloadError("task must be an object")
    task_id = _int(task.get("id"), "task.id")
    image_id = task_image_id(task)
    if "updated_at" not in annotation or annotation["updated_at"] is None:
        raise PayloadError("annotation.updated_at is missing")
    updated_at = parse_time(annotation["updated_at"])
    results = annotation.get("result")
    if not isinstance(results, list):
        raise PayloadError("annotation.result must be a list")

    mask: np.ndarray | None = None
    verdict: str | None = None
    for result in results:
        if not isinstance(result, dict):
            raise PayloadError("each annotation result must be an object")
        kind = str(result.get("type", "")).lower()
        if kind == "brushlabels":
            part = _brush_mask(result, image_size)
            if mask is not None and mask.shape != part.shape:
                raise PayloadError("brush regions of one annotation have different sizes", 422)
            mask = part if mask is None else (mask | part)
        elif kind == "choices" and result.get("from_name") == VERDICT_NAME:
            value = result.get("value")
            choices = value.get("choices") if isinstance(value, dict) else None
            if not (isinstance(choices, list) and len(choices) == 1 and choices[0] in VERDICTS):
                raise PayloadError(f"verdict must be one of {list(VERDICTS)}, got {choices!r}", 422)
            verdict = choices[0]
        # other result types (a future config's extra tags) carry nothing we store

    if mask is not None and not mask.any():
        mask = None
    if annotation.get("was_cancelled") is True:
        kind_out, mask = None, None
    elif verdict == "normal":
        kind_out, mask = "normal", None
    elif mask is not None:
        kind_out = "defect_mask"
    elif verdict == "defect":
        kind_out = "defect_no_mask"
    else:
        kind_out = None
    return ParsedAnnotation(external_id=external_id, task_id=task_id, image_id=image_id, kind=kind_out,
                            mask=mask, updated_at=updated_at)
