"""Inspect: one image at full size with its heat map, top patches, annotations and score history across
model versions; or upload a new image and have a worker score it now.

The Review page links here with `?image_id=<id>`.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import streamlit as st

from app.services.read import ui_queries as queries
from app.services.loop.annotations import load_mask
from app.ui import context as ui
from app.ui.formats import number_axis
from app.services import imaging
from app.services.line.inference import Judge, Verdict
from app.ui.uploads import save_upload
from dmad_core.errors import UserError

IMAGE_KEY = "inspect-image-id"
PARAM_KEY = "inspect-param"  # the query parameter last applied to the picker
UPLOAD_JOB_KEY = "inspect-upload-job"
DEFAULT_BOXES = 3  # of the 8 stored top patches: all 8 piled up into a grid over the defect itself

ui.page("Inspect", "🔎")
st.title("Inspect an image")
home, sessions = ui.open_home()

with sessions() as session:
    active = queries.active_version_info(session)
    default_id = queries.top_image_id(session, active.id) if active else None
    categories = queries.category_names(session)
if not categories:
    st.info(ui.NO_DATA)


def image_view() -> None:
    """The picked image, its heat map, patches, annotations and score history."""
    param = st.query_params.get("image_id")
    if param is not None and param != st.session_state.get(PARAM_KEY):
        st.session_state[PARAM_KEY] = param  # a link was followed: it wins over the last pick
        if param.isdigit():
            st.session_state[IMAGE_KEY] = int(param)
    if IMAGE_KEY not in st.session_state and default_id is not None:
        st.session_state[IMAGE_KEY] = default_id
    image_id = st.number_input("Image id", min_value=1, step=1, key=IMAGE_KEY, value=None,
                               placeholder="an image id, e.g. from the Review page")
    if image_id is None:
        st.info("Pick an image by id" + ("." if active else f". {ui.NO_MODEL}"))
        return
    image_id = int(image_id)
    if st.query_params.get("image_id") != str(image_id):
        st.query_params["image_id"] = str(image_id)
        st.session_state[PARAM_KEY] = str(image_id)

    with sessions() as session:
        info = queries.image_info(session, image_id)
        history = queries.score_history(session, image_id)
        annotations = queries.image_annotations(session, image_id)
    if info is None:
        st.warning(f"There is no image {image_id}.")
        return

    scored_by = list(history["version"])
    default_version = active.name if active and active.name in scored_by else (scored_by[-1] if scored_by else None)
    left, right = st.columns([3, 2])
    with right:
        st.markdown(f"**{info.name}** · image {info.id}")
        ground_truth = {None: "unknown", 0: "normal", 1: f"defective ({info.defect_type or 'type unknown'})"}
        st.markdown(f"- category: {info.category}\n- role: {info.role}\n- size: {info.width} x {info.height}\n"
                    f"- ground truth: {ground_truth.get(info.gt_label, 'unknown')}\n- file: `{info.path}`")
        version_name = None
        if scored_by:
            version_name = st.selectbox("Heat map of model version", scored_by,
                                        index=scored_by.index(default_version), key="inspect-version")
        opacity = st.slider("Heat map opacity", 0.0, 1.0, 0.5, 0.05, key="inspect-opacity")
        show_boxes = int(st.number_input("Top patches drawn", 0, 8, DEFAULT_BOXES, key="inspect-boxes",
                                         help="Boxes around the image's highest-scoring patches, best first. "
                                              "More than a few cover the defect they point at."))

    scored = None
    scale = None
    if version_name is not None:
        version_id = int(history.loc[history["version"] == version_name, "version_id"].iloc[0])
        with sessions() as session:
            scored = queries.image_score(session, image_id, version_id)
            scale = queries.score_range(session, version_id)
            rank, pool = queries.score_rank(session, version_id, scored.score) if scored else (0, 0)
            judge = Judge.for_version(session, version_id, home.load_settings().false_alarm_rate)
        if scored is not None:
            right.metric(f"Score ({version_name})", f"{scored.score:.4f}", help=f"rank {rank} of {pool} pool images")
            try:
                show_verdict(judge.verdict(info.category, scored.score), right)
            except UserError as exc:  # a version without a threshold for this class
                right.info(str(exc))
            right.caption(f"Rank {rank} of {pool} pool images under {version_name}.")
    else:
        right.info("No model version has scored this image.")

    with left:
        try:
            rgb = imaging.load_rgb(info.path)
        except OSError as exc:
            st.error(f"Cannot read the image file: {exc}")
            return
        shown = rgb
        if scored is not None and scale is not None:
            shown = imaging.heat_overlay(rgb, scored.patch_map, scale[0], scale[1], opacity)
            if show_boxes and scored.top_patches:
                boxes = [p["box"] for p in scored.top_patches[:show_boxes]]
                shown = imaging.draw_boxes(shown, boxes, labels=[str(i + 1) for i in range(len(boxes))])
        st.image(shown, width="stretch",
                 caption="heat map: dark = ordinary, bright yellow = the pool's most anomalous level")
        if scored is not None and scored.top_patches and show_boxes:
            st.caption("Top patches: " + ", ".join(f"{i + 1}: {p['score']:.3f}"
                                                  for i, p in enumerate(scored.top_patches[:show_boxes])))

    st.subheader("Annotations")
    if not annotations:
        st.markdown("None yet. Send the image to Label Studio from the Review page, or mark it normal there.")
    for annotation in annotations:
        when = annotation.updated_at.strftime("%Y-%m-%d %H:%M UTC")
        st.markdown(f"**{annotation.kind}** from {annotation.source} (annotation {annotation.id}, {when})")
        if annotation.kind == "defect_mask":
            try:
                mask = load_mask(annotation, home)
            except UserError as exc:
                ui.show_error(exc)
                continue
            st.image(imaging.mask_overlay(rgb, mask), width=min(info.width, 480), caption="annotated defect mask")

    st.subheader("Score history")
    if history.empty:
        st.markdown("No version has scored this image yet.")
    else:
        layout = number_axis(history["score"])  # decimals from the range (a flat history showed six)
        chart = alt.Chart(history).mark_line(point=True).encode(
            x=alt.X("version:N", sort=list(history["version"]), title="model version"),
            y=alt.Y("score:Q", title="anomaly score", scale=alt.Scale(domain=list(layout.domain), zero=False),
                    axis=alt.Axis(format=layout.format, tickCount=5)),
            tooltip=["version", "status", "created", alt.Tooltip("score:Q", format=".4f")],
        )
        st.altair_chart(chart, width="stretch")


def upload_form() -> None:
    """Save an uploaded image and queue its scoring; a worker runs the model, not this process."""
    if not categories:
        return
    with st.form("inspect-upload", clear_on_submit=True):
        upload = st.file_uploader("Image", type=["png", "jpg", "jpeg", "bmp", "tif", "tiff"])
        category = st.selectbox("Product class", categories)
        submitted = st.form_submit_button("Score it now")
    if not submitted:
        return
    if upload is None:
        st.warning("Choose an image file first.")
        return
    try:
        path = save_upload(home, upload.name, upload.getvalue())
    except UserError as exc:
        ui.show_error(exc)
        return
    with sessions() as session:
        job = queries.enqueue_score_upload(session, path, category)
    st.session_state[UPLOAD_JOB_KEY] = job.id


def upload_result(job_id: int, was_active: bool) -> None:
    """The scoring job's progress, then its result (the worker stores it with the job's success)."""
    with sessions() as session:
        job = queries.job(session, job_id)
    if job is None:
        st.warning(f"Job #{job_id} no longer exists.")
        return
    if was_active and not job.active:
        st.rerun()  # finished: redraw the page once, which also stops the refresh
    path = job.payload.get("path")
    st.markdown(f"Job #{job.id} ({job.type}) for `{path}`: **{job.status}**")
    if job.status == "queued":
        st.progress(0.0, text="waiting for a worker to pick it up")
    elif job.status == "running":
        st.progress(min(1.0, max(0.0, job.progress)), text=job.message or "running")
    elif job.status in ("failed", "cancelled"):
        st.error(f"{job.message}: {job.error or 'no error recorded'}")
    elif job.result is None or "score" not in job.result:
        st.info("The job finished but stored no result.")
    else:
        show_upload_score(path, job.result)


def show_verdict(verdict: Verdict, where=st) -> None:
    """OK/NG by the class's threshold in force, as `dmad predict`, `dmad serve` and the export decide."""
    text = (f"**{verdict.decision}** under {verdict.version}: the class's threshold is {verdict.threshold:.4f} "
            f"({verdict.threshold_source}); NG above it.")
    (where.warning if verdict.decision == "NG" else where.success)(text)


