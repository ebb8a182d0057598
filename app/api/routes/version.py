"""GET /v1/version: the version served and each class's OK/NG threshold, with how many validation normals
it rests on and a warning when they are too few for its false-alarm target."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import LineDep, authorised
from app.api.models import ERRORS, ClassInfo, VersionResponse

router = APIRouter(tags=["version"], dependencies=[Depends(authorised)], responses={401: ERRORS[401]})


@router.get("/version", response_model=VersionResponse)
async def version(line: LineDep) -> VersionResponse:
    return VersionResponse(model_version=line.version, classes={
        c: ClassInfo(threshold=t.threshold, source=t.source, false_alarm_target=t.false_alarm_target,
                     validation_normals=t.validation_normals, supported_false_alarm_rate=t.supported_false_alarm_rate,
                     warning=t.warning)
        for c, t in line.thresholds.items()})
