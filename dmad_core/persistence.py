"""The folder a fitted DMAD is saved to, and the only code that reads or writes it.

Layout (format 3)::

    model.json                  config, mapper config, items, thresholds, history, format_version, and the
                                classifier scorer's scales and weights (``scorer``)
    net.pt                      the mapper's state dict (mapper-scored models only)
    classifiers.npz             class -> the defect classifier's coefficients (classifier-scored models)
    normal_bank.* abnormal_bank.*   bank parts (.npz), their faiss index and part list (see banks.py)
    annotated_patches.npz       image hash -> patch indices of its defect (what the seen/weak parts hold)
    annotation_masks.npz        annotation position -> its mask (only annotations with a mask)
    normal_neighbours.npz, outlier_neighbours.npz   the neighbour caches of the training images

Format 1 (before ``annotation_masks.npz``) still loads; its ``annotations_`` come back only when none of
them had a mask, since the masks were not saved. Format 2 is format 3 without the classifier scorer (all
its models were mapper-scored).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dmad_core.banks import MemoryBank
from dmad_core.config import DMADConfig, MapperConfig
from dmad_core.defect_classifier import DefectClassifierScorer
from dmad_core.features import FeatureScaling
from dmad_core.items import DefectAnnotation, ImageItem
from dmad_core.memory import DualMemory
from dmad_core.training import new_net

if TYPE_CHECKING:
    from dmad_core.model import DMAD

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
MODEL_FILE = "model.json"
# Mapper fields that models saved before they existed did not have, with the behaviour those models had.
_LEGACY_MAPPER = {"distance_features": False, "distance_prior": False, "pseudo_requery": False,
                  "correction_bound": 0.0, "pseudo_noise": "isotropic", "attention_key_pool": 1}


def read_model_json(folder: str | Path) -> dict[str, Any]:
    """The saved model's description (``model.json``), after checking that this code can read its format."""
    folder = Path(folder)
    meta = json.loads((folder / MODEL_FILE).read_text())
    if meta.get("format_version") not in READABLE_FORMATS:
        raise ValueError(f"model at {folder} has format {meta.get('format_version')}; this code reads formats "
                         f"{', '.join(map(str, READABLE_FORMATS))}")
    return meta


def saved_config(folder: str | Path) -> DMADConfig:
    """The configuration a saved model was trained with (to build its ``FeatureStore`` before loading)."""
    return DMADConfig.from_dict(read_model_json(folder)["config"])


def _item_dict(it: ImageItem) -> dict[str, Any]:
    return {"category": it.category, "hash": it.hash, "path": str(it.path) if it.path else None}


def _item(d: dict[str, Any]) -> ImageItem:
    return ImageItem(category=d["category"], hash=d["hash"], path=Path(d["path"]) if d["path"] else None)


def save_model(model: DMAD, folder: str | Path) -> None:
    """Writes everything ``load_into`` needs to predict and to retrain: banks, their faiss indexes, the
    trained weights, config, items, annotations with their masks and the neighbour caches."""
    memory, scaling, mapper_config = model.memory_, model.scaling_, model.mapper_config_
    normal_items, validation_items, annotations = model.normal_items_, model.validation_items_, model.annotations_
    if (memory is None or memory.normal_bank_ is None or memory.abnormal_bank_ is None or scaling is None
            or mapper_config is None or normal_items is None or validation_items is None or annotations is None):
        raise RuntimeError("nothing to save: the model is not fitted")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    memory.normal_bank_.save(folder, "normal_bank")
    memory.abnormal_bank_.save(folder, "abnormal_bank")
    scorer_meta = None
    if model.net_ is not None:
        torch.save(model.net_.state_dict(), folder / "net.pt")
    if model.scorer_ is not None:
        scorer_meta, coefficients = model.scorer_.to_state()
        np.savez(folder / "classifiers.npz", **coefficients)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "mapper_config": dataclasses.asdict(mapper_config),
        "categories": model.categories_,
        "normal_items": [_item_dict(it) for it in normal_items],
        "validation_items": [_item_dict(it) for it in validation_items],
        "annotations": [{**_item_dict(a.item), "has_mask": a.mask is not None} for a in annotations],
        "feature_shift": scaling.shift.tolist(),
        "feature_scale": scaling.scale,
        "pixel_threshold": model.pixel_threshold_,
        "image_threshold": model.image_threshold_,
        "validation_scores": model.validation_scores_,
        "mask_peak_shares": model.mask_peak_shares_,
        "history": model.history_,
        "bank_sizes": {"normal": memory.normal_bank_.part_sizes(), "abnormal": memory.abnormal_bank_.part_sizes()},
        "scorer": scorer_meta,
    }
    (folder / MODEL_FILE).write_text(json.dumps(meta, indent=1))
    # numpy's stubs type savez's **kwds as if they could reach allow_pickle (a bool): hence the ignores below
    np.savez(folder / "annotated_patches.npz", **memory.annotated_patches_)  # type: ignore[arg-type]
    np.savez_compressed(folder / "annotation_masks.npz",
                        **{str(i): a.mask for i, a in enumerate(annotations) if a.mask is not None})  # type: ignore[arg-type]
    if memory.normal_nn_cache_:
        np.savez(folder / "normal_neighbours.npz", **memory.normal_nn_cache_)  # type: ignore[arg-type]
    if memory.outlier_nn_cache_:
        np.savez(folder / "outlier_neighbours.npz",
                 **{f"{k}|{part}": v[j] for k, v in memory.outlier_nn_cache_.items() for j, part in enumerate("di")})  # type: ignore[arg-type]


