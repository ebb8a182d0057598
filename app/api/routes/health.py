"""GET /v1/health: liveness, the version served, the queue's depth (no token: a load balancer asks)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import StateDep
from app.api.models import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(state: StateDep) -> HealthResponse:
    holder, batcher = state.running()
    return HealthResponse(status="ok", model_version=holder.current.version, queue_depth=batcher.depth)
