"""POST /v1/score?category=C[&heatmap=png|rle]: one image, as the raw body (Content-Type image/* or
application/octet-stream) or as multipart field ``file`` (``category`` may then be a form field too), scored
by the version in force through the scoring contract (``app/services/line/inference.py``).

Uploads are bounded before they are read whole (bytes) and before they are decoded (pixels): 413. A request
never names a path: the image store's file names come from content hashes."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any, Literal

import numpy as np
import PIL.Image
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from app.api.deps import LineDep, StateDep, authorised
from app.api.errors import UnsupportedBody
from app.api.models import ERRORS, HeatmapRLE, Patch, ScoreResponse
from app.services.line.inference import Inferencer, LineImage, LineResult
from app.services.line.prediction import LineModel
from dmad_core.errors import Invalid, TooLarge

router = APIRouter(tags=["score"], dependencies=[Depends(authorised)])

_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}, "category": {"type": "string"}}}},
        },
    }
}


def heatmap_png(line: Inferencer, result: LineResult) -> str:
    """The heat map as a base64 8-bit PNG, 0 at the class's ordinary level, 255 at its threshold or above
    (``Inferencer.heat_scale``: a version saved before validation scores were recorded starts at 0)."""
    lo, hi = line.heat_scale(result)
    gray = np.clip((line.heatmap(result) - lo) / (hi - lo), 0, 1) * 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(gray.astype(np.uint8), "L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_rle(line: LineModel, result: LineResult, pixels: np.ndarray) -> HeatmapRLE:
    """The proposed defect mask, the one Label Studio's pre-annotation shows (``heatmap_mask``; ``pixels``:
    the image, for a class whose drawn masks chose GrabCut)."""
    from annotation.rle import mask_to_rle
    from dmad_core.preannotation import proposed_mask

    mask = proposed_mask(line.model.fitted().mask_levels(), result.patch_map, result.height, result.width,
                         result.category, line.model.config, lambda: pixels)
    if mask is None:  # the model records no pixel threshold
        mask = np.zeros((result.height, result.width), dtype=bool)
    return HeatmapRLE(width=result.width, height=result.height, rle=mask_to_rle(mask))


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: never read whole first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the upload is {int(declared)} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the upload is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _image_and_category(request: Request, category: str | None, limit: int) -> tuple[bytes, str]:
    body = await _read_limited(request, limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        except Exception as exc:  # malformed multipart
            raise Invalid(f"malformed multipart body: {exc}") from exc
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Invalid("the multipart body has no file field named 'file'")
        data = await upload.read()
        field = form.get("category")
        category = category or (field if isinstance(field, str) else None)
        await form.close()
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        data = body
    else:
        raise UnsupportedBody(f"send the image as the body (Content-Type image/png, image/jpeg or "
                              f"application/octet-stream) or as multipart field 'file', not {content_type or 'no type'!r}")
    if not category:
        raise Invalid("say which product class the image is: ?category=NAME")
    return data, category


@router.post("/score", response_model=ScoreResponse, openapi_extra=_BODY_SCHEMA,
             responses={s: ERRORS[s] for s in (401, 404, 413, 415, 422, 503)})
async def score(request: Request, state: StateDep, line: LineDep,
                category: str | None = Query(None, min_length=1, max_length=200, description="the product class"),
                heatmap: Literal["none", "png", "rle"] = Query("none", description="add the heat map")) -> ScoreResponse:
    config = state.config
    data, category = await _image_and_category(request, category, config.max_upload_bytes)
    line.check_category(category)
    image = await run_in_threadpool(LineImage.from_bytes, data, category, "upload", config.max_pixels, config.feed)
    result: LineResult = await asyncio.wrap_future(state.running()[1].submit(line, image))
    request.app.state.metrics.decisions.labels(result.category, result.decision).inc()
    response = ScoreResponse(
        category=result.category, score=result.score, decision=result.decision, threshold=result.threshold,
        threshold_source=result.threshold_source, model_version=result.version, sha256=result.content_hash,
        width=result.width, height=result.height, top_patches=[Patch(**p) for p in result.top_patches])
    if heatmap == "png":
        response.heatmap_png = await run_in_threadpool(heatmap_png, line, result)
    elif heatmap == "rle":
        response.heatmap_rle = await run_in_threadpool(heatmap_rle, line, result, image.array)
    return response
