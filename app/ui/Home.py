"""Overview: what is in the home, which model is active, what the workers are doing, and what to do next.

Run with `DMAD_HOME=./dmad-home streamlit run app/ui/Home.py`.
"""

from __future__ import annotations

import streamlit as st

from app.services.read import ui_queries as queries
from app.ui import context as ui

ui.page("Home", "🏭")
st.title("DMAD inspection")
home, sessions = ui.open_home()
st.caption(f"Home folder `{home.root}`")

with sessions() as session:
    info = queries.overview(session, home.load_settings().evaluation_max_per_label)

top = st.columns(5)
top[0].metric("Images", info.n_images)
top[1].metric("Annotations", info.n_annotations)
top[2].metric("Model versions", info.n_versions)
top[3].metric("Active model", info.active.name if info.active else "none")
top[4].metric("Jobs waiting / running", f"{info.jobs.get('queued', 0)} / {info.jobs.get('running', 0)}")

st.subheader("Data")
if info.n_images == 0:
    st.info(ui.NO_DATA)
else:
    st.dataframe(info.images, width="stretch")
    st.caption("train_normal: the normal images the model learns from; pool: the images to review; evaluation: "
               "the pool's images with ground truth that no annotation touched, which every version is measured on.")

st.subheader("Model")
if info.active is None:
    st.info(ui.NO_MODEL)
else:
    v = info.active
    activated = v.activated_at.strftime("%Y-%m-%d %H:%M UTC") if v.activated_at else "-"
    st.markdown(f"Active version **{v.name}**, activated {activated}; it has scored **{info.pool_scored}** "
                f"pool images. Trained on: {queries.trained_on_summary(v.trained_on)}.")
    if info.pool_scored == 0:
        st.info(f"{v.name} has not scored the pool yet: the Review page fills as workers re-rank the pool under it.")

st.subheader("Jobs")
if info.jobs:
    st.markdown(" · ".join(f"{status}: **{n}**" for status, n in sorted(info.jobs.items())))
else:
    st.markdown("No jobs yet.")

st.subheader("Label Studio")
status = ui.labelstudio_status(str(home.root))
if status.healthy:
    st.success(f"Label Studio is running at {status.url}.")
elif status.starting:
    st.info(f"Label Studio is starting (pid {status.pid}) at {status.url}: about a minute the first time. "
            "This page shows it running once it answers.")
elif status.running:
    st.warning(f"Label Studio is running (pid {status.pid}) but not answering at {status.url}; "
               f"check {home.logs_dir / 'labelstudio.log'}.")
else:
    st.warning(ui.NO_LABEL_STUDIO)

st.subheader("Pages")
st.page_link("pages/1_Review.py", label="Review the most anomalous patches", icon="🔥")
st.page_link("pages/2_Inspect.py", label="Inspect one image, or upload one to score", icon="🔎")
st.page_link("pages/3_Training.py", label="Jobs, retraining and model versions", icon="⚙️")
st.page_link("pages/4_Metrics.py", label="Per-class metric history", icon="📈")
