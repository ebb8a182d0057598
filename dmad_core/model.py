"""DMAD as an estimator: ``fit`` (unsupervised or semi-supervised), ``update`` (warm-started retrain after
new annotations), ``predict``, ``anomaly_map``, ``save`` / ``load``.

Example (offline backbone, synthetic data)::

    store = FeatureStore(DMADConfig.preset("offline"), cache_dir=tmp / "features")
    model = DMAD(DMADConfig.preset("offline"), store)
    model.fit(normal_items, outlier_items)
    preds = model.predict(test_items)        # patch grid and image score per image
    heat = model.anomaly_map(preds[0].patch_scores, (h, w))  # pixel map with the model's own smoothing
    model.update([DefectAnnotation(item, mask)])  # seen + centre parts rebuilt, mapper warm-started

The parts: ``DualMemory`` (memory.py: both banks and their searches), ``MapperTrainer`` (training.py:
batches, pseudo-anomalies, validation, early stopping), ``FittedState`` (fitted_state.py: what fitting
produces, and the saved folder), ``FeatureStore`` / ``FeatureScaling`` (features.py) and the values in items.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dmad_core import fitted_state
from dmad_core.config import DMADConfig, MapperConfig
from dmad_core.defect_classifier import DefectClassifierScorer
from dmad_core.devices import pick_device
from dmad_core.features import FeatureScaling, FeatureStore
from dmad_core.fitted_state import FittedState
from dmad_core.items import DefectAnnotation, ImageItem, Prediction, Progress, no_progress, top_k_mean
from dmad_core.memory import DualMemory
from dmad_core.modules import DMADNet, anomaly_maps
from dmad_core.preannotation import choose_grabcut, choose_peak_share, patch_area, pixel_threshold_for
from dmad_core.progress_bar import make_bar
from dmad_core.training import MapperTrainer, TrainSet, split_validation, validation_patches

__all__ = ["DMAD", "anomaly_map", "FORMAT_VERSION", "DefectAnnotation", "FeatureStore", "FittedState", "ImageItem",
           "Prediction", "Progress", "no_progress", "top_k_mean"]

FORMAT_VERSION = fitted_state.FORMAT_VERSION


def anomaly_map(patch_scores: np.ndarray, size: tuple[int, int] | None, config: DMADConfig) -> np.ndarray:
    """The pixel heat map of a patch grid (gh, gw), or of a stack of them (n, gh, gw), at ``size`` (H, W;
    None: the input size) as the model with ``config`` makes it: upsampled to its input size, smoothed with
    its sigma, resized. ``DMAD.anomaly_map`` is this with the model's own config; callers that hold only a
    stored version's config (pre-annotations, UI) use it directly so every heat map is the same one."""
    grids = np.asarray(patch_scores, np.float32)
    maps = anomaly_maps(grids.reshape(-1, *grids.shape[-2:]), size, config.score.gaussian_sigma, config.backbone.stride)
    return maps if grids.ndim == 3 else maps[0]


def _pixels(item: ImageItem, shape: tuple[int, int]) -> np.ndarray | None:
    """An annotated image's pixels at its mask's ``shape``; None where the file is gone or unreadable
    (a model loaded elsewhere): the mask's level is then chosen without them."""
    img = item.try_load()
    return img if img is not None and img.shape[:2] == tuple(shape) else None


