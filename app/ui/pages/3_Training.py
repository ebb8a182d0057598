"""Training: the job queue with live progress, a retrain on demand, the model versions with promote and
roll back, and the active version's OK/NG threshold per class (with the error rates each implies, and an
engineer's override).

The page never trains: it queues jobs that the workers run. The job queue is a fragment that polls the
database by itself, every 2 s while any job is waiting or running and every 5 s when idle, so a job queued
elsewhere (a Label Studio annotation through the webhook, `dmad annotate`, another inspector) shows up
without a Refresh. The whole page is redrawn only when the queue turns busy (to poll faster) or idle
again (new versions), not on every poll.
"""

from __future__ import annotations

import streamlit as st

from app.services.line import decisions
from app.services.read import ui_queries as queries
from app.services.loop import versions as version_service
from app.services.loop.version_change import change_report, pool_decisions_text
from app.ui import context as ui
from dmad_core.errors import UserError

REFRESH_SECONDS = 2  # the queue's poll while a job is waiting or running
IDLE_REFRESH_SECONDS = 5  # ... and while nothing is: new jobs appear within this
JOB_LIMIT = 50

ui.page("Training", "⚙️")
st.title("Jobs, retraining and model versions")
home, sessions = ui.open_home()

FLASH_KEY = "training-flash"  # (kind, text) set by a button's callback, shown by the next run


def retrain_now() -> None:
    with sessions() as session:
        job = queries.enqueue_retrain(session)
    st.session_state[FLASH_KEY] = ("success", f"Retrain job #{job.id} is queued; a worker will pick it up.")


def promote_chosen() -> None:
    name = st.session_state.get("training-promote-version")
    try:
        with sessions() as session:
            version = version_service.get_version(session, name)
            now_active = version_service.promote(session, version.id, home.load_settings().rerank_chunk_images)
    except UserError as exc:
        st.session_state[FLASH_KEY] = (ui.error_level(exc), str(exc))
        return
    st.session_state[FLASH_KEY] = ("success", f"{now_active.name} is now the active version.")


def roll_back() -> None:
    try:
        with sessions() as session:
            now_active = version_service.rollback(session, home.load_settings().rerank_chunk_images)
    except UserError as exc:
        st.session_state[FLASH_KEY] = (ui.error_level(exc), str(exc))
        return
    st.session_state[FLASH_KEY] = ("success", f"Rolled back: {now_active.name} is the active version again.")


flash = st.session_state.pop(FLASH_KEY, None)
if flash is not None:
    getattr(st, flash[0])(flash[1])  # "success", or the level of the error (ui.error_level)

left, right, _ = st.columns([1, 1, 4])
left.button("Retrain now", key="training-retrain", type="primary", on_click=retrain_now,
            help="Queue a retrain on every annotation so far (joins a retrain already waiting).")
right.button("Refresh", key="training-refresh")


def refresh_seconds(busy: bool) -> int:
    """How often the job queue polls: always, faster while jobs are waiting or running."""
    return REFRESH_SECONDS if busy else IDLE_REFRESH_SECONDS


def job_queue(was_active: bool) -> None:
    """The newest jobs: a progress bar for each waiting or running one, a table for the rest. Rerun by
    its own timer; `was_active` is what the last full run of the page saw."""
    with sessions() as session:
        jobs = queries.jobs(session, JOB_LIMIT, routine_syncs=False)
        syncs = queries.sync_summary(session)
        busy = queries.any_active_job(session)  # the page's own test: no redraw loop over a job beyond the limit
        current = queries.active_version_info(session)
        reranking = queries.rerank_progress(session, current.id) if current else None
    active = [j for j in jobs if j.active]
    if busy != was_active:
        # a job was queued from elsewhere (poll faster now), or all are done (new versions): redraw the
        # whole page once, which also sets the poll interval for the new state
        st.rerun()
    if reranking is not None and not reranking.complete:
        st.progress(reranking.scored / max(1, reranking.pool),
                    text=f"re-ranking the pool under {current.name} · {reranking.scored:,} of {reranking.pool:,} "
                         f"images · {reranking.chunks_open} chunks open" + (f" · {reranking.chunks_failed} failed"
                                                                            if reranking.chunks_failed else ""))
    if not jobs:
        st.info("No jobs yet. Annotations queue a retrain by themselves; 'Retrain now' queues one at once.")
        return
    for job in active:
        text = f"#{job.id} {job.type} · {job.status}"
        if job.status == "queued":
            text += " · waiting for a worker"
        elif job.message:
            text += f" · {job.message}"
        if job.attempts > 1:
            text += f" · attempt {job.attempts} of {job.max_attempts}"
        st.progress(min(1.0, max(0.0, job.progress)), text=text)
    finished = [j for j in jobs if not j.active]
    if finished:
        st.dataframe(
            [{"job": j.id, "type": j.type, "status": j.status, "finished": j.finished_at, "message": j.message,
              "error": j.error or ""} for j in finished],
            width="stretch", hide_index=True,
            column_config={"finished": st.column_config.DatetimeColumn("finished", format="YYYY-MM-DD HH:mm:ss"),
                           "message": st.column_config.TextColumn("message", width="large")})
    if syncs.last is not None:
        st.caption(f"Label Studio sync: {syncs.runs} run(s) succeeded, the last at "
                   f"{(syncs.last.finished_at or syncs.last.created_at):%Y-%m-%d %H:%M:%S}" + (f" ({syncs.last.message})" if syncs.last.message else "")
                   + ". Failed syncs are listed above.")


