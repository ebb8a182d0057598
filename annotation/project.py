"""The Label Studio project of a home: labelling config, webhook, and tasks with the model's pre-annotation.

How images reach Label Studio: through our own image endpoint, ``GET /images/<content_hash>`` on the
webhook service (see :mod:`annotation.webhook`), not through Label Studio's local-files serving. Why:

* Our images live in several places (dataset folders such as ``../shared/data``, ``<home>/uploads``),
  so there is no single document root short of ``/``; Label Studio fixes its document root when the
  server starts, and additionally needs a Local Storage connection per project whose path prefixes each
  file's folder before it serves anything.
* A content hash cannot name a path, so the endpoint cannot be talked into serving anything but images
  the database knows (no path-traversal surface at all), and nothing is copied into Label Studio.
* The receiver must run while inspectors label anyway (it receives their annotations).

One project per home: its id is kept in ``<home>/labelstudio/dmad_state.json``; when that file is lost
the project is found again by title.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from xml.sax.saxutils import quoteattr

import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from annotation.rle import brush_result
from dmad_core.errors import Invalid

DEFAULT_TITLE = "DMAD inspection"
DEFAULT_LABELS: tuple[str, ...] = ("defect",)
IMAGE_NAME = "image"  # <Image name=...>: the `to_name` of every result
BRUSH_NAME = "defect"  # <BrushLabels name=...>
VERDICT_NAME = "verdict"  # <Choices name=...>
VERDICTS: tuple[str, ...] = ("normal", "defect")
WEBHOOK_ACTIONS: tuple[str, ...] = (
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
)
SECRET_HEADER = "X-DMAD-Secret"
STATE_FILE = "dmad_state.json"
_CONTENT_HASH = re.compile(r"^[0-9a-f]{8,128}$")
_IMPORT_BATCH = 200
SCORE_DECIMALS = 3  # the anomaly score as an inspector reads it (the database keeps it exact)


def label_config(defect_labels: Sequence[str] = DEFAULT_LABELS) -> str:
    """The labelling interface: a brush per defect type and a normal/defect verdict, above the image.

    Our ids are shown as text (one Header with ``$field`` templates: a bare ``$field`` would hand a number
    to a string-only tag) so an inspector can quote them when talking to an engineer; the content hash
    stays in the task's data (it finds the task again) but not in the header, where its 64 hex digits said
    nothing to an inspector. The labels and the verdict come before the image: below it, they sat under
    the fold of a 1400 x 1000 window.
    """
    labels = [str(label).strip() for label in defect_labels]
    if not labels or any(not label for label in labels) or len(set(labels)) != len(labels):
        raise Invalid(f"defect labels must be distinct non-empty names, got {list(defect_labels)}")
    label_tags = "\n".join(f"    <Label value={quoteattr(label)}/>" for label in labels)
    choice_tags = "\n".join(f"    <Choice value={quoteattr(v)}/>" for v in VERDICTS)
    return (
        "<View>\n"
        '  <Header size="5" value="image $image_id · $category · score $score · model $model_version"/>\n'
        f'  <BrushLabels name="{BRUSH_NAME}" toName="{IMAGE_NAME}">\n{label_tags}\n  </BrushLabels>\n'
        f'  <Choices name="{VERDICT_NAME}" toName="{IMAGE_NAME}" choice="single" showInline="true">\n'
        f"{choice_tags}\n  </Choices>\n"
        f'  <Image name="{IMAGE_NAME}" value="$image" zoom="true" zoomControl="true"/>\n'
        "</View>"
    )


# -- project --------------------------------------------------------------------------------------
def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def ensure_project(
    client: LabelStudio,
    title: str = DEFAULT_TITLE,
    defect_labels: Sequence[str] = DEFAULT_LABELS,
    *,
    state_path: Path | None = None,
) -> int:
    """The id of this home's project, created if needed; its labelling config is brought up to date.

    ``state_path`` (normally ``home.labelstudio_dir / "dmad_state.json"``) remembers the id and title;
    without it, or when it names a project that is gone or has another title, the project is found by
    exact title.
    """
    config = label_config(defect_labels)
    state = read_state(state_path) if state_path else {}
    project = None
    if isinstance(state.get("project_id"), int) and state.get("title") == title:
        try:
            project = client.projects.get(state["project_id"])
        except ApiError as exc:
            if exc.status_code != 404:
                raise
    if project is None:
        project = next((p for p in client.projects.list(title=title) if p.title == title), None)
    if project is None:
        project_id = int(client.projects.create(title=title, label_config=config).id)
    else:
        project_id = int(project.id)
        current = getattr(project, "label_config", None)
        if current is None:
            current = client.projects.get(project_id).label_config
        if current != config:
            try:
                client.projects.update(project_id, label_config=config)
            except ApiError as exc:
                raise Invalid(
                    f"Label Studio refused the new labelling config of project {project_id} "
                    f"(defect labels {list(defect_labels)}): {exc.body}"
                ) from exc
    if state_path is not None and (state.get("project_id"), state.get("title")) != (project_id, title):
        _write_state(state_path, {**state, "project_id": project_id, "title": title})
    return project_id


def ensure_webhook(client: LabelStudio, project_id: int, url: str, secret: str) -> int:
    """The id of the project's webhook to ``url``, created or brought up to date (actions, secret).

    Idempotent: a second call never adds a second webhook for the same URL.
    """
    wanted = {"headers": {SECRET_HEADER: secret}, "actions": list(WEBHOOK_ACTIONS), "send_payload": True,
              "send_for_all_actions": False, "is_active": True}
    for hook in client.webhooks.list(project=str(project_id)):
        if hook.project != project_id or hook.url != url:
            continue
        same = (hook.headers == wanted["headers"] and sorted(hook.actions or []) == sorted(WEBHOOK_ACTIONS)
                and hook.send_payload and not hook.send_for_all_actions and hook.is_active)
        if not same:
            client.webhooks.update(hook.id, url=url, **wanted)
        return int(hook.id)
    return int(client.webhooks.create(url=url, project=project_id, **wanted).id)


# -- tasks ----------------------------------------------------------------------------------------
def image_url_for(base_url: str, content_hash: str) -> str:
    """The URL at which the webhook service serves the image with this content hash."""
    if not _CONTENT_HASH.match(content_hash):
        raise ValueError(f"not a content hash (lowercase hex): {content_hash!r}")
    return f"{base_url.rstrip('/')}/images/{content_hash}"


@dataclass(frozen=True)
class TaskItem:
    """One image to be labelled, with the model's view of it."""

    image_id: int
    content_hash: str
    category: str
    image_url: str
    width: int
    height: int
    score: float
    model_version: str
    heatmap_mask: np.ndarray | None = None  # thresholded heat map, bool H x W, at the image's size
    # Label Studio's prediction score (0-1, shown as a percentage): the share of the class's validation
    # normals scoring below this image. None: the prediction carries no score (the raw anomaly score is
    # unbounded and read as a percentage it misleads: "475.91%").
    normal_percentile: float | None = None