def show_upload_score(path: str | None, result: dict) -> None:
    """The worker's result: score, OK/NG by the class's threshold, heat map, top patches."""
    score = float(result["score"])
    version = result.get("version", "the active version")
    st.metric(f"Score ({version})", f"{score:.4f}")
    if "decision" in result:
        show_verdict(Verdict(result["decision"], float(result["threshold"]), result["threshold_source"], version))
    try:
        rgb = imaging.load_rgb(str(path))
    except OSError as exc:
        st.warning(f"Cannot read the uploaded image: {exc}")
        return
    shown = rgb
    if result.get("patch_map"):
        grid = np.asarray(result["patch_map"], dtype=np.float32)
        lo, hi = float(grid.min()), float(grid.max())
        if active is not None:
            with sessions() as session:
                lo, hi = queries.score_range(session, active.id) or (lo, hi)
        shown = imaging.heat_overlay(rgb, grid, lo, hi, 0.5)
    boxes = [p["box"] for p in result.get("top_patches", [])[:DEFAULT_BOXES]]
    if boxes:
        shown = imaging.draw_boxes(shown, boxes, labels=[str(i + 1) for i in range(len(boxes))])
    st.image(shown, width=min(rgb.shape[1], 640), caption="uploaded image with its heat map and top patches")


# The upload and its result come first, where the action is taken (below the image view, a result
# landed under another image).
job_id = st.session_state.get(UPLOAD_JOB_KEY)
with st.expander("Upload an image to score it now", expanded=job_id is not None):
    upload_form()
    job_id = st.session_state.get(UPLOAD_JOB_KEY)
    if job_id is not None:
        with sessions() as session:
            current = queries.job(session, job_id)
        running = current is not None and current.active
        st.fragment(run_every=2 if running else None)(upload_result)(job_id, running)
image_view()
