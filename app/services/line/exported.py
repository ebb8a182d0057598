"""Run a scorer exported by `dmad export` (TorchScript ``.pt`` or ONNX ``.onnx``) with torch.jit or
onnxruntime alone: this module imports nothing of the project, so it can be copied next to a line's
software as it is.

The file carries its own description (TorchScript: the extra file ``dmad.json``; ONNX: the metadata entry
``dmad``): the model version, its classes in index order, their OK/NG thresholds in force when it was
exported (with where each comes from: "calibrated" or "override") and the input size. The rule is the
project's (``dmad_core.decision.decide``): NG when the score is above the class's threshold.

Example::

    model = ExportedModel.load("v0007.onnx")
    grid, score, heat = model.score(rgb_uint8_hwc, "bottle")
    model.decision(score, "bottle")          # "OK" or "NG"
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

META_NAME = "dmad.json"  # TorchScript extra file
META_KEY = "dmad"  # ONNX metadata entry
FORMAT = "dmad-export/1"


class ExportedModel:
    """An exported scorer and its description."""

    def __init__(self, path: Path, meta: dict[str, Any], run: Any):
        self.path = path
        self.meta = meta
        self._run = run

    @property
    def version(self) -> str:
        return self.meta["model_version"]

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {c: float(t) for c, t in self.meta["thresholds"].items()}

    @property
    def threshold_sources(self) -> dict[str, str]:
        """Where each threshold comes from ("calibrated" or "override"); empty for a file written before
        `dmad export` recorded it."""
        return dict(self.meta.get("threshold_sources") or {})

    def decision(self, score: float, category: str) -> str:
        """OK/NG of an image score by the class's threshold (NG above it; equal is OK, as calibrated)."""
        return "NG" if score > self.thresholds[category] else "OK"

    @staticmethod
    def load(path: str | Path) -> ExportedModel:
        """A ``.onnx`` file through onnxruntime, anything else through torch.jit; ValueError for a file that
        is no `dmad export` output."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            import onnx
            import onnxruntime

            try:
                props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX file
                raise ValueError(f"{path} is no ONNX file ({type(exc).__name__}: {exc})") from exc
            if META_KEY not in props:
                raise ValueError(f"{path} is an ONNX model without the `dmad export` description")
            meta = json.loads(props[META_KEY])
            session = onnxruntime.InferenceSession(str(path), providers=onnxruntime.get_available_providers())

            def run(image: np.ndarray, index: int) -> tuple[np.ndarray, float, np.ndarray]:
                grid, score, heat = session.run(None, {"image": image, "category": np.array(index, dtype=np.int64)})
                return grid, float(score), heat
        else:
            import torch

            extra = {META_NAME: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            except RuntimeError as exc:
                raise ValueError(f"{path} is no TorchScript file ({exc})") from exc
            if not extra[META_NAME]:
                raise ValueError(f"{path} is a TorchScript file without the `dmad export` description")
            meta = json.loads(extra[META_NAME])

            def run(image: np.ndarray, index: int) -> tuple[np.ndarray, float, np.ndarray]:
                with torch.inference_mode():
                    grid, score, heat = module(torch.from_numpy(np.ascontiguousarray(image)), torch.tensor(index))
                return grid.numpy(), float(score), heat.numpy()
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown export format {meta.get('format')!r} (this reader knows {FORMAT})")
        return ExportedModel(path, meta, run)

    def score(self, rgb: np.ndarray, category: str) -> tuple[np.ndarray, float, np.ndarray]:
        """(patch grid, image score, heat map at the input size) of an RGB uint8 (H, W, 3) image."""
        if category not in self.meta["categories"]:
            raise KeyError(f"{self.path.name} has no class {category!r}; it knows {', '.join(self.categories)}")
        return self._run(np.ascontiguousarray(rgb, dtype=np.uint8), self.meta["categories"].index(category))
