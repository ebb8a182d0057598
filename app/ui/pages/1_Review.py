"""Review: the pool images that most deserve an inspector's minute, a page at a time, to send to Label
Studio or confirm as normal.

The order is `app/services/loop/review_queue.py: offer` (class-balanced rounds of the hottest, the images on
the OK/NG line and the ones unlike anything labelled; or plain hottest first), the same function the
active-learning benchmark measures. Each caption says why the image is offered and its score against the
class's OK/NG threshold. Images are read only for the crops on screen, and crops are cached by image path
and box.
"""

from __future__ import annotations

import streamlit as st

from app.services.loop import review_queue
from app.services.read import ui_queries as queries
from app.ui import context as ui
from app.ui.diversity import crops_for
from dmad_core.errors import UserError

PAGE_SIZE = 30  # crops per page: with 50, drawing the page took Chromium over a second (docs/ui.md)
COLUMNS = 5
PAGE_KEY = "review-page"
ORDERS = {"balanced (why each image is here)": "default", "hottest first": "top"}

ui.page("Review", "🔥")
st.title("Review the most anomalous patches")
home, sessions = ui.open_home()

with sessions() as session:
    categories = queries.category_names(session)
    version = queries.active_version_info(session)
    score_range = queries.score_range(session, version.id) if version else None
    reranking = queries.rerank_progress(session, version.id) if version else None
if not categories:
    st.info(ui.NO_DATA)
    st.stop()
if version is None:
    st.info(ui.NO_MODEL)
    st.stop()
if reranking is not None and not reranking.complete:
    # Never a silent mix: the grid holds this version's scores only, and says how much of the pool they cover.
    st.info(queries.rerank_note(version.name, reranking))
    st.progress(reranking.scored / max(1, reranking.pool))
if score_range is None:
    st.stop()
lo, hi = score_range


def first_page() -> None:
    """A changed filter starts again from the top."""
    st.session_state[PAGE_KEY] = 1


with st.sidebar:
    st.header("Filters")
    chosen = st.multiselect("Categories", categories, key="review-categories", on_change=first_page,
                            placeholder="all categories")
    min_score = lo
    if hi > lo:
        min_score = st.slider("Minimum score", lo, hi, lo, step=(hi - lo) / 100, format="%.3f",
                              key=f"review-min-score-{version.id}", on_change=first_page,
                              help="The model's image score. Default scorer: 0 is a typical normal patch of "
                                   "the class, 1 the 99th percentile of normal patches; each caption also "
                                   "says what share of the class's validation normals score below the image.")
    order = st.selectbox("Order", list(ORDERS), key="review-order", on_change=first_page,
                         help="Balanced: each class in turn, cycling through its hottest image, the image on "
                              "its OK/NG line (where a label changes a decision) and the one unlike anything "
                              "labelled; near-copies of labelled images wait. Hottest first: the model's score "
                              "alone.")
    per_image = int(st.number_input("Crops per image", 1, 5, 1, key="review-per-image", on_change=first_page,
                                    help="Overlapping patches of one image are never both shown: a second crop is a second hot spot."))
    hide_annotated = st.checkbox("Hide images already annotated", True, key="review-hide-annotated",
                                 on_change=first_page)

flt = queries.ReviewFilter(version.id, tuple(chosen), float(min_score) if min_score > lo else None, hide_annotated)

# -- actions on the selection (before the grid, so that acted-on images leave it at once) --------------
prefix = f"select-{version.id}-"
selected = sorted(int(k[len(prefix):]) for k, v in st.session_state.items()
                  if isinstance(k, str) and k.startswith(prefix) and v)


def clear_selection() -> None:
    for image_id in selected:
        st.session_state[f"{prefix}{image_id}"] = False


status = ui.labelstudio_status(str(home.root))
bar = st.columns([3, 2, 2, 4])
send = bar[0].button("Send to Label Studio", disabled=not selected, key="review-send",
                     help="Create a Label Studio task for each selected image, with the heat map as a pre-annotation.")
