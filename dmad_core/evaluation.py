"""The paper's evaluation protocol as a function (``dmad eval`` is a thin wrapper around it).

One unified model is trained on the normal training images of every category. In the semi-supervised
setting, K defective test images with masks are drawn per category (seeded), used as annotated defects and
removed from evaluation. Categories without masks contribute no seen defects. The kNN baseline (PatchCore:
the normal bank alone, nearest-neighbour distance) is scored in the same run on the same features and bank,
so every figure can be read as a ratio against it.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from dmad_core.config import DMADConfig
from dmad_core.data.readers import CategoryDataset, ImageRecord, list_images, load_image, load_mask, read_category
from dmad_core.data.synthetic import make_outlier_textures
from dmad_core.metrics import METRIC_NAMES, ClassMetrics, compute_class_metrics, mean_metrics
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem, Prediction

log = logging.getLogger(__name__)

EVAL_MAP_SIZE = 256  # pixel metrics are computed at this resolution (masks resized nearest-neighbour)


@dataclass(frozen=True)
class EvalRequest:
    data: list[Path]
    setting: Literal["unsupervised", "semi"] = "unsupervised"
    anomalies_per_class: int = 0
    seed: int = 0
    outliers: Path | None = None
    n_procedural_outliers: int = 120
    methods: tuple[str, ...] = ("dmad", "knn")


@dataclass
class MethodResult:
    method: str
    per_class: dict[str, ClassMetrics]
    predictions: dict[str, list[tuple[ImageRecord, float]]]

    def to_dict(self) -> dict:
        return {"per_class": {c: m.to_dict() for c, m in self.per_class.items()},
                "mean": mean_metrics(self.per_class)}


@dataclass
class EvalResult:
    results: dict[str, MethodResult]
    seconds: dict[str, float]
    config: dict
    annotated: dict[str, list[str]] = field(default_factory=dict)
    # the classifier scorer's chosen weights and its leave-one-out criterion per weight (None: mapper)
    scorer: dict | None = None


def outlier_items(folder: Path | None, n_procedural: int, seed: int, limit: int) -> list[ImageItem]:
    """DTD-like outlier textures from a folder (recursively), else procedural ones."""
    if folder is not None:
        paths = list_images(folder, recursive=True)
        if not paths:
            raise ValueError(f"no images found under --outliers {folder}")
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=min(limit, len(paths)), replace=False))]
        return [ImageItem.from_path(p, "outlier") for p in paths]
    return [ImageItem.from_array(a, "outlier") for a in make_outlier_textures(n_procedural, 256, seed)]


def draw_annotated(ds: CategoryDataset, k: int, seed: int) -> list[ImageRecord]:
    """K defective test images with masks of one category, drawn with a seed (stable across runs)."""
    candidates = [r for r in ds.test if r.label == 1 and r.mask_path is not None]
    if not candidates or k <= 0:
        return []
    rng = np.random.default_rng([seed, sum(map(ord, ds.name))])
    return [candidates[i] for i in sorted(rng.choice(len(candidates), size=min(k, len(candidates)), replace=False))]


def class_metrics(records: list[ImageRecord], preds: list[Prediction], model: DMAD) -> ClassMetrics:
    """Image metrics of one class's predictions, and pixel metrics (on ``model``'s own heat maps, at
    ``EVAL_MAP_SIZE``) when any record has a ground-truth mask.

    Args:
        records: the images with their labels and mask paths, in the order of ``preds``.
        preds: ``model``'s predictions of those images.
        model: the fitted model that made them (its ``anomaly_map`` makes the pixel maps).

    Returns:
        The class's ``ClassMetrics`` (pixel fields None without masks).

    Example:
        >>> m = class_metrics(records, model.predict(items), model)  # doctest: +SKIP
    """
    labels = np.array([r.label for r in records])
    scores = np.array([p.image_score for p in preds])
    masks = maps = None
    if any(r.mask_path is not None for r in records):
        size = (EVAL_MAP_SIZE, EVAL_MAP_SIZE)
        masks = np.stack([load_mask(r.mask_path, size) if r.mask_path else np.zeros(size, bool) for r in records])
        maps = np.stack([model.anomaly_map(p.patch_scores, size) for p in preds])  # grids may differ in shape
    return compute_class_metrics(labels, scores, masks, maps)


def run_evaluation(request: EvalRequest, config: DMADConfig, cache_dir: Path,
                   allow_random_weights: bool = False) -> EvalResult:
    datasets = [read_category(d) for d in request.data]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two --data folders have the same category name: {names}")
    store = FeatureStore(config, cache_dir, allow_random_weights=allow_random_weights)
    normal = [ImageItem.from_path(r.path, ds.name) for ds in datasets for r in ds.train]
    annotated: dict[str, list[ImageRecord]] = {}
    if request.setting == "semi":
        for ds in datasets:
            annotated[ds.name] = draw_annotated(ds, request.anomalies_per_class, request.seed)
    annotations = [DefectAnnotation(ImageItem.from_path(r.path, r.category),
                                    load_mask(mask_path, load_image(r.path).shape[:2]))
                   for recs in annotated.values() for r in recs
                   if (mask_path := r.mask_path) is not None]  # draw_annotated draws images with masks only
    outliers = outlier_items(request.outliers, request.n_procedural_outliers, request.seed,
                             config.bank.outlier_images_max)
    model = DMAD(config, store)
    model.fit(normal, outliers, annotations)
    seconds = {k: round(v, 2) for k, v in model.fitted().timings.items()}

    t0 = time.perf_counter()
    results: dict[str, MethodResult] = {}
    for method in request.methods:
        per_class, predictions = {}, {}
        for ds in datasets:
            held_out = {r.path for r in annotated.get(ds.name, [])}
            records = [r for r in ds.test if r.path not in held_out]
            items = [ImageItem.from_path(r.path, ds.name) for r in records]
            preds = model.predict(items) if method == "dmad" else model.knn_predict(items)
            per_class[ds.name] = class_metrics(records, preds, model)
            predictions[ds.name] = [(r, p.image_score) for r, p in zip(records, preds, strict=True)]
        results[method] = MethodResult(method, per_class, predictions)
    seconds["predict"] = round(time.perf_counter() - t0, 2)
    scorer = None
    if (fitted_scorer := model.fitted().scorer) is not None:
        meta = fitted_scorer.to_state()[0]
        scorer = {"weights": {c: {"image": d["image_weight"], "map": d["map_weight"]}
                              for c, d in meta["classes"].items() if d["intercept"] is not None},
                  "selection": meta["selection"]}
    return EvalResult(results, seconds, config.to_dict(),
                      {c: [str(r.path) for r in recs] for c, recs in annotated.items()}, scorer)


def write_json(result: EvalResult, path: Path, primary: str = "dmad") -> None:
    main = result.results[primary]
    payload = {**main.to_dict(), "method": primary, "seconds": result.seconds, "config": result.config,
               "annotated": result.annotated, "scorer": result.scorer,
               "baselines": {m: r.to_dict() for m, r in result.results.items() if m != primary}}
    path.write_text(json.dumps(payload, indent=2))


def write_scores_csv(result: EvalResult, path: Path, method: str = "dmad") -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["category", "path", "label", "score"])
        for cat, rows in result.results[method].predictions.items():
            for rec, score in rows:
                w.writerow([cat, str(rec.path), rec.label, f"{score:.6f}"])


def _percent_cell(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.1f}"


def format_table(result: EvalResult) -> str:
    """Per-class table like the paper's (percent), one block per method, kNN ratio on the DMAD block."""
    short = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1", "pixel_auroc": "P-AUROC",
             "pixel_ap": "P-AP", "pixel_f1max": "P-F1", "pro": "PRO"}
    lines = []
    for method, res in result.results.items():
        lines.append(f"[{method}]")
        lines.append(f"{'class':<16}" + "".join(f"{short[n]:>9}" for n in METRIC_NAMES))
        rows = {c: m.to_dict() for c, m in res.per_class.items()} | {"mean": mean_metrics(res.per_class)}
        for c, d in rows.items():
            lines.append(f"{c:<16}" + "".join(f"{_percent_cell(d[n]):>9}" for n in METRIC_NAMES))
    if "dmad" in result.results and "knn" in result.results:
        a, b = mean_metrics(result.results["dmad"].per_class), mean_metrics(result.results["knn"].per_class)
        ratios = [f"{short[n]} x{x / y:.3f}" for n in METRIC_NAMES if (x := a[n]) is not None and (y := b[n])]
        lines.append("dmad / knn (mean): " + ", ".join(ratios))
    if result.scorer and result.scorer["weights"]:
        lines.append("classifier weights (leave-one-annotated-image-out), image / map: " + ", ".join(
            f"{c} {w['image']:g} / {w['map']:g}" for c, w in result.scorer["weights"].items()))
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return "\n".join(lines)
