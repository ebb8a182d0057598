"""The ``classifier`` scorer: the kNN distance to the normal bank, corrected by what inspectors annotated.

Patch score = z(d_n) + w * z(logit), where d_n is the distance to the nearest normal-bank entry of the
patch's class (PatchCore's score), the logit comes from one logistic regression per class trained on that
class's annotated defect patches (the abnormal bank's seen and weak parts) against its hardest and some
random normal patches, and z(x) = (x - median) / (q99 - median) on the class's reference normals (its
validation images, and training images searched without their own bank entries), so both terms are in the
same unit whatever the backbone. Without annotations of a class, its score is the kNN distance alone (z is
monotone: the same ranking as PatchCore).

The weights are chosen per class by leave-one-annotated-image-out, never on test data: each annotated image
in turn is scored by a classifier fitted without it, against the class's reference normals. The image
score's (w, top-k mean or max) maximises the held-out image's rank among the reference images; the heat
map's w maximises the AUROC of its defect patches against its other patches and the reference patches.
The image score's w is the simplest candidate within one standard error of the best
(``ClassifierConfig.selection``), w = 0 (the kNN score) first; the map's w the simplest whose paired
shortfall against the best is within one standard error of it (``map_selection``). A class with a single
annotated image has nothing to hold out and takes the weights chosen on the other classes' held-out images
(none: w = 0).

Why this and not the paper's mapper: measured on three real classes in one model, the mapper stayed below
the kNN baseline, and this rule was the only one above it on every class (docs/supervision-study.md).
scikit-learn's LogisticRegression is the classifier; the leave-one-out is written here because it holds
out whole images (all patches of one annotation), which no splitter over patch rows gives directly.

Example::

    scorer = DefectClassifierScorer(config.classifier, top_k=5)
    scorer.fit(memory, train_items, features, val_items, annotations, ann_feats)
    patch_grid, image_score = scorer.score(memory, feat, "bottle")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmad_core.config import ClassifierConfig, SelectionRule
from dmad_core.items import DefectAnnotation, ImageItem, class_rng, top_k_mean
from dmad_core.memory import DualMemory


@dataclass(frozen=True)
class Scale:
    """z(x) = (x - median) / (q99 - median), fitted on normal patches."""

    median: float
    q99: float

    @staticmethod
    def fit(x: np.ndarray) -> Scale:
        x = np.asarray(x, np.float64).ravel()
        return Scale(float(np.median(x)), float(np.quantile(x, 0.99)))

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.median) / max(self.q99 - self.median, 1e-6)


@dataclass(frozen=True)
class LinearPatchClassifier:
    """A fitted logistic regression folded into one linear map of raw features: logit = x . coef + intercept."""

    coef: np.ndarray  # (C,) float32
    intercept: float

    @staticmethod
    def fit(positives: np.ndarray, negatives: np.ndarray, regularisation: float) -> LinearPatchClassifier:
        from sklearn.linear_model import LogisticRegression  # at fit only: serve's cold start skips scikit-learn
        from sklearn.preprocessing import StandardScaler

        x = np.concatenate([positives, negatives]).astype(np.float32)
        y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
        scaler = StandardScaler().fit(x)
        lr = LogisticRegression(C=regularisation, max_iter=300, class_weight="balanced").fit(scaler.transform(x), y)
        w = lr.coef_[0] / scaler.scale_
        return LinearPatchClassifier(w.astype(np.float32), float(lr.intercept_[0] - w @ scaler.mean_))

    def logit(self, feats: np.ndarray) -> np.ndarray:
        """Logits of patch features (..., C) -> (...)."""
        return np.asarray(feats, np.float32) @ self.coef + self.intercept


@dataclass(frozen=True)
class ClassState:
    """What one class scores with: patch score z(d) + w * z(logit), with one w for the image score and one
    for the heat map (no classifier: the kNN distance alone)."""

    distance_scale: Scale
    classifier: LinearPatchClassifier | None = None
    logit_scale: Scale | None = None
    image_weight: float = 0.0
    map_weight: float = 0.0
    image_top_k: int | None = None  # patches averaged into the image score (None: the model's top_k)


@dataclass
class _Reference:
    """Normal images of one class that score as unseen normals: validation images (never in the bank) and
    training images searched without their own entries. Their kNN distances and features, one row an image."""

    distances: list[np.ndarray]
    feats: list[np.ndarray]


class DefectClassifierScorer:
    """Patch and image scores from the normal bank's distances and per-class defect classifiers."""

    def __init__(self, config: ClassifierConfig, top_k: int):
        self.config = config
        self.top_k = top_k
        # Fitted state
        self.classes_: dict[str, ClassState] | None = None
        # class -> {w: [mean held-out image rank, mean held-out patch AUROC]} (leave-one-annotated-image-out)
        self.selection_: dict[str, dict[float, list[float]]] | None = None
        # annotated image's hash -> its patch scores at its class's map weight, from the leave-one-out's
        # classifier fitted without it: the pre-annotation's levels are chosen on these, not on maps of
        # patches the classifier was trained on (kept in memory for the calibration after a fit; not saved)
        self.held_out_maps_: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------------------------------ fitting
    def fit(self, memory: DualMemory, train_items: Sequence[ImageItem],
            features: Callable[[Sequence[ImageItem]], list[np.ndarray]], val_items: Sequence[ImageItem],
            annotations: Sequence[DefectAnnotation], ann_feats: Sequence[np.ndarray]) -> DefectClassifierScorer:
        """Fits each class's scales, its classifier and its two weights (see the module's docstring).

        Args:
            memory: the model's memory, its normal bank built and ``set_annotations`` done (its
                ``annotated_patches_`` say which patches of each annotated image carry the defect).
            train_items: the normal images of the bank (negatives and reference normals come from them).
            features: standardised patch features of images (the model's feature cache).
            val_items: validation normal images, never in the bank (reference normals).
            annotations, ann_feats: the annotated defects and their standardised features.

        Returns:
            self, fitted.
        """
        cfg = self.config
        positives = self._positives(memory, annotations, ann_feats)
        beside = self._beside_defects(memory, annotations, ann_feats)
        classes: dict[str, ClassState] = {}
        selection: dict[str, dict[float, list[tuple[float, float, float]]]] = {}
        held_out: dict[str, dict[int, dict[float, np.ndarray]]] = {}
        pooled: dict[float, list[tuple[float, float, float]]] = {}
        negatives: dict[str, np.ndarray] = {}
        references: dict[str, _Reference] = {}
        for cat in sorted({it.category for it in train_items}):
            rng = class_rng(cfg.seed, cat)  # the same draws whether the class is alone or not
            rows = rng.permutation([i for i, it in enumerate(train_items) if it.category == cat])
            n_neg = min(cfg.negative_images, max(1, len(rows) // 2))
            negatives[cat] = self._negatives(memory, [train_items[i] for i in rows[:n_neg]], features, rng)
            references[cat] = self._reference(memory, [it for it in val_items if it.category == cat],
                                              [train_items[i] for i in rows[n_neg:n_neg + cfg.reference_images]],
                                              features)
            classes[cat] = ClassState(Scale.fit(np.concatenate(references[cat].distances)))
            if cat in positives:
                selection[cat], held_out[cat] = self._leave_one_out(
                    memory, classes[cat].distance_scale, positives[cat], negatives[cat], references[cat],
                    annotations, ann_feats, beside.get(cat))
                for w, values in selection[cat].items():
                    pooled.setdefault(w, []).extend(values)
        pooled_image = self._choose_image(pooled) if pooled else (0.0, None)
        pooled_map = self._choose_map(pooled) if pooled else 0.0
        for cat, (pos, _) in positives.items():
            if cat not in classes:
                continue  # annotated defects of a class without normal images: nothing to compare with
            crit = selection[cat]
            own = any(crit.values())  # the class had images to hold out
            neg = negatives[cat] if cat not in beside else np.concatenate([negatives[cat], beside[cat][0]])
            clf = LinearPatchClassifier.fit(pos, neg, cfg.regularisation)
            logits = np.concatenate([clf.logit(f) for f in references[cat].feats])
            image_weight, image_top_k = self._choose_image(crit) if own else pooled_image
            classes[cat] = ClassState(classes[cat].distance_scale, clf, Scale.fit(logits), image_weight,
                                      self._choose_map(crit) if own else pooled_map, image_top_k)
        self.classes_ = classes
        self.held_out_maps_ = {annotations[j].item.hash: grids[classes[cat].map_weight]
                               for cat, by_image in held_out.items() for j, grids in by_image.items()}
        self.selection_ = {cat: {w: [float(np.mean(column)) for column in zip(*v)] for w, v in crit.items() if v}
                           for cat, crit in selection.items()}
        return self

    def _negatives(self, memory: DualMemory, items: Sequence[ImageItem],
                   features: Callable[[Sequence[ImageItem]], list[np.ndarray]], rng: np.random.Generator) -> np.ndarray:
        """The hardest patches of bank images (farthest from other images' entries) and some random ones."""
        cfg, chosen = self.config, []
        for it, feat in zip(items, features(items), strict=True):
            q = feat.reshape(-1, memory.dim).astype(np.float32)
            d = memory.normal_distances(feat, it.category, source=it.source)
            extra = rng.choice(len(q), size=min(cfg.random_per_image, len(q)), replace=False)
            chosen.append(q[np.unique(np.r_[np.argsort(d)[-cfg.hardest_per_image:], extra])])
        return np.concatenate(chosen)

    def _reference(self, memory: DualMemory, val_items: Sequence[ImageItem], train_items: Sequence[ImageItem],
                   features: Callable[[Sequence[ImageItem]], list[np.ndarray]]) -> _Reference:
        ref = _Reference([], [])
        for items, own in ((val_items, False), (train_items, True)):
            for it, feat in zip(items, features(items), strict=True):
                ref.distances.append(memory.normal_distances(feat, it.category, it.source if own else None))
                ref.feats.append(feat.reshape(-1, memory.dim).astype(np.float32))
        return ref

    def _positives(self, memory: DualMemory, annotations: Sequence[DefectAnnotation],
                   ann_feats: Sequence[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """class -> (defect patch features, the index of the annotation each row comes from)."""
        rows: dict[str, list[tuple[np.ndarray, int]]] = {}
        for j, (ann, f) in enumerate(zip(annotations, ann_feats, strict=True)):
            idx = memory.annotated_patches_.get(ann.item.hash, np.zeros(0, np.int64))
            if len(idx):
                rows.setdefault(ann.item.category, []).append((f.reshape(-1, memory.dim)[idx], j))
        return _stack_by_class(rows)

    def _beside_defects(self, memory: DualMemory, annotations: Sequence[DefectAnnotation],
                        ann_feats: Sequence[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """class -> (patches beside drawn defects, the index of the annotation each row comes from): per
        drawn mask, ``annotated_negatives`` of its image's patches outside the mask dilated by one patch,
        hottest (farthest from the normal bank) first. Defects without a mask give none."""
        from scipy.ndimage import binary_dilation  # at fit only, as scikit-learn

        n = self.config.annotated_negatives
        if n <= 0:
            return {}
        rows: dict[str, list[tuple[np.ndarray, int]]] = {}
        for j, (ann, f) in enumerate(zip(annotations, ann_feats, strict=True)):
            idx = memory.annotated_patches_.get(ann.item.hash, np.zeros(0, np.int64))
            if ann.mask is None or not len(idx) or f.ndim != 3:
                continue
            covered = np.zeros(f.shape[:2], bool)
            covered.flat[idx] = True
            outside = np.flatnonzero(~binary_dilation(covered))
            if not len(outside):
                continue
            d = memory.normal_distances(f, ann.item.category)[outside]
            take = outside[np.argsort(-d, kind="stable")[:n]]
            rows.setdefault(ann.item.category, []).append((f.reshape(-1, memory.dim)[take], j))
        return _stack_by_class(rows)

    def _leave_one_out(self, memory: DualMemory, scale: Scale, positives: tuple[np.ndarray, np.ndarray],
                       negatives: np.ndarray, reference: _Reference, annotations: Sequence[DefectAnnotation],
                       ann_feats: Sequence[np.ndarray], beside: tuple[np.ndarray, np.ndarray] | None = None,
                       ) -> tuple[dict[float, list[tuple[float, float, float]]], dict[int, dict[float, np.ndarray]]]:
        """For each w, per held-out annotated image of the class: (its image score's rank among the reference
        normals' image scores with the top-k mean, the AUROC of its defect patches against its other patches
        and the reference normals' patches, the rank with the maximum as image score), the image scored by a
        classifier fitted without it (nor the patches beside its defect, ``beside``); and per held-out image
        (its index in ``annotations``) and w, its patch scores (the grid's shape)."""
        from sklearn.metrics import roc_auc_score  # at fit only, as above

        cfg, (pos, source) = self.config, positives
        out: dict[float, list[tuple[float, float, float]]] = {w: [] for w in cfg.weights}
        grids: dict[int, dict[float, np.ndarray]] = {}
        zv = [scale.apply(d) for d in reference.distances]  # one row an image (grids may differ in size)
        n_ref = sum(len(z) for z in zv)
        for j in np.unique(source):
            if not (source != j).any():
                continue  # the class's only annotated image: nothing left to learn from
            neg = negatives if beside is None else np.concatenate([negatives, beside[0][beside[1] != j]])
            clf = LinearPatchClassifier.fit(pos[source != j], neg, cfg.regularisation)
            lv = [clf.logit(f) for f in reference.feats]
            lscale = Scale.fit(np.concatenate(lv))
            ann = annotations[j]
            q = ann_feats[j].reshape(-1, memory.dim)
            defect = np.zeros(len(q), bool)
            defect[memory.annotated_patches_[ann.item.hash]] = True
            za = scale.apply(memory.normal_distances(ann_feats[j], ann.item.category))
            la, lvz = lscale.apply(clf.logit(q)), [lscale.apply(x) for x in lv]
            y = np.r_[np.ones(defect.sum()), np.zeros((~defect).sum() + n_ref)]
            for w in cfg.weights:
                s, v = za + w * la, [z + w * x for z, x in zip(zv, lvz, strict=True)]
                ranks = []
                for k in (self.top_k, 1):
                    top_s, top_v = top_k_mean(s, k), np.array([top_k_mean(x, k) for x in v])
                    ranks.append(float((top_v < top_s).mean() + 0.5 * (top_v == top_s).mean()))
                auc = float(roc_auc_score(y, np.r_[s[defect], s[~defect], np.concatenate(v)]))
                out[w].append((ranks[0], auc, ranks[1]))
                grids.setdefault(int(j), {})[w] = s.reshape(ann_feats[j].shape[:-1])
        return out, grids

    def _choose_image(self, criterion: dict[float, list[tuple[float, float, float]]]) -> tuple[float, int]:
        """The image score's (w, k): the weight and whether the score is the top-k mean or the maximum (on
        some classes, tire for one, the maximum ranks images better; the held-out images say which)."""
        order = [(w, k) for w in sorted(self.config.weights) for k in (self.top_k, 1)]
        return self._pick(order, lambda c: [t[0] if c[1] == self.top_k else t[2] for t in criterion[c[0]]],
                          self.config.selection)

    def _choose_map(self, criterion: dict[float, list[tuple[float, float, float]]]) -> float:
        return self._pick(sorted(self.config.weights), lambda w: [t[1] for t in criterion[w]], self.config.map_selection)

    @staticmethod
    def _pick(order: list, values: Callable[[Any], list[float]], rule: SelectionRule) -> Any:
        """The candidate of ``order`` (simplest first: w = 0 is the kNN score) with the best mean criterion
        over the held-out images; ties go to the simpler one. With ``rule`` "one_standard_error": the
        simplest candidate whose mean is within one standard error of the best, the usual guard against
        choosing on a few noisy folds; "paired_standard_error": the simplest whose shortfall against the best,
        held-out image by held-out image, is within one standard error of that paired difference."""
        per_candidate = {c: values(c) for c in order}
        means = {c: float(np.mean(v)) if v else 0.0 for c, v in per_candidate.items()}
        best = _best(means, order)
        spread = per_candidate[best]
        if rule == "best" or len(spread) < 2:
            return best
        if rule == "paired_standard_error":
            def within(c: Any) -> bool:
                shortfall = np.asarray(spread) - np.asarray(per_candidate[c])
                return bool(shortfall.mean() <= shortfall.std(ddof=1) / np.sqrt(len(shortfall)) + 1e-9)
            return next(c for c in order if within(c))
        floor = means[best] - float(np.std(spread, ddof=1)) / np.sqrt(len(spread))
        return next(c for c in order if means[c] >= floor - 1e-9)

    # ------------------------------------------------------------------------------------------ scoring
    def score(self, memory: DualMemory, feat: np.ndarray, category: str) -> tuple[np.ndarray, float]:
        """The heat map's patch scores (same shape as ``feat`` without channels) and the image score of one
        image's standardised features."""
        patch, image, _, _ = self.score_terms(memory, feat, category)
        return patch, image

    def score_terms(self, memory: DualMemory, feat: np.ndarray, category: str
                    ) -> tuple[np.ndarray, float, float, float | None]:
        """``score``'s two results, then each term alone as an image score (top-k mean, in the class's unit):
        the kNN distance and the classifier's logit (None: the class has no classifier)."""
        if self.classes_ is None:
            raise RuntimeError("the scorer is not fitted: call fit() first")
        state = self.classes_.get(category) or self._unknown_class()
        k = state.image_top_k or self.top_k
        z = state.distance_scale.apply(memory.normal_distances(feat, category))
        knn = top_k_mean(z, k)
        if state.classifier is None:
            return z.reshape(feat.shape[:-1]), knn, knn, None
        assert state.logit_scale is not None  # a classifier always comes with its logit scale
        logit = state.logit_scale.apply(state.classifier.logit(feat.reshape(-1, memory.dim)))
        patch, image = z + state.map_weight * logit, z + state.image_weight * logit
        return patch.reshape(feat.shape[:-1]), top_k_mean(image, k), knn, top_k_mean(logit, k)

    def _unknown_class(self) -> ClassState:
        """A class the model was not trained on: the kNN distance in the median unit of the known classes."""
        scales = [c.distance_scale for c in (self.classes_ or {}).values()]
        return ClassState(Scale(float(np.median([s.median for s in scales])), float(np.median([s.q99 for s in scales]))))

    # ------------------------------------------------------------------------------------------ saving
    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-able description, arrays) for the model folder."""
        meta: dict[str, Any] = {"selection": {c: {str(w): v for w, v in crit.items()} for c, crit in (self.selection_ or {}).items()},
                "classes": {}}
        arrays = {}
        for cat, st in (self.classes_ or {}).items():
            meta["classes"][cat] = {
                "distance_scale": [st.distance_scale.median, st.distance_scale.q99],
                "logit_scale": None if st.logit_scale is None else [st.logit_scale.median, st.logit_scale.q99],
                "intercept": None if st.classifier is None else st.classifier.intercept,
                "image_weight": st.image_weight, "map_weight": st.map_weight, "image_top_k": st.image_top_k}
            if st.classifier is not None:
                arrays[cat] = st.classifier.coef
        return meta, arrays

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> DefectClassifierScorer:
        self.selection_ = {c: {float(w): v for w, v in crit.items()} for c, crit in meta.get("selection", {}).items()}
        self.classes_ = {}
        for cat, d in meta["classes"].items():
            clf = None if d["intercept"] is None else LinearPatchClassifier(arrays[cat].astype(np.float32), d["intercept"])
            self.classes_[cat] = ClassState(Scale(*d["distance_scale"]), clf,
                                            None if d["logit_scale"] is None else Scale(*d["logit_scale"]),
                                            d["image_weight"], d["map_weight"], d.get("image_top_k"))
        return self


def _stack_by_class(rows: dict[str, list[tuple[np.ndarray, int]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """class -> [(patch rows, annotation index)] stacked into class -> (rows (n, C) float32, index (n,))."""
    return {cat: (np.concatenate([r for r, _ in parts]).astype(np.float32),
                  np.concatenate([np.full(len(r), j) for r, j in parts])) for cat, parts in rows.items()}


def _best(means: dict[Any, float], order: Sequence[Any]) -> Any:
    """The candidate with the best mean (4 decimals); ties go to the earliest in ``order`` (the simplest)."""
    return max(order, key=lambda c: (round(means.get(c, 0.0), 4), -order.index(c)))
