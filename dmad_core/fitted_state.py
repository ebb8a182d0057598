"""What fitting a DMAD produces (``FittedState``), and the folder it is saved to: the only code that reads or
writes that folder.

Layout (format 3)::

    model.json                  config, mapper config, items, thresholds, history, format_version, and the
                                classifier scorer's scales and weights (``scorer``)
    net.pt                      the mapper's state dict (mapper-scored models only)
    classifiers.npz             class -> the defect classifier's coefficients (classifier-scored models)
    normal_bank.* abnormal_bank.*   bank parts (.npz), their faiss index and part list (see banks.py)
    annotated_patches.npz       image hash -> patch indices of its defect (what the seen/weak parts hold)
    annotation_masks.npz        annotation position -> its mask (only annotations with a mask)
    normal_neighbours.npz, outlier_neighbours.npz   the neighbour caches of the training images

Format 1 (before ``annotation_masks.npz``) still loads; its ``annotations`` come back only when none of
them had a mask, since the masks were not saved. Format 2 is format 3 without the classifier scorer (all
its models were mapper-scored).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmad_core.banks import MemoryBank
from dmad_core.config import DMADConfig, MapperConfig
from dmad_core.defect_classifier import DefectClassifierScorer
from dmad_core.features import FeatureScaling
from dmad_core.items import DefectAnnotation, ImageItem
from dmad_core.memory import DualMemory
from dmad_core.modules import DMADNet
from dmad_core.training import new_net

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
MODEL_FILE = "model.json"
# Mapper fields that models saved before they existed did not have, with the behaviour those models had.
_LEGACY_MAPPER = {"distance_features": False, "distance_prior": False, "pseudo_requery": False,
                  "correction_bound": 0.0, "pseudo_noise": "isotropic", "attention_key_pool": 1}


@dataclass
class FittedState:
    """Everything ``DMAD.fit`` / ``update`` produce and ``DMAD.predict`` needs, declared once: the one owner of
    a model's fitted state, which saves itself to a folder and loads itself from one."""

    memory: DualMemory  # both banks, the annotated patches and the neighbour caches
    scaling: FeatureScaling  # the standardisation of patch features, fitted on the normal training images
    mapper_config: MapperConfig  # the regime trained last (semi-supervised or not)
    categories: list[str]  # the classes of the normal images
    normal_items: list[ImageItem]  # training split (banks + mapper or classifiers)
    validation_items: list[ImageItem]  # validation split: thresholds and the mapper's early stopping
    annotations: list[DefectAnnotation]  # the annotated defects it was trained on (masks where drawn)
    net: DMADNet | None = None  # the mapper (``ScoreConfig.scorer == "mapper"``)
    scorer: DefectClassifierScorer | None = None  # the classifier scorer (the default)
    pixel_threshold: float | None = None  # heat-map value that marks a defect; None without validation images
    pixel_thresholds: dict[str, float] = field(default_factory=dict)  # ... per class (the pooled one: older models)
    image_threshold: float | None = None  # the highest validation image score
    # class -> sorted validation image scores (None: a model saved before they were recorded)
    validation_scores: dict[str, list[float]] | None = None
    mask_peak_shares: dict[str, float] = field(default_factory=dict)  # class -> pre-annotation level, from drawn masks
    mask_grabcut: list[str] = field(default_factory=list)  # classes whose pre-annotations GrabCut refines
    history: list[dict] = field(default_factory=list)  # the mapper's epochs in its last training (none: classifiers)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage of the last fit/update; not saved

    def summary(self) -> dict[str, Any]:
        """The small part of the state that is read without loading the folder's banks (a model version's
        database row copies it, written once from this state, as ``model.json`` is): thresholds, the
        pre-annotation levels, the validation scores and the bank sizes, under ``model.json``'s keys."""
        normal_bank, abnormal_bank = self._banks()
        return {
            **self.mask_levels(), "image_threshold": self.image_threshold,
            "validation_scores": self.validation_scores,
            "bank_sizes": {"normal": normal_bank.part_sizes(), "abnormal": abnormal_bank.part_sizes()},
        }

    def mask_levels(self) -> dict[str, Any]:
        """What proposing a mask reads (``preannotation.proposed_mask``), under ``model.json``'s keys: the
        pixel thresholds (over all classes and per class), the shares of the peak and GrabCut's classes."""
        return {"pixel_threshold": self.pixel_threshold, "pixel_thresholds": self.pixel_thresholds,
                "mask_peak_shares": self.mask_peak_shares, "mask_grabcut": self.mask_grabcut}

    def _banks(self) -> tuple[MemoryBank, MemoryBank]:
        if self.memory.normal_bank_ is None or self.memory.abnormal_bank_ is None:
            raise RuntimeError("the fitted state has no banks: its memory was never built")
        return self.memory.normal_bank_, self.memory.abnormal_bank_

    def save(self, folder: str | Path, config: DMADConfig) -> None:
        """Writes everything ``load`` needs to predict and to retrain (``config``: the model's, into
        ``model.json``): banks, their faiss indexes, the trained weights, items, annotations with their
        masks and the neighbour caches."""
        normal_bank, abnormal_bank = self._banks()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        normal_bank.save(folder, "normal_bank")
        abnormal_bank.save(folder, "abnormal_bank")
        scorer_meta = None
        if self.net is not None:
            torch.save(self.net.state_dict(), folder / "net.pt")
        if self.scorer is not None:
            scorer_meta, coefficients = self.scorer.to_state()
            np.savez(folder / "classifiers.npz", **coefficients)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle's bool
        meta = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "mapper_config": dataclasses.asdict(self.mapper_config),
            "categories": self.categories,
            "normal_items": [_item_dict(it) for it in self.normal_items],
            "validation_items": [_item_dict(it) for it in self.validation_items],
            "annotations": [{**_item_dict(a.item), "has_mask": a.mask is not None} for a in self.annotations],
            "feature_shift": self.scaling.shift.tolist(),
            "feature_scale": self.scaling.scale,
            **self.summary(),  # thresholds, pre-annotation levels, validation scores, bank sizes
            "history": self.history,
            "scorer": scorer_meta,
        }
        (folder / MODEL_FILE).write_text(json.dumps(meta, indent=1))
        memory = self.memory
        # numpy's stubs type savez's **kwds as if they could reach allow_pickle (a bool): hence the ignores below
        np.savez(folder / "annotated_patches.npz", **memory.annotated_patches_)  # type: ignore[arg-type]
        np.savez_compressed(folder / "annotation_masks.npz",
                            **{str(i): a.mask for i, a in enumerate(self.annotations) if a.mask is not None})  # type: ignore[arg-type]
        if memory.normal_nn_cache_:
            np.savez(folder / "normal_neighbours.npz", **memory.normal_nn_cache_)  # type: ignore[arg-type]
        if memory.outlier_nn_cache_:
            np.savez(folder / "outlier_neighbours.npz",
                     **{f"{k}|{part}": v[j] for k, v in memory.outlier_nn_cache_.items() for j, part in enumerate("di")})  # type: ignore[arg-type]

    @staticmethod
    def load(folder: str | Path, config: DMADConfig, device: torch.device) -> FittedState:
        """The state saved in ``folder`` by a model with ``config`` (``saved_config(folder)``), its mapper
        (if any) on ``device``."""
        folder = Path(folder)
        meta = read_model_json(folder)
        mapper_config = MapperConfig(**{**_LEGACY_MAPPER, **meta["mapper_config"]})
        dim = config.backbone.feature_dim
        shift = meta["feature_shift"]  # None in models saved before standardisation existed: identity
        net, scorer = None, None
        if meta.get("scorer") is not None:
            with np.load(folder / "classifiers.npz") as z:
                coefficients = {name: z[name] for name in z.files}
            scorer = DefectClassifierScorer(config.classifier, config.score.top_k).load_state(meta["scorer"],
                                                                                              coefficients)
        else:
            net = new_net(dim, mapper_config)
            net.load_state_dict(torch.load(folder / "net.pt", map_location="cpu", weights_only=True))
            net = net.to(device).eval()
        return FittedState(
            memory=_memory(folder, config),
            scaling=FeatureScaling(np.asarray(shift if shift else np.zeros(dim), np.float32), meta["feature_scale"]),
            mapper_config=mapper_config,
            categories=meta["categories"],
            normal_items=[_item(d) for d in meta["normal_items"]],
            validation_items=[_item(d) for d in meta["validation_items"]],
            annotations=_annotations(folder, meta),
            net=net,
            scorer=scorer,
            pixel_threshold=meta["pixel_threshold"],
            pixel_thresholds=meta.get("pixel_thresholds") or {},  # absent in models saved before 2026-12-07
            image_threshold=meta["image_threshold"],
            validation_scores=meta.get("validation_scores"),  # absent in models saved before it existed
            mask_peak_shares=meta.get("mask_peak_shares") or {},  # ... and so is this
            mask_grabcut=meta.get("mask_grabcut") or [],  # ... and this
            history=meta.get("history", []),
        )


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


def _annotations(folder: Path, meta: dict[str, Any]) -> list[DefectAnnotation]:
    listed = meta.get("annotations", [])
    if meta["format_version"] == 1:
        if any(d["has_mask"] for d in listed):
            log.warning("model at %s (format 1) did not save annotation masks: its annotations are left empty", folder)
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