@dataclass(frozen=True)
class PushResult:
    created: int
    skipped_existing: int


TASK_PAGE_SIZE = 100


def iter_tasks(client: LabelStudio, project_id: int, fields: str = "task_only") -> Iterator[Any]:
    """Every task of the project, page by page, stopping at the total Label Studio reports.

    Written here because the SDK's pager asks for the page after the last one whenever the last had tasks,
    which Label Studio answers with a 404 and a Django traceback in its log: once a minute with the
    worker's sync (label-studio-sdk issues #148/#149 describe the same for the older client)."""
    page, seen = 1, 0
    while True:
        pager = client.tasks.list(project=project_id, fields=fields, page=page, page_size=TASK_PAGE_SIZE)
        items = list(pager.items or [])
        yield from items
        seen += len(items)
        total = getattr(pager.response, "total", None)
        if not items or total is None or seen >= total:
            return
        page += 1


def existing_content_hashes(client: LabelStudio, project_id: int) -> set[str]:
    """Content hashes of the project's tasks (what makes a push idempotent)."""
    hashes: set[str] = set()
    for task in iter_tasks(client, project_id):
        value = (task.data or {}).get("content_hash")
        if isinstance(value, str):
            hashes.add(value)
    return hashes


def task_payload(item: TaskItem, label: str = DEFAULT_LABELS[0]) -> dict[str, Any]:
    """A task for Label Studio's import: our ids as data, the heat map as a prediction."""
    result: list[dict[str, Any]] = []
    if item.heatmap_mask is not None:
        mask = np.asarray(item.heatmap_mask)
        if mask.dtype.kind not in "bui":
            raise ValueError(f"heat map of image {item.image_id} must be thresholded (bool), got {mask.dtype}")
        if mask.any():
            result.append(brush_result(mask.astype(bool), BRUSH_NAME, IMAGE_NAME, label,
                                       height=item.height, width=item.width))
    return {
        "data": {
            "image": item.image_url,
            "image_id": int(item.image_id),
            "content_hash": item.content_hash,
            "category": item.category,
            "score": round(float(item.score), SCORE_DECIMALS),
            "normal_percentile": None if item.normal_percentile is None else round(item.normal_percentile, 4),
            "model_version": item.model_version,
        },
        "predictions": [{"model_version": item.model_version, "result": result}
                        | ({} if item.normal_percentile is None else {"score": round(item.normal_percentile, 4)})],
    }


def replace_prediction(client: LabelStudio, task_id: int, item: TaskItem, label: str = DEFAULT_LABELS[0]) -> int:
    """Give an existing task ``item``'s proposal (a newer version's): the task's data (score, version) is
    updated, the new prediction created, then every older prediction of the task deleted, so the inspector
    who opens it sees the newest version's mask and score and never an older one. Returns the new
    prediction's id."""
    payload = task_payload(item, label)
    client.tasks.update(str(task_id), data=payload["data"])
    prediction = payload["predictions"][0]
    created = client.predictions.create(task=int(task_id), result=prediction["result"],
                                        model_version=prediction["model_version"],
                                        **({"score": prediction["score"]} if "score" in prediction else {}))
    for old in client.predictions.list(task=int(task_id)):
        if old.id != created.id:
            client.predictions.delete(old.id)
    return int(created.id)


def push_tasks(
    client: LabelStudio, project_id: int, items: Sequence[TaskItem], *, label: str = DEFAULT_LABELS[0]
) -> PushResult:
    """Creates a task with a prediction for each item whose image is not in the project yet.

    ``label`` is the defect label given to the pre-annotated mask (one of the project's labels).
    All payloads are built (and so checked) before anything is sent.
    """
    seen = existing_content_hashes(client, project_id)
    payloads: list[dict[str, Any]] = []
    skipped = 0
    for item in items:
        if item.content_hash in seen:
            skipped += 1
            continue
        seen.add(item.content_hash)
        payloads.append(task_payload(item, label))
    for start in range(0, len(payloads), _IMPORT_BATCH):
        client.projects.import_tasks(project_id, request=payloads[start:start + _IMPORT_BATCH])
    return PushResult(created=len(payloads), skipped_existing=skipped)
