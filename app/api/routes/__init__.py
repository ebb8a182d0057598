"""The scoring API's routes, one module per resource (as the full-stack template's ``api/routes``); the
app factory (``app/api/scoring.py``) includes ``api_router``. A new resource is a module here with its
own ``router``, added to ``api_router``."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.routes import health, score, version

api_router = APIRouter(prefix="/v1")
api_router.include_router(health.router)
api_router.include_router(version.router)
api_router.include_router(score.router)
