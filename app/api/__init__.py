"""HTTP APIs built on FastAPI: `dmad serve`'s scoring service (scoring.py)."""
