"""The scoring API's request and response bodies (pydantic): what its OpenAPI schema publishes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Patch(BaseModel):
    box: list[int] = Field(description="x0, y0, x1, y1 in image pixels (x1, y1 exclusive)")
    score: float


class HeatmapRLE(BaseModel):
    format: Literal["labelstudio-brush-rle"] = "labelstudio-brush-rle"
    width: int
    height: int
    rle: list[int] = Field(description="the defect mask (heat map above the version's pixel threshold)")


class ScoreResponse(BaseModel):
    category: str
    score: float
    decision: Literal["OK", "NG"]
    threshold: float
    threshold_source: Literal["calibrated", "override"]
    model_version: str
    sha256: str
    width: int
    height: int
    top_patches: list[Patch]
    heatmap_png: str | None = Field(None, description="base64 8-bit PNG: 0 the class's ordinary level, 255 its threshold or above")
    heatmap_rle: HeatmapRLE | None = None


class ClassInfo(BaseModel):
    threshold: float
    source: str
    false_alarm_target: float | None = Field(None, description="the false-alarm rate it was calibrated for")
    validation_normals: int = Field(0, description="the validation normal images it was calibrated on")
    supported_false_alarm_rate: float | None = Field(
        None, description="the smallest false-alarm rate those normals can check, about 1/(n+1)")
    warning: str | None = Field(None, description="set when the normals are too few for the target, with what to do")


class VersionResponse(BaseModel):
    model_version: str
    classes: dict[str, ClassInfo]


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model_version: str
    queue_depth: int


class ErrorResponse(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in
    ((401, "missing or wrong token"), (404, "unknown class"), (413, "upload over the size or pixel limit"),
     (415, "not an image body"), (422, "bad request or unreadable image"), (503, "queue full: retry after"))
}
