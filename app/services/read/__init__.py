"""The read side: what the Streamlit pages (``ui_queries``), `dmad status` (``status``) and the
Prometheus endpoints (``metrics``) show, built on one read model per entity (``read_models``)."""