def _annotations(folder: Path, meta: dict[str, Any]) -> list[DefectAnnotation]:
    listed = meta.get("annotations", [])
    if meta["format_version"] == 1:
        if any(d["has_mask"] for d in listed):
            log.warning("model at %s (format 1) did not save annotation masks: annotations_ left empty", folder)
            return []
        return [DefectAnnotation(_item(d), None) for d in listed]
    with np.load(folder / "annotation_masks.npz") as z:
        masks = {name: z[name] for name in z.files}
    return [DefectAnnotation(_item(d), masks[str(i)] if d["has_mask"] else None) for i, d in enumerate(listed)]


def _memory(folder: Path, config: DMADConfig) -> DualMemory:
    memory = DualMemory(config.bank, config.backbone.feature_dim, config.mapper.seed)
    memory.normal_bank_ = MemoryBank.load(folder, "normal_bank", config.bank)
    memory.abnormal_bank_ = MemoryBank.load(folder, "abnormal_bank", config.bank)
    if (folder / "normal_neighbours.npz").exists():
        with np.load(folder / "normal_neighbours.npz") as z:
            memory.normal_nn_cache_ = {k: z[k] for k in z.files}
    if (folder / "outlier_neighbours.npz").exists():
        with np.load(folder / "outlier_neighbours.npz") as z:
            keys = {name.rsplit("|", 1)[0] for name in z.files}
            memory.outlier_nn_cache_ = {k: (z[f"{k}|d"], z[f"{k}|i"]) for k in keys}
    if (folder / "annotated_patches.npz").exists():
        with np.load(folder / "annotated_patches.npz") as z:
            memory.annotated_patches_ = {k: z[k] for k in z.files}
    return memory


def load_into(model: DMAD, folder: str | Path, meta: dict[str, Any]) -> None:
    """Restores the fitted state saved in ``folder`` (``meta``: its ``read_model_json``) into a model built
    with the saved config."""
    folder = Path(folder)
    model.mapper_config_ = MapperConfig(**{**_LEGACY_MAPPER, **meta["mapper_config"]})
    model.categories_ = meta["categories"]
    model.normal_items_ = [_item(d) for d in meta["normal_items"]]
    model.validation_items_ = [_item(d) for d in meta["validation_items"]]
    model.annotations_ = _annotations(folder, meta)
    dim = model.config.backbone.feature_dim
    shift = meta["feature_shift"]  # None in models saved before standardisation existed: identity
    model.scaling_ = FeatureScaling(np.asarray(shift if shift else np.zeros(dim), np.float32), meta["feature_scale"])
    model.pixel_threshold_ = meta["pixel_threshold"]
    model.image_threshold_ = meta["image_threshold"]
    model.validation_scores_ = meta.get("validation_scores")  # absent in models saved before it existed
    model.mask_peak_shares_ = meta.get("mask_peak_shares") or {}  # ... and so is this
    model.history_ = meta.get("history", [])
    model.memory_ = _memory(folder, model.config)
    if meta.get("scorer") is not None:
        with np.load(folder / "classifiers.npz") as z:
            coefficients = {name: z[name] for name in z.files}
        model.scorer_ = DefectClassifierScorer(model.config.classifier, model.config.score.top_k).load_state(
            meta["scorer"], coefficients)
    else:
        net = new_net(dim, model.mapper_config_)
        net.load_state_dict(torch.load(folder / "net.pt", map_location="cpu", weights_only=True))
        model.net_ = net.to(model.device).eval()