st.subheader("Job queue")
with sessions() as session:
    busy = queries.any_active_job(session)
st.fragment(run_every=refresh_seconds(busy))(job_queue)(busy)

st.subheader("Model versions")
with sessions() as session:
    all_versions = queries.versions(session)
    table = queries.versions_frame(session)
if not all_versions:
    st.info(ui.NO_MODEL)
    st.stop()
st.dataframe(table, width="stretch", hide_index=True)

current_version = next((v for v in all_versions if v.status == "active"), None)
if current_version is not None:
    with sessions() as session:
        bought = change_report(session, current_version.id)
    if bought:
        st.markdown(f"**What {current_version.name} bought** against {bought['parent']}, on the same evaluation "
                    "images (90 % intervals: a few images are a noisy measure):")
        st.markdown("\n".join(f"- {line}" for line in bought["lines"]))
        flips = pool_decisions_text(bought.get("pool_decisions"))
        if flips:
            st.caption(flips + ".")

promotable = [v.name for v in reversed(all_versions) if v.status not in ("active", "failed")]
if st.session_state.get("training-promote-version") not in promotable:
    # A choice left by an earlier run (the version just promoted, or None while nothing was promotable)
    # would show the placeholder although versions can be promoted now: start from the first again.
    st.session_state.pop("training-promote-version", None)
col_promote, col_button, col_rollback = st.columns([2, 1, 1], vertical_alignment="bottom")
col_promote.selectbox("Version to make active", promotable, key="training-promote-version",
                      placeholder="no other version to promote", disabled=not promotable)
col_button.button("Promote", key="training-promote", disabled=not promotable, on_click=promote_chosen)
col_rollback.button("Roll back", key="training-rollback", on_click=roll_back,
                    help="Return to the version that was active before the current one.")


st.subheader("OK/NG thresholds of the active version")
active = next((v for v in all_versions if v.status == "active"), None)
if active is None:
    st.info("No active version: promote one to see its thresholds.")
    st.stop()
with sessions() as session:
    limits = queries.thresholds_frame(session, active.id, home.load_settings().false_alarm_rate)
st.caption(f"An image is NG when its score is above its class's threshold. Calibrated: the lowest score at which at "
           f"most {100 * home.load_settings().false_alarm_rate:.0f} % of the class's validation normals are NG. "
           "The rates on annotated images are optimistic: those images trained the version.")
# short headers (the long ones pushed the table past the page's right edge); each says the rest as help.
# A rate without images to measure it on is "–", not "None".
st.dataframe(limits, width="stretch", hide_index=True, placeholder="–", column_config={
    "threshold": st.column_config.NumberColumn("threshold", format="%.4f"),
    "calibrated": st.column_config.NumberColumn("calibrated", format="%.4f",
                                                help="–: the class has no validation normals to calibrate on"),
    "false alarms, validation normals (%)": st.column_config.NumberColumn(
        "false alarms (val.)", format="%.1f %%", help="share of the class's validation normals called NG"),
    "validation normals": st.column_config.NumberColumn("val. normals", format="%d"),
    "false alarms, confirmed normals (%)": st.column_config.NumberColumn(
        "false alarms (confirmed)", format="%.1f %%",
        help="share of the images inspectors confirmed normal called NG; –: none confirmed yet"),
    "misses, annotated defects (%)": st.column_config.NumberColumn(
        "misses (annotated)", format="%.1f %%",
        help="share of the annotated defects called OK; –: none annotated yet"),
    "annotated defects": st.column_config.NumberColumn("defects", format="%d"),
    "note": st.column_config.TextColumn("note", width="medium")})
with sessions() as session:
    for warning in decisions.threshold_warnings(session, active.id, home.load_settings().false_alarm_rate):
        st.warning(warning)
if not limits.empty:
    left, middle, right = st.columns([1, 1, 2], vertical_alignment="bottom")
    category = left.selectbox("Class", list(limits["class"]), key="threshold-class")
    current = float(limits.set_index("class").loc[category, "threshold"])
    value = middle.number_input("Threshold", value=current, format="%.4f", key=f"threshold-value-{category}")
    note = right.text_input("Why (kept with the change)", key="threshold-note")
    set_col, reset_col, _ = st.columns([1, 1, 3])
    for column, label, new in ((set_col, "Set threshold", value), (reset_col, "Back to calibrated", None)):
        if column.button(label, key=f"threshold-{'set' if new is not None else 'reset'}"):
            try:
                with sessions() as session:
                    queries.set_threshold(session, active.id, category, new, note)
            except UserError as exc:
                ui.show_error(exc)
            else:
                st.session_state[FLASH_KEY] = ("success", f"{category}: threshold of {active.name} "
                                               + (f"set to {new:.4f}." if new is not None else "back to the calibrated one."))
                st.rerun()