class DMAD:
    """The unified dual-memory-bank model for all categories at once."""

    def __init__(self, config: DMADConfig, features: FeatureStore):
        if config.score.scorer == "mapper" and config.backbone.geometry != "square":
            raise ValueError("the mapper scorer needs square geometry (its attention batches whole images of one "
                             "grid): use BackboneConfig(geometry='square') (`dmad eval --geometry square`) or the classifier scorer")
        self.config = config
        self.features = features
        self.device = pick_device(config.device)
        self.state_: FittedState | None = None  # what fit() / update() produce; None until fit() or load()

    def fitted(self) -> FittedState:
        """The fitted state, for code that needs a fitted model: a clear error where there is none yet."""
        if self.state_ is None:
            raise RuntimeError("the model is not fitted: call fit() or DMAD.load()")
        return self.state_

    def fit(self, normal: Sequence[ImageItem], outliers: Sequence[ImageItem],
            annotations: Sequence[DefectAnnotation] = (), progress: Progress = no_progress) -> DMAD:
        """Builds both banks from scratch and trains the mapper (semi-supervised when annotations exist)."""
        if not normal:
            raise ValueError("no normal training images: DMAD needs at least a few normal images per category")
        cfg, t0, timings = self.config, time.perf_counter(), {}
        train_items, val_items = split_validation(normal, cfg.mapper.validation_fraction, cfg.mapper.seed)
        n_all = len(normal) + len(outliers) + len(annotations)
        scaling = FeatureScaling.fit(self.features.get(
            train_items, lambda f, m: progress(0.3 * f * len(normal) / n_all, m), desc="features: normal"),
            cfg.backbone.feature_dim)
        feats = scaling.apply(self.features.get(train_items))
        self.features.get(val_items, desc="features: validation")
        # the outlier part of the abnormal bank (pseudo-anomalies) only serves the mapper
        outliers = outliers[: cfg.bank.outlier_images_max] if self.uses_mapper else []
        out_feats = scaling.apply(self.features.get(outliers, desc="features: outliers"))
        ann_feats = scaling.apply(self.features.get([a.item for a in annotations], desc="features: annotated"))
        timings["features"] = time.perf_counter() - t0
        progress(0.3, "building the normal bank (coreset)")
        t0 = time.perf_counter()
        memory = DualMemory(cfg.bank, cfg.backbone.feature_dim, cfg.mapper.seed)
        memory.build(train_items, feats, out_feats, lambda f, m: progress(0.3 + 0.1 * f, m))
        memory.set_annotations(annotations, ann_feats, net_scores=None)  # no scorer yet: weak = kNN distance
        timings["banks"] = time.perf_counter() - t0
        mc, t0 = self._mapper_config(annotations), time.perf_counter()
        net: DMADNet | None = None
        scorer: DefectClassifierScorer | None = None
        history: list[dict] = []
        if self.uses_mapper:
            net, history = self._train(memory, scaling, None, mc, train_items, val_items, annotations, ann_feats,
                                       mc.epochs, lambda f, m: progress(0.4 + 0.55 * f, m), patience=0)
        else:
            progress(0.4, "fitting the defect classifiers")
            scorer = self._fit_scorer(memory, scaling, train_items, val_items, annotations, ann_feats)
        timings["train"] = time.perf_counter() - t0
        state = self.state_ = FittedState(
            memory=memory, scaling=scaling, mapper_config=mc, categories=sorted({it.category for it in normal}),
            normal_items=train_items, validation_items=val_items, annotations=list(annotations), net=net,
            scorer=scorer, history=history, timings=timings)
        self._calibrate(state, annotations)
        progress(1.0, "trained")
        return self

    def update(self, annotations: Sequence[DefectAnnotation], confirmed_normals: Sequence[ImageItem] = (),
               epochs: int | None = None, progress: Progress = no_progress) -> DMAD:
        """Retrain after annotations changed: the seen, weak and centre parts of the abnormal bank are
        rebuilt from cached features, confirmed normals extend the normal bank (greedy coreset continued
        from the current bank) and the training set, and the mapper is warm-started.

        ``annotations`` is the complete current set (not a delta), so deletions are honoured.
        """
        state = self.fitted()
        memory, scaling, t0, timings = state.memory, state.scaling, time.perf_counter(), {}
        ann_feats = scaling.apply(self.features.get([a.item for a in annotations], desc="features: annotated"))
        known = {it.hash for it in state.normal_items}
        new_normals = [it for it in confirmed_normals if it.hash not in known]
        if new_normals:
            progress(0.05, f"adding {len(new_normals)} confirmed normal images to the normal bank")
            memory.extend_normal(new_normals, self.patch_features(new_normals, "features: confirmed normal"),
                                 lambda f, m: progress(0.05 + 0.05 * f, m))
            state.normal_items = state.normal_items + new_normals
            state.categories = sorted(set(state.categories) | {it.category for it in new_normals})
        timings["features"], t0 = time.perf_counter() - t0, time.perf_counter()
        memory.set_annotations(annotations, ann_feats, self._net_scores)  # weak: the current model's top patches
        state.annotations = list(annotations)
        timings["banks"], t0 = time.perf_counter() - t0, time.perf_counter()
        mc = self._mapper_config(annotations)
        history: list[dict] = []
        if self.uses_mapper:
            # A changed regime (first annotated defect: distance-only knowledge and the semi-supervised loss
            # weights, or back) starts a fresh mapper. Measured on tire + bottle with 10 masks: warm-starting
            # the unsupervised mapper gives tire pixel AUROC 0.70-0.74 (it never leaves the unsupervised
            # optimum's basin), a fresh mapper 0.96 after 6 epochs, as good as 48 from scratch.
            warm = state.net if mc == state.mapper_config else None
            state.net, history = self._train(memory, scaling, warm, mc, state.normal_items, state.validation_items,
                                             annotations, ann_feats, epochs or self.config.mapper.retrain_epochs(),
                                             lambda f, m: progress(0.1 + 0.85 * f, m),
                                             self.config.mapper.retrain_patience)
        else:
            progress(0.2, "fitting the defect classifiers")
            state.scorer = self._fit_scorer(memory, scaling, state.normal_items, state.validation_items, annotations,
                                            ann_feats)
        timings["train"] = time.perf_counter() - t0
        state.mapper_config, state.history, state.timings = mc, history, timings
        self._calibrate(state, annotations)
        progress(1.0, "retrained")
        return self

    def predict(self, items: Sequence[ImageItem], batch_size: int = 16, progress: Progress = no_progress,
                progress_bar: bool = True, cache_features: bool = True) -> list[Prediction]:
        """Patch score grid and image score of each item (``cache_features=False``: new features are not
        written to the feature cache)."""
        preds: list[Prediction] = []
        bar = make_bar(total=len(items), desc="predict", unit="img", enabled=progress_bar)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            scored = self._score_features(self.patch_features(chunk, store=cache_features, bar=progress_bar), [it.category for it in chunk])
            for it, (grid, image_score, knn_score, classifier_score) in zip(chunk, scored, strict=True):
                preds.append(Prediction(it, grid.astype(np.float32), image_score, knn_score, classifier_score))
            bar.update(len(chunk))
            progress(len(preds) / len(items), f"scored {len(preds)}/{len(items)}")
        bar.close()
        return preds

    def knn_predict(self, items: Sequence[ImageItem], batch_size: int = 16, cache_features: bool = True) -> list[Prediction]:
        """The PatchCore baseline on the same features and normal bank: patch score = distance to the
        nearest normal patch, image score = the largest patch score."""
        memory = self.fitted().memory
        preds = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for it, f in zip(chunk, self.patch_features(chunk, store=cache_features, bar=False), strict=True):
                grid = memory.normal_distances(f, it.category).reshape(f.shape[:2])
                preds.append(Prediction(it, grid, float(grid.max())))
        return preds

    def anomaly_map(self, patch_scores: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """The pixel heat map of a patch grid (gh, gw), or of a stack of them (n, gh, gw), at ``size`` (H, W;
        default the model's input size), smoothed with the model's own sigma: every heat map (thresholds,
        metrics, pre-annotations, UI) is this one."""
        return anomaly_map(patch_scores, size, self.config)

    def patch_features(self, items: Sequence[ImageItem], desc: str = "features", store: bool = True,
                       bar: bool = True) -> list[np.ndarray]:
        """Standardised float32 patch features (gh, gw, C) of images, from the feature cache."""
        return self.fitted().scaling.apply(self.features.get(items, desc=desc, store=store, bar=bar))

    def save(self, folder: str | Path) -> None:
        """The fitted state and the config into ``folder`` (fitted_state.py describes its layout)."""
        self.fitted().save(folder, self.config)

    @staticmethod
    def load(folder: str | Path, features: FeatureStore) -> DMAD:
        """The model saved in ``folder``, with the config it was trained with (``features`` must be built for
        it: ``fitted_state.saved_config``)."""
        model = DMAD(fitted_state.saved_config(folder), features)
        model.state_ = FittedState.load(folder, model.config, model.device)
        return model

    # ------------------------------------------------------------------------------------- the steps
    def _mapper_config(self, annotations: Sequence[DefectAnnotation]) -> MapperConfig:
        """Unsupervised weights without annotated defects; the paper's semi-supervised ones with them."""
        return MapperConfig.semi_supervised(self.config.mapper) if annotations else self.config.mapper

    def _train(self, memory: DualMemory, scaling: FeatureScaling, net: DMADNet | None, mc: MapperConfig,
               train_items: Sequence[ImageItem], val_items: Sequence[ImageItem],
               annotations: Sequence[DefectAnnotation], ann_feats: list[np.ndarray], epochs: int,
               progress: Progress, patience: int) -> tuple[DMADNet, list[dict]]:
        progress(0.0, "nearest neighbours of training patches")
        val_feats = scaling.apply(self.features.get(val_items, desc="features: validation"))

        def at_start(fraction: float, message: str) -> None:  # the mapper's epochs own the fraction
            progress(0.0, message)

        normal = TrainSet.of(memory, train_items, scaling.apply(self.features.get(train_items, desc="features: normal")),
                             exclude=True, progress=at_start, desc="nearest neighbours: normal")
        val = TrainSet.of(memory, val_items, val_feats, exclude=False, patches=validation_patches(val_feats, mc),
                          progress=at_start, desc="nearest neighbours: validation")
        ann = TrainSet.of(memory, [a.item for a in annotations], ann_feats, exclude=True,
                          patches=[memory.annotated_patches_[a.item.hash] for a in annotations],
                          progress=at_start, desc="nearest neighbours: annotated")
        return MapperTrainer(mc, memory, self.device).train(net, normal, val, ann, epochs, progress, patience)

    def _calibrate(self, state: FittedState, annotations: Sequence[DefectAnnotation]) -> None:
        """What a fit or an update ends with, once its scorer is in ``state``: the thresholds from the validation
        normals and the pre-annotation levels from the drawn masks."""
        (state.pixel_threshold, state.pixel_thresholds, state.image_threshold,
         state.validation_scores) = self._thresholds(state.validation_items)
        state.mask_peak_shares, state.mask_grabcut = self._mask_levels(annotations)

    def _thresholds(self, validation: Sequence[ImageItem]
                    ) -> tuple[float | None, dict[str, float], float | None, dict[str, list[float]]]:
        """From validation normal images only: the pixel threshold for heat-map masks (a quantile of their
        pixel scores) over all classes and per class, the image threshold (their highest image score) and
        their sorted image scores per class (``normal_percentile`` reads a score against them).

        Why per class: each class's map weight puts its heat maps on its own scale once it has annotations
        (measured at K = 10: commutator's maps rose so far that the pooled quantile lay above every pixel of
        bottle's and tire's maps, and their proposed masks were empty)."""
        if not validation:
            return None, {}, None, {}
        preds = self.predict(validation, progress_bar=False)
        scores: dict[str, list[float]] = {}
        maps: dict[str, list[np.ndarray]] = {}
        for p in preds:
            scores.setdefault(p.item.category, []).append(float(p.image_score))
            maps.setdefault(p.item.category, []).append(self.anomaly_map(p.patch_scores).ravel())  # grids may differ
        q = self.config.score.pixel_threshold_quantile
        return (float(np.quantile(np.concatenate([m for ms in maps.values() for m in ms]), q)),
                {c: float(np.quantile(np.concatenate(ms), q)) for c, ms in maps.items()},
                float(max(p.image_score for p in preds)), {c: sorted(v) for c, v in scores.items()})

    def _mask_levels(self, annotations: Sequence[DefectAnnotation]) -> tuple[dict[str, float], list[str]]:
        """Per class with drawn masks, the pre-annotation level that fits them best
        (``preannotation.choose_peak_share``), and the classes whose masks GrabCut fits better
        (``preannotation.choose_grabcut``): inspectors' masks, never test images. Each annotated image is
        judged by its held-out map (the classifier fitted without it) where the leave-one-out made one:
        the final classifier was trained on its patches, so its own map fits its mask better than an unseen
        defect's map would."""
        masked = [(a, a.mask) for a in annotations if a.mask is not None]
        state = self.fitted()
        if not masked or state.pixel_threshold is None:
            return {}, []
        scorer = state.scorer
        held_out = dict((scorer.held_out_maps_ if scorer is not None else None) or {})
        unseen = [a.item for a, _ in masked if a.item.hash not in held_out]  # no held-out map: its own
        held_out.update((p.item.hash, p.patch_scores) for p in self.predict(unseen, progress_bar=False))
        grids = [held_out[a.item.hash] for a, _ in masked]
        shares, grabcut = {}, []
        for category in sorted({a.item.category for a, _ in masked}):
            rows = [(a, mask, g) for (a, mask), g in zip(masked, grids, strict=True) if a.item.category == category]
            heats = [self.anomaly_map(g, mask.shape) for _, mask, g in rows]
            areas = [patch_area(g.shape, mask.shape) for _, mask, g in rows]
            truths = [mask for _, mask, _ in rows]
            threshold = pixel_threshold_for(state.pixel_thresholds, state.pixel_threshold, category)  # as proposed_mask
            assert threshold is not None  # the pooled threshold exists (checked above)
            shares[category] = choose_peak_share(heats, truths, threshold, areas)
            images = [img for a, mask, _ in rows if (img := _pixels(a.item, mask.shape)) is not None]
            if len(images) == len(rows) and choose_grabcut(images, heats, truths, threshold, areas, shares[category]):
                grabcut.append(category)
        return shares, grabcut

    def _net_scores(self, feat: np.ndarray, category: str) -> np.ndarray:
        return self._score_features([feat], [category])[0][0].reshape(-1)

    @property
    def is_fitted(self) -> bool:
        """Whether the model can predict: its memory and its scorer (mapper or classifiers) exist."""
        return self.state_ is not None and (self.state_.net is not None or self.state_.scorer is not None)

    @property
    def uses_mapper(self) -> bool:
        """Whether this model scores with the paper's mapper (else with the classifier scorer)."""
        return self.config.score.scorer == "mapper"

    def _fit_scorer(self, memory: DualMemory, scaling: FeatureScaling, train_items: Sequence[ImageItem],
                    val_items: Sequence[ImageItem], annotations: Sequence[DefectAnnotation],
                    ann_feats: list[np.ndarray]) -> DefectClassifierScorer:
        return DefectClassifierScorer(self.config.classifier, self.config.score.top_k).fit(
            memory, train_items, lambda items: scaling.apply(self.features.get(items)), val_items, annotations,
            ann_feats)

    @torch.no_grad()
    def _score_features(self, feats: Sequence[np.ndarray], categories: Sequence[str]
                        ) -> list[tuple[np.ndarray, float, float | None, float | None]]:
        """(patch score grid, image score, kNN term's image score, classifier term's image score) of images
        whose standardised features are known (no backbone); the normal bank is searched within each image's
        class (``BankConfig.class_aware``). The mapper has no separate terms (None, None)."""
        state = self.fitted()
        if state.scorer is not None:
            return [state.scorer.score_terms(state.memory, f, c) for f, c in zip(feats, categories, strict=True)]
        assert state.net is not None  # is_fitted: a mapper where there is no classifier scorer
        dim = self.config.backbone.feature_dim
        flat = [np.asarray(f, np.float32).reshape(-1, dim) for f in feats]
        q_all = np.concatenate(flat)
        v_n, v_a = state.memory.nearest_vectors(q_all, None, np.repeat(np.asarray(categories), [len(f) for f in flat]))
        q = torch.from_numpy(q_all).to(self.device).reshape(len(flat), flat[0].shape[0], dim)
        scores = -state.net.eval()(q, torch.from_numpy(v_n).to(self.device).reshape(q.shape),
                                   torch.from_numpy(v_a).to(self.device).reshape(q.shape), q)
        grids = [s.reshape(f.shape[:2]) if f.ndim == 3 else s for f, s in zip(feats, scores.float().cpu().numpy(),
                                                                                strict=True)]
        return [(g, top_k_mean(g, self.config.score.top_k), None, None) for g in grids]
