"""Metrics: per-class evaluation history over model versions, read against the annotations each version
was trained on, so the walk from the unsupervised model to the semi-supervised one is visible.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app.services.read import ui_queries as queries
from app.services.loop.version_change import change_rows, evaluation_set_changes
from app.ui import context as ui
from app.ui.formats import share_axis

DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "pro")

ui.page("Metrics", "📈")
st.title("Per-class metric history")
home, sessions = ui.open_home()

with sessions() as session:
    all_versions = queries.versions(session)
    metrics = queries.metric_frame(session)
    trained = queries.training_data_frame(session)
if not all_versions:
    st.info(ui.NO_MODEL)
    st.stop()
if metrics.empty:
    st.info("No metrics recorded yet: a training or retrain writes them when it evaluates on held-out images.")
    st.stop()

names = ([m for m in queries.METRIC_NAMES if m in set(metrics["metric"])]
         + sorted(set(metrics["metric"]) - set(queries.METRIC_NAMES)))
categories = sorted(set(metrics["category"]))
with st.sidebar:
    chosen_metrics = st.multiselect("Metrics", names, [m for m in DEFAULT_METRICS if m in names] or names[:1],
                                    key="metrics-names")
    chosen_categories = st.multiselect("Categories", categories, categories, key="metrics-categories")
    axis = st.radio("Horizontal axis", ["model version", "creation time"], key="metrics-axis")

order = [v.name for v in all_versions]  # oldest first
if axis == "model version":
    x = alt.X("version:N", sort=order, title="model version (oldest first)")
else:
    x = alt.X("created:T", title="version created")
# a categorical palette whose neighbours differ in hue (the default gave two classes near-identical blues)
colour = alt.Color("category:N", title="category", scale=alt.Scale(scheme="tableau10"))

shown = metrics[metrics["metric"].isin(chosen_metrics) & metrics["category"].isin(chosen_categories)]
charts = []
for name in chosen_metrics:
    data = shown[shown["metric"] == name]
    # metrics are shares, in percent with the decimals their range needs (a fixed ".1%" once gave nine ticks
    # all reading "98.6%"); the range is padded so that neighbouring ticks differ
    layout = share_axis(data["value"])
    charts.append(alt.Chart(data, title=name, height=180).mark_line(point=True).encode(
        x=x, y=alt.Y("value:Q", title=f"{name} (%)", scale=alt.Scale(domain=list(layout.domain), zero=False),
                     axis=alt.Axis(format=layout.format, tickCount=5)), color=colour,
        tooltip=["version", "category", alt.Tooltip("value:Q", format=".4f"), "created"]))
labels = trained[trained["category"].isin(chosen_categories)]
charts.append(alt.Chart(labels, title="annotations the version was trained on", height=150)
              .mark_line(point=True, strokeDash=[4, 3]).encode(
    x=x, y=alt.Y("annotations:Q", title="annotated images", axis=alt.Axis(format="d", tickMinStep=1)), color=colour,
    tooltip=["version", "category", "defect_masks", "confirmed_normals", "weak_defects", "normal_images"]))
if chosen_metrics and chosen_categories:
    st.altair_chart(alt.vconcat(*charts).resolve_scale(x="shared"), width="stretch")
else:
    st.info("Choose at least one metric and one category in the sidebar.")

moved = evaluation_set_changes(all_versions)
if moved:
    st.caption("The evaluation set changed (annotated images leave it) at: " + "; ".join(moved)
               + ". Across those points a curve compares other images; the table below compares each version "
               "with the one it was trained from on the same images.")

bought = change_rows(all_versions)
if bought:
    st.subheader("What each version bought, on the same images")
    shown_rows = [r for r in bought if r["class"] in chosen_categories]
    st.dataframe(shown_rows, width="stretch", hide_index=True)

version, latest = queries.latest_metrics(metrics)
st.subheader(f"Latest values ({version})")
st.dataframe(100 * latest, width="stretch",  # in percent, as the charts above
             column_config={c: st.column_config.NumberColumn(f"{c} (%)", format="%.1f") for c in latest.columns})

# A toggle rather than an expander: an expander's table is built in the browser even while collapsed, and
# a second data grid was a measurable part of this page's load time.
if st.toggle("All values", key="metrics-all-values"):
    wide = metrics.pivot_table(index=["version", "category"], columns="metric", values="value", aggfunc="first")
    wide = wide.reindex(pd.MultiIndex.from_product([order, categories], names=["version", "category"])).dropna(how="all")
    st.dataframe(wide, width="stretch")
