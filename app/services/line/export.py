"""`dmad export`: a model version's whole scorer as one TorchScript or ONNX file (dmad_core/export.py),
with its description (version, classes, their OK/NG thresholds in force and their sources, input size) inside, written to a
temporary name and renamed, so a half-written export never sits under the asked name.

The file runs with torch.jit or onnxruntime alone (``app/services/line/exported.py``); its scores equal the
Python scorer's (tests/unit/test_export.py).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session, sessionmaker

from app.home_folder import Home
from app.services.loop import versions
from app.services.line.inference import Judge
from app.services.line.exported import FORMAT, META_KEY, META_NAME
from app.services.home_model import load_model
from dmad_core.errors import Invalid

ExportFormat = Literal["onnx", "torchscript"]


@dataclass(frozen=True)
class ExportReport:
    path: Path
    format: ExportFormat
    version: str
    categories: list[str]
    bytes: int


def export_version(home: Home, sessions: sessionmaker[Session], out: str | Path, fmt: ExportFormat,
                   version: str | int | None = None) -> ExportReport:
    """Write ``version`` (default: the active one) to ``out`` as ``fmt``."""
    import torch

    from dmad_core.data.readers import load_image
    from dmad_core.export import ExportedScorer

    out = Path(out)
    if fmt not in ("onnx", "torchscript"):
        raise Invalid(f"unknown export format {fmt!r}: onnx or torchscript")
    with sessions() as session:
        row = versions.version_or_active(session, version)
        judge = Judge.of(session, row, home.load_settings().false_alarm_rate)
        name = row.name
    model = load_model(home, row)
    try:
        module = ExportedScorer.of(model)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    meta = json.dumps({"format": FORMAT, "model_version": name, "categories": module.categories,
                       "thresholds": {c: t.threshold for c, t in judge.thresholds.items()},
                       "threshold_sources": {c: t.source for c, t in judge.thresholds.items()},
                       "input_size": list(module.input_size)})
    item = model.fitted().normal_items[0]  # any training image traces the graph (it is resized inside)
    example = (torch.from_numpy(load_image(item.path) if item.path else item.load()), torch.tensor(0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        if fmt == "torchscript":
            with torch.inference_mode(), warnings.catch_warnings():
                # the tracer's notes on values it fixes (the input size, the classes' table sizes: constant
                # by design) and torch.jit's deprecation notice are not the user's business
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, str(tmp), _extra_files={META_NAME: meta})
        else:
            import onnx

            dims = torch.export.Dim("height", min=8, max=16384), torch.export.Dim("width", min=8, max=16384)
            torch.onnx.export(module, example, str(tmp), input_names=["image", "category"],
                              output_names=["patch_scores", "image_score", "heat_map"],
                              dynamic_shapes=({0: dims[0], 1: dims[1]}, None), verbose=False)
            proto = onnx.load(str(tmp))  # with the weights the exporter may have written beside it
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, meta
            onnx.save(proto, str(tmp), save_as_external_data=False)  # one self-contained file
        os.replace(tmp, out)
    finally:
        for leftover in (tmp, *tmp.parent.glob(f"{tmp.name}.data")):
            leftover.unlink(missing_ok=True)
    return ExportReport(out, fmt, name, module.categories, out.stat().st_size)
