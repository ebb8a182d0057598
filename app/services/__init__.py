"""What the product does, called by every edge (the CLI's commands, the Streamlit pages, the HTTP API and
the worker). One sub-package per part of the product, so that the tree shows them:

* ``loop``: from an inspector's annotation to a new active version (annotations, ingest, training, the
  version registry, what a retrain bought, the pool's re-ranking, the Review queue);
* ``line``: judging parts in production (the one scoring contract, prediction, serving, OK/NG thresholds,
  the feed and its spool, export, the serve token);
* ``labelstudio``: the home's Label Studio (server, project, tasks, and the database side of its webhook);
* ``read``: what the UI, `dmad status` and the metrics endpoint read.

Beside them, what every part shares: ``database`` (opening the home's database), ``home_model`` (the
home's engine configuration, feature store and stored versions loaded), ``imaging`` (pure image helpers)
and ``cache_budget`` (the feature cache held to its budget after each job). See docs/architecture.md.
"""