mark = bar[1].button("Mark normal", disabled=not selected, key="review-mark-normal",
                     help="Confirm the selected images show no defect; a retrain is queued.")
bar[2].button("Clear selection", disabled=not selected, key="review-clear", on_click=clear_selection)
header = bar[3].empty()  # filled after the actions: they clear the selection


def selection_header() -> None:
    count = sum(1 for k, v in st.session_state.items() if isinstance(k, str) and k.startswith(prefix) and v)
    header.caption(f"{count} selected · model {version.name} · Label Studio "
                   + ui.LABEL_STUDIO_BRIEF[status.state])

if send:
    from app.services.labelstudio.tasks import send_images

    try:
        with sessions() as session:
            sent = send_images(session, home, selected)
    except UserError as exc:
        ui.show_error(exc)
    else:
        note = "" if sent.pre_annotation_masks else " (this model records no pixel threshold: no mask pre-annotation)"
        st.success(f"{sent.created} new task(s) in Label Studio project {sent.project_id}, "
                   f"{sent.skipped_existing} already there{note}.")
        st.markdown("\n".join(f"- image {t.image_id}: " + (f"[task {t.task_id}]({t.link})" if t.link else "task not found")
                              for t in sent.tasks))
        clear_selection()

if mark:
    from app.services.loop.annotations import record_annotation

    marked, job_id, errors = 0, None, []
    with sessions() as session:
        for image_id in selected:
            try:
                result = record_annotation(session, home, image=image_id, kind="normal", source="ui")
            except UserError as exc:
                errors.append((image_id, exc))
                continue
            marked += 1
            job_id = result.job_id or job_id
    if marked:
        st.success(f"{marked} image(s) marked normal" + (f"; retrain job #{job_id} is queued." if job_id else "."))
    for image_id, error in errors:
        ui.show_error(error, prefix=f"image {image_id}: ")
    clear_selection()
selection_header()

# -- the grid -----------------------------------------------------------------------------------------
images_per_page = max(1, PAGE_SIZE // per_image)
with sessions() as session:
    total = queries.review_count(session, flt)
pages = max(1, -(-total // images_per_page))
if st.session_state.get(PAGE_KEY, 1) > pages:
    st.session_state[PAGE_KEY] = pages
if total == 0:
    st.info("No pool image matches these filters." + (" Untick 'Hide images already annotated' to see reviewed "
                                                      "ones." if hide_annotated else ""))
    st.stop()
page_number = int(st.number_input(f"Page (of {pages}; {total} images)", 1, pages, key=PAGE_KEY))
with sessions() as session:
    offered = review_queue.offer(session, home, flt, limit=images_per_page,
                                 offset=(page_number - 1) * images_per_page, strategy=ORDERS[order])

cells = [(item, crop) for item in offered
         for crop in crops_for(item.image.image_id, item.image.top_patches, item.image.width, item.image.height,
                               per_image)]
for start in range(0, len(cells), COLUMNS):
    for column, (item, crop) in zip(st.columns(COLUMNS), cells[start:start + COLUMNS]):
        row = item.image
        with column:
            jpeg = ui.crop_jpeg(row.path, crop.box, row.patch_map.tobytes(), tuple(row.patch_map.shape), lo, hi)
            if jpeg is None:
                st.warning(f"cannot read {row.path}")
            else:
                st.image(jpeg, width="stretch")
            st.caption(f"**{item.versus_threshold}** · {item.reason}  \n{row.label} · score {row.score:.3f}"
                       + (f" · patch {crop.patch_score:.3f}" if per_image > 1 else "")
                       + ("" if row.waiting_task is None else " · waiting in Label Studio"
                          + (f" (task {row.waiting_task})" if row.waiting_task else "")))
            if crop.rank == 0:
                st.checkbox(f"select image {row.image_id}", key=f"{prefix}{row.image_id}")
            st.markdown(ui.inspect_link(row.image_id, f"Inspect image {row.image_id}"))
