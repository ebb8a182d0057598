"""HTTP APIs built on FastAPI: `dmad serve`'s scoring service (the factory in scoring.py; routes/, deps.py,
models.py, errors.py, config.py)."""
