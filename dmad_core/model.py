"""DMAD as an estimator: ``fit`` (unsupervised or semi-supervised), ``update`` (warm-started retrain after
new annotations), ``predict``, ``save`` / ``load``.

Example (offline backbone, synthetic data)::

    store = FeatureStore(DMADConfig.preset("offline"), cache_dir=tmp / "features")
    model = DMAD(DMADConfig.preset("offline"), store)
    model.fit(normal_items, outlier_items)
    preds = model.predict(test_items)        # patch grid, image score, anomaly map on demand
    model.update([DefectAnnotation(item, mask)])  # seen + centre parts rebuilt, mapper warm-started

Training never lets a patch match a bank entry of its own image (see ``banks.py``), never picks anything on
test data (epochs are chosen on a validation split of the normal training images), and leaves every
trained module in eval mode for inference.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmad_core import banks as B
from dmad_core.backbone import FeatureExtractor, pick_device
from dmad_core.cache import FeatureCache, content_hash
from dmad_core.config import DMADConfig, MapperConfig
from dmad_core.coreset import coreset_size, greedy_coreset
from dmad_core.data.readers import load_image
from dmad_core.modules import DMADNet, hinge_loss, smooth_maps

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction 0..1, message): worker heartbeats, UI progress bars

FORMAT_VERSION = 1


def _no_progress(fraction: float, message: str) -> None:
    pass


@dataclass(frozen=True)
class ImageItem:
    """An image the model sees: its identity is the content hash of its file (or of its pixels)."""

    category: str
    hash: str
    path: Path | None = None
    array: np.ndarray | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def from_path(path: str | Path, category: str) -> ImageItem:
        return ImageItem(category=category, hash=content_hash(path), path=Path(path))

    @staticmethod
    def from_array(array: np.ndarray, category: str) -> ImageItem:
        import hashlib

        return ImageItem(category=category, hash=hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
                         array=array)

    def load(self) -> np.ndarray:
        return self.array if self.array is not None else load_image(self.path)

    @property
    def source(self) -> int:
        return B.source_id(self.hash)


@dataclass(frozen=True)
class DefectAnnotation:
    """An annotated defect: ``mask`` (bool, the image's own size) or None for a defect without mask."""

    item: ImageItem
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass
class Prediction:
    item: ImageItem
    patch_scores: np.ndarray  # (gh, gw) float32, higher = more anomalous
    image_score: float

    def anomaly_map(self, size: tuple[int, int], sigma: float, base_size: int = 256) -> np.ndarray:
        """Pixel map: patch scores upsampled bilinearly, then Gaussian-smoothed. Smoothing happens at the
        model's input resolution (``base_size``, where sigma is defined), then the map is resized to ``size``."""
        return anomaly_maps(self.patch_scores[None], size, sigma, base_size)[0]


def anomaly_maps(grids: np.ndarray, size: tuple[int, int], sigma: float, base_size: int = 256) -> np.ndarray:
    t = torch.from_numpy(np.asarray(grids, np.float32)).unsqueeze(1)
    t = F.interpolate(t, size=(base_size, base_size), mode="bilinear", align_corners=False).squeeze(1)
    t = smooth_maps(t, sigma)
    if tuple(size) != (base_size, base_size):
        t = F.interpolate(t.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    return t.numpy()


def top_k_mean(grid: np.ndarray, k: int) -> float:
    flat = np.sort(np.asarray(grid, np.float32).ravel())
    return float(flat[-min(k, len(flat)):].mean())


class FeatureStore:
    """Patch features of images, computed once per extractor configuration and then read from the cache."""

    def __init__(self, config: DMADConfig, cache_dir: str | Path, allow_random_weights: bool = False,
                 batch_size: int = 16):
        self.config = config
        self.cache = FeatureCache(Path(cache_dir), config.backbone.cache_key())
        self.allow_random_weights = allow_random_weights
        self.batch_size = batch_size
        self._extractor: FeatureExtractor | None = None
        self.seconds_backbone = 0.0

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:  # built on first miss only: a fully cached retrain never loads the CNN
            self._extractor = FeatureExtractor(self.config.backbone, self.allow_random_weights, self.config.device)
        return self._extractor

    def get(self, items: Sequence[ImageItem], progress: Progress = _no_progress, desc: str = "features",
            keep_in_memory: bool = True) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [self.cache.get(it.hash) for it in items]
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            bar = tqdm(total=len(missing), desc=desc, unit="img", leave=False, disable=None)
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                feats = self.compute([items[i].load() for i in chunk])
                for i, f in zip(chunk, feats, strict=True):
                    self.cache.put(items[i].hash, f)
                    out[i] = f.astype(np.float16)
                bar.update(len(chunk))
                progress(min(1.0, (start + len(chunk)) / len(missing)), f"{desc}: {start + len(chunk)}/{len(missing)}")
            bar.close()
        if keep_in_memory:
            return [np.asarray(f, dtype=np.float16) for f in out]
        return out  # type: ignore[return-value]

    def compute(self, images: list[np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        x = self.extractor.preprocess(images)
        feats = self.extractor(x).float().cpu().numpy()
        self.seconds_backbone += time.perf_counter() - t0
        return feats


@dataclass
class _TrainSet:
    """Features and precomputed bank neighbours of the images the mapper learns from."""

    feats: list[np.ndarray]  # per image (N, C) float16
    nn_normal: list[np.ndarray]  # per image (N,) index into the normal bank
    nn_abnormal: list[np.ndarray]  # per image (N,) index into the abnormal bank
    patches: list[np.ndarray | None]  # per image: the patch indices to learn from (None = all)
    sources: list[int] = field(default_factory=list)  # per image: provenance id (self-match exclusion)
    categories: list[str] = field(default_factory=list)  # per image: its class (class-aware normal search)


class DMAD:
    """The unified dual-memory-bank model for all categories at once."""

    def __init__(self, config: DMADConfig, features: FeatureStore):
        self.config = config
        self.features = features
        self.device = pick_device(config.device)
        self.timings_: dict[str, float] = {}
        self.normal_bank_: B.MemoryBank | None = None
        self.abnormal_bank_: B.MemoryBank | None = None
        self.net_: DMADNet | None = None
        self.mapper_config_: MapperConfig = config.mapper
        self.categories_: list[str] = []
        self.normal_items_: list[ImageItem] = []  # training split (banks + mapper)
        self.validation_items_: list[ImageItem] = []
        self.annotations_: list[DefectAnnotation] = []
        self.pixel_threshold_: float | None = None
        self.image_threshold_: float | None = None
        self.history_: list[dict] = []
        self.feature_shift_: np.ndarray | None = None  # (C,) mean of normal training patches
        self.feature_scale_: float = 1.0  # mean per-channel std: one isotropic scale keeps NN geometry
        self._normal_nn_cache: dict[str, np.ndarray] = {}  # see _neighbours; cleared when the normal bank changes
        self._outlier_nn_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # see _abnormal_neighbours

    def _get(self, items: Sequence[ImageItem], progress: Progress = _no_progress, desc: str = "features") -> list[np.ndarray]:
        """Standardised float32 features: backbones differ wildly in scale (EfficientNet-Lite0 channels have
        std ~5), and the pseudo-anomaly noise is defined on unit-scale features."""
        raw = self.features.get(items, progress, desc)
        if self.feature_shift_ is None:
            return [np.asarray(f, np.float32) for f in raw]
        return [(np.asarray(f, np.float32) - self.feature_shift_) / self.feature_scale_ for f in raw]

    def _fit_standardisation(self, feats: Sequence[np.ndarray]) -> None:
        dim = self.config.backbone.feature_dim
        flat = np.concatenate([np.asarray(f, np.float32).reshape(-1, dim)[::7] for f in feats])
        self.feature_shift_ = flat.mean(axis=0)
        self.feature_scale_ = float(flat.std(axis=0).mean()) or 1.0

    # -------------------------------------------------------------------------------------------- fit
    def fit(self, normal: Sequence[ImageItem], outliers: Sequence[ImageItem],
            annotations: Sequence[DefectAnnotation] = (), progress: Progress = _no_progress) -> DMAD:
        """Builds both banks from scratch and trains the mapper (semi-supervised when annotations exist)."""
        if not normal:
            raise ValueError("no normal training images: DMAD needs at least a few normal images per category")
        cfg = self.config
        self.categories_ = sorted({it.category for it in normal})
        self.normal_items_, self.validation_items_ = self._split_validation(normal)
        t0 = time.perf_counter()
        n_all = len(normal) + len(outliers) + len(annotations)
        self.feature_shift_, self.feature_scale_ = None, 1.0
        self._fit_standardisation(self.features.get(
            self.normal_items_, lambda f, m: progress(0.3 * f * len(normal) / n_all, m), desc="features: normal"))
        feats = self._get(self.normal_items_)
        self.features.get(self.validation_items_, desc="features: validation")
        out_feats = self._get(outliers[: cfg.bank.outlier_images_max], desc="features: outliers")
        self.features.get([a.item for a in annotations], desc="features: annotated")
        self.timings_["features"] = time.perf_counter() - t0

        progress(0.3, "building the normal bank (coreset)")
        t0 = time.perf_counter()
        self.normal_bank_ = self._build_normal_bank(self.normal_items_, feats)
        self._normal_nn_cache, self._outlier_nn_cache = {}, {}
        self.abnormal_bank_ = B.MemoryBank(dim=cfg.backbone.feature_dim)
        self.abnormal_bank_.set_part(B.OUTLIER, self._outlier_part(out_feats, self.normal_items_, feats))
        self.annotations_ = list(annotations)
        self._set_annotated_parts()
        self.timings_["banks"] = time.perf_counter() - t0

        self.mapper_config_ = self._mapper_config()
        self.net_ = None
        t0 = time.perf_counter()
        self._train(self.mapper_config_.epochs, lambda f, m: progress(0.4 + 0.55 * f, m))
        self.timings_["train"] = time.perf_counter() - t0
        self._calibrate()
        progress(1.0, "trained")
        return self

    def update(self, annotations: Sequence[DefectAnnotation], confirmed_normals: Sequence[ImageItem] = (),
               epochs: int | None = None, progress: Progress = _no_progress) -> DMAD:
        """Retrain after annotations changed: the seen, weak and centre parts of the abnormal bank are
        rebuilt from cached features, confirmed normals extend the normal bank (greedy coreset continued
        from the current bank) and the training set, and the mapper is warm-started.

        ``annotations`` is the complete current set (not a delta), so deletions are honoured.
        """
        if self.net_ is None:
            raise RuntimeError("update() needs a fitted model: call fit() first")
        t0 = time.perf_counter()
        self.features.get([a.item for a in annotations], desc="features: annotated")
        known = {it.hash for it in self.normal_items_}
        new_normals = [it for it in confirmed_normals if it.hash not in known]
        if new_normals:
            progress(0.05, f"adding {len(new_normals)} confirmed normal images to the normal bank")
            new_feats = self._get(new_normals, desc="features: confirmed normal")
            self._extend_normal_bank(new_normals, new_feats)
            self.normal_items_ = self.normal_items_ + new_normals
            self.categories_ = sorted(set(self.categories_) | {it.category for it in new_normals})
        self.timings_["features"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.annotations_ = list(annotations)
        self._set_annotated_parts()
        self.timings_["banks"] = time.perf_counter() - t0
        previous = self.mapper_config_
        self.mapper_config_ = self._mapper_config()
        if self.mapper_config_ != previous:
            # The regime changed (first annotated defect: distance-only knowledge and the semi-supervised
            # loss weights, or back). Measured on tire + bottle with 10 masks: warm-starting the unsupervised
            # mapper gives tire pixel AUROC 0.70-0.74 (it never leaves the unsupervised optimum's basin;
            # validation loss stays ~6-8), a fresh mapper 0.96 after 6 epochs, as good as 48 from scratch.
            self.net_ = None
        t0 = time.perf_counter()
        self._train(epochs or self.config.mapper.retrain_epochs(), lambda f, m: progress(0.1 + 0.85 * f, m),
                    patience=self.config.mapper.retrain_patience)
        self.timings_["train"] = time.perf_counter() - t0
        self._calibrate()
        progress(1.0, "retrained")
        return self

    def _mapper_config(self) -> MapperConfig:
        """Unsupervised weights without annotated defects; the paper's semi-supervised ones with them."""
        if self.annotations_:
            return MapperConfig.semi_supervised(self.config.mapper)
        return self.config.mapper

    def _split_validation(self, items: Sequence[ImageItem]) -> tuple[list[ImageItem], list[ImageItem]]:
        rng = np.random.default_rng(self.config.mapper.seed)
        train, val = [], []
        for cat in sorted({it.category for it in items}):
            cat_items = [it for it in items if it.category == cat]
            n_val = int(round(len(cat_items) * self.config.mapper.validation_fraction))
            n_val = min(n_val, len(cat_items) - 1) if len(cat_items) >= 5 else 0
            order = rng.permutation(len(cat_items))
            val += [cat_items[i] for i in order[:n_val]]
            train += [cat_items[i] for i in order[n_val:]]
        return train, val

    # ------------------------------------------------------------------------------------------ banks
    def _build_normal_bank(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray]) -> B.MemoryBank:
        cfg = self.config.bank
        dim = self.config.backbone.feature_dim
        flat = np.concatenate([f.reshape(-1, dim) for f in feats])
        sources = np.concatenate([np.full(f.shape[0] * f.shape[1], it.source, np.int64) for it, f in zip(items, feats)])
        cats = np.concatenate([np.full(f.shape[0] * f.shape[1], it.category, "<U64") for it, f in zip(items, feats)])
        sel = greedy_coreset(flat, coreset_size(len(flat), cfg.coreset_ratio), cfg.coreset_projection_dim,
                             self.config.mapper.seed, max_candidates=cfg.coreset_max_candidates)
        bank = B.MemoryBank(dim=dim)
        bank.set_part(B.NORMAL, B.BankPart(flat[sel].astype(np.float32), sources[sel], cats[sel]))
        bank.build_index(cfg)
        return bank

    def _extend_normal_bank(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray]) -> None:
        cfg = self.config.bank
        dim = self.config.backbone.feature_dim
        flat = np.concatenate([f.reshape(-1, dim) for f in feats]).astype(np.float32)
        sources = np.concatenate([np.full(f.shape[0] * f.shape[1], it.source, np.int64) for it, f in zip(items, feats)])
        cats = np.concatenate([np.full(f.shape[0] * f.shape[1], it.category, "<U64") for it, f in zip(items, feats)])
        current = self.normal_bank_.parts[B.NORMAL]
        sel = greedy_coreset(flat, coreset_size(len(flat), cfg.coreset_ratio), cfg.coreset_projection_dim,
                             self.config.mapper.seed, initial=current.vectors)
        self.normal_bank_.set_part(B.NORMAL, B.BankPart.concat(
            [current, B.BankPart(flat[sel], sources[sel], cats[sel])], dim))
        self.normal_bank_.build_index(cfg)
        self._normal_nn_cache = {}

    def _outlier_part(self, out_feats: Sequence[np.ndarray], items: Sequence[ImageItem],
                      feats: Sequence[np.ndarray]) -> B.BankPart:
        """Mo: beta * F(outlier) + (1 - beta) * F(normal), patch for patch, then coreset-reduced. The fused
        entry keeps the normal image as its source (it carries that image's features)."""
        cfg = self.config.bank
        dim = self.config.backbone.feature_dim
        if not out_feats:
            return B.BankPart.empty(dim)
        rng = np.random.default_rng(self.config.mapper.seed + 1)
        fused, sources, cats = [], [], []
        for of in out_feats:
            j = int(rng.integers(len(feats)))
            fused.append((cfg.outlier_beta * of.astype(np.float32)
                          + (1 - cfg.outlier_beta) * feats[j].astype(np.float32)).reshape(-1, dim))
            sources.append(np.full(len(fused[-1]), items[j].source, np.int64))
            cats.append(np.full(len(fused[-1]), items[j].category, "<U64"))
        flat = np.concatenate(fused)
        sel = greedy_coreset(flat, coreset_size(len(flat), cfg.outlier_coreset_ratio), cfg.coreset_projection_dim,
                             self.config.mapper.seed + 1, max_candidates=cfg.coreset_max_candidates)
        return B.BankPart(flat[sel], np.concatenate(sources)[sel], np.concatenate(cats)[sel])

    def _annotated_patches(self, ann: DefectAnnotation, feat: np.ndarray) -> tuple[np.ndarray, bool]:
        """Patch indices that carry the defect, and whether they are weak evidence (no mask).

        Masked: the mask resized to the patch grid (bilinear), patches covered above the threshold; a defect
        smaller than one patch still yields its best-covered patch. Without mask: the image's
        highest-scoring patches under the current model (or nearest-neighbour distance before one exists).
        """
        gh, gw = feat.shape[:2]
        if ann.mask is not None:
            m = torch.from_numpy(np.asarray(ann.mask, np.float32))[None, None]
            cover = F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False).reshape(-1).numpy()
            idx = np.flatnonzero(cover > self.config.bank.mask_threshold)
            if len(idx) == 0 and cover.max() > 0:
                idx = np.array([int(cover.argmax())])
            return idx, False
        if self.net_ is not None:
            scores = self._score_features([feat], [ann.item.category])[0].reshape(-1)
        else:
            d, _ = self._search_normal(feat.reshape(-1, feat.shape[-1]), None, ann.item.category)
            scores = d
        k = self.config.bank.weak_patches_per_image
        return np.argsort(scores)[-k:], True

    def _set_annotated_parts(self) -> None:
        """Rebuilds Mas (seen), the weak part and Mp (anomaly centres) from the current annotations."""
        cfg = self.config.bank
        dim = self.config.backbone.feature_dim
        seen, weak = [], []
        self._annotated_idx: dict[str, np.ndarray] = {}
        feats = self._get([a.item for a in self.annotations_], desc="features: annotated")
        for ann, feat in zip(self.annotations_, feats, strict=True):
            idx, is_weak = self._annotated_patches(ann, feat)
            self._annotated_idx[ann.item.hash] = idx
            vec = feat.reshape(-1, dim)[idx].astype(np.float32)
            part = B.BankPart(vec, np.full(len(idx), ann.item.source, np.int64), np.full(len(idx), ann.item.category, "<U64"))
            (weak if is_weak else seen).append(part)
        seen_part = B.BankPart.concat(seen, dim)
        weak_part = B.BankPart.concat(weak, dim)
        centres = []
        rng = np.random.default_rng(self.config.mapper.seed + 2)
        evidence = B.BankPart.concat([seen_part, weak_part], dim)
        for cat in sorted(set(evidence.categories.tolist())):
            vec = evidence.vectors[evidence.categories == cat]
            centre = vec.mean(axis=0)
            noise = rng.normal(0.0, cfg.perturbation_std, size=(cfg.perturbations_per_centre, dim)).astype(np.float32)
            centres.append(B.BankPart(centre[None] + noise, np.full(len(noise), -1, np.int64),
                                      np.full(len(noise), cat, "<U64")))
        self.abnormal_bank_.set_part(B.SEEN, seen_part)
        self.abnormal_bank_.set_part(B.WEAK, weak_part)
        self.abnormal_bank_.set_part(B.CENTRE, B.BankPart.concat(centres, dim))
        self.abnormal_bank_.build_index(cfg)

    def _search_normal(self, q: np.ndarray, sources: np.ndarray | None,
                       categories: str | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Normal-bank search within each query's class (``categories``: one for all queries, or one per
        query) when ``BankConfig.class_aware``; across all classes otherwise or when the class is unknown."""
        bank = self.normal_bank_
        if not self.config.bank.class_aware or categories is None:
            return bank.search(q, sources)
        if isinstance(categories, str):
            return bank.search(q, sources, category=categories)
        categories = np.asarray(categories)
        dist, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
        for c in np.unique(categories):
            sel = categories == c
            dist[sel], idx[sel] = bank.search(q[sel], None if sources is None else sources[sel], category=str(c))
        return dist, idx

    # --------------------------------------------------------------------------------------- training
    def _neighbours(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray], exclude: bool) -> tuple[list, list]:
        """Nearest normal-bank and abnormal-bank entries of every patch of the training images. The
        normal-bank ones are cached by image (and saved with the model) until the normal bank changes, and
        so are the nearest entries of the abnormal bank's outlier part (see ``_abnormal_neighbours``): a
        retrain after an annotation changes only the small annotated parts, and these searches were most
        of its cost."""
        dim = self.config.backbone.feature_dim
        exclude = exclude and self.config.bank.exclude_same_image
        nn_n, nn_a = [], []
        for it, f in zip(items, feats):
            q = f.reshape(-1, dim).astype(np.float32)
            src = np.full(len(q), it.source, np.int64) if exclude else None
            key = f"{it.hash}:{'x' if exclude else 'a'}"
            if key not in self._normal_nn_cache:
                self._normal_nn_cache[key] = self._search_normal(q, src, it.category)[1].astype(np.int32)
            nn_n.append(self._normal_nn_cache[key].astype(np.int64))
            nn_a.append(self._abnormal_neighbours(key, q, src))
        return nn_n, nn_a

    def _abnormal_neighbours(self, key: str, q: np.ndarray, src: np.ndarray | None) -> np.ndarray:
        """Nearest abnormal-bank entry of each patch, as the nearer of (a) its nearest entry in the outlier
        part, which is fixed once fitted and therefore cached by ``key`` and saved with the model, and (b)
        its nearest entry in the other parts (seen, weak, centre: small, rebuilt by every retrain)."""
        bank = self.abnormal_bank_
        if not len(bank.parts.get(B.OUTLIER, ())):
            return bank.search(q, src)[1]
        if key not in self._outlier_nn_cache:
            d, i = bank.search_part(B.OUTLIER, q, src)
            self._outlier_nn_cache[key] = (d.astype(np.float32), i.astype(np.int32))
        best_d, within = self._outlier_nn_cache[key]
        best_i = within.astype(np.int64) + bank.part_rows(B.OUTLIER)[0]
        for name in bank.parts:
            if name == B.OUTLIER or not len(bank.parts[name]):
                continue
            d, i = bank.search_part(name, q, src)
            nearer = d < best_d
            best_d = np.where(nearer, d, best_d)
            best_i = np.where(nearer, i + bank.part_rows(name)[0], best_i)
        alone = ~np.isfinite(best_d)  # every entry of every part is from the query's own image
        if alone.any():
            best_i[alone] = bank.search(q[alone], None if src is None else src[alone])[1]
        return best_i

    def _train_sets(self) -> tuple[_TrainSet, _TrainSet, _TrainSet]:
        dim = self.config.backbone.feature_dim
        mc = self.mapper_config_
        nf = self._get(self.normal_items_, desc="features: normal")
        nf = [f.reshape(-1, dim) for f in nf]
        normal = _TrainSet(nf, *self._neighbours(self.normal_items_, nf, exclude=True), [None] * len(nf),
                           [it.source for it in self.normal_items_], [it.category for it in self.normal_items_])
        vf = [f.reshape(-1, dim) for f in self._get(self.validation_items_, desc="features: validation")]
        vrng = np.random.default_rng(mc.seed + 3)  # the same validation patches every epoch
        vsel = [None if mc.validation_patches_per_image >= len(f)
                else np.sort(vrng.choice(len(f), size=mc.validation_patches_per_image, replace=False)) for f in vf]
        val = _TrainSet(vf, *self._neighbours(self.validation_items_, vf, exclude=False), vsel,
                        [it.source for it in self.validation_items_], [it.category for it in self.validation_items_])
        items = [a.item for a in self.annotations_]
        af = [f.reshape(-1, dim) for f in self._get(items, desc="features: annotated")]
        ann = _TrainSet(af, *self._neighbours(items, af, exclude=True), [self._annotated_idx[it.hash] for it in items],
                        [it.source for it in items], [it.category for it in items])
        return normal, val, ann

    def _batch(self, ts: _TrainSet, which: Sequence[int], n_patches: int | None, rng: np.random.Generator):
        """Tensors (q, nn_n, nn_a, image_feats, valid) and arrays (sources, categories) for the chosen images;
        P patches sampled per image (``sources``, ``categories`` (B, P): each patch's image id and class, for
        self-match exclusion and the class-aware search when searching again)."""
        mn, ma = self.normal_bank_.vectors, self.abnormal_bank_.vectors
        qs, nns, nas, imgs = [], [], [], []
        for i in which:
            f = ts.feats[i]
            allowed = ts.patches[i] if ts.patches[i] is not None else np.arange(len(f))
            if n_patches is None or n_patches >= len(allowed):
                sel = allowed
            else:
                sel = rng.choice(allowed, size=n_patches, replace=False)
            qs.append(f[sel]); nns.append(mn[ts.nn_normal[i][sel]]); nas.append(ma[ts.nn_abnormal[i][sel]]); imgs.append(f)
        p = max(len(q) for q in qs)
        pad = lambda arrs: np.stack([np.pad(a.astype(np.float32), ((0, p - len(a)), (0, 0))) for a in arrs])  # noqa: E731
        valid = np.stack([np.arange(p) < len(q) for q in qs])
        sources = np.repeat(np.array([ts.sources[i] if ts.sources else -1 for i in which], np.int64)[:, None], p, axis=1)
        categories = np.repeat(np.array([ts.categories[i] if ts.categories else "" for i in which])[:, None], p, axis=1)
        t = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        return (t(pad(qs)), t(pad(nns)), t(pad(nas)), t(np.stack([x.astype(np.float32) for x in imgs])), t(valid),
                sources, categories)

    def _pseudo(self, q: torch.Tensor, nn_n: torch.Tensor, nn_a: torch.Tensor, sources: np.ndarray | None,
                categories: np.ndarray | None = None, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pseudo-anomalies: Gaussian noise on the features (SimpleNet), and, when ``pseudo_requery``, the
        nearest neighbours of the noisy features searched again in both banks (self-matches excluded when
        ``sources`` is given), as a real anomalous patch gets its neighbours at test time."""
        mc = self.mapper_config_
        noise = torch.randn(q.shape, generator=generator).to(q)
        if mc.pseudo_noise == "covariance":
            noise = noise @ self._noise_factor_.to(q)
        noise = noise * self._noise_scales(q.shape[:2], mc, generator).to(q)
        qp = q + noise
        if not mc.pseudo_requery:
            return qp, nn_n, nn_a
        flat = qp.detach().reshape(-1, q.shape[-1]).cpu().numpy()
        src = None if sources is None else sources.reshape(-1)
        i_n = self._search_normal(flat, src, None if categories is None else categories.reshape(-1))[1]
        i_a = self.abnormal_bank_.search(flat, src)[1]
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(q).reshape(q.shape)  # noqa: E731
        return qp, t(self.normal_bank_.vectors[i_n]), t(self.abnormal_bank_.vectors[i_a])

    def _new_net(self, mc: MapperConfig) -> DMADNet:
        return DMADNet(self.config.backbone.feature_dim, mc.attention_dim, mc.hidden_dim, mc.n_layers,
                       mc.knowledge == "attention", distance_features=mc.distance_features,
                       distance_prior=mc.distance_prior, margin=mc.margin, correction_bound=mc.correction_bound,
                       key_pool=mc.attention_key_pool)

    def _fit_distance_scaler(self, net: DMADNet, normal: _TrainSet) -> None:
        """Distance statistics of normal training patches (self-matches excluded, so they look like a test
        patch's) for the standardised distances the mapper sees."""
        mn, ma = self.normal_bank_.vectors, self.abnormal_bank_.vectors
        rows = []
        for f, i_n, i_a in zip(normal.feats, normal.nn_normal, normal.nn_abnormal, strict=True):
            q = f[::4].astype(np.float32)
            rows.append(np.stack([np.linalg.norm(q - mn[i_n[::4]], axis=1), np.linalg.norm(q - ma[i_a[::4]], axis=1)], 1))
        net.enhancer.distances.fit(torch.from_numpy(np.concatenate(rows)))

    def _fit_noise_factor(self, normal: _TrainSet) -> None:
        """A (C, C) factor A with A^T A = S / mean(eig S), S the covariance of normal training patches:
        ``z @ A`` for white z has that covariance (used by ``pseudo_noise="covariance"``)."""
        flat = np.concatenate([f[::8] for f in normal.feats]).astype(np.float64)
        cov = np.cov(flat, rowvar=False)
        w, v = np.linalg.eigh(cov)
        w = np.clip(w, 0, None)
        a = (v * np.sqrt(w / max(w.mean(), 1e-12))) @ v.T  # symmetric square root, unit mean variance
        self._noise_factor_ = torch.from_numpy(a.astype(np.float32))

    def _train(self, epochs: int, progress: Progress, patience: int = 0) -> None:
        """Trains the mapper for up to ``epochs`` epochs and keeps the state with the lowest validation loss
        (the starting point included); with ``patience`` > 0 it stops once that many epochs in a row have not
        improved on the best."""
        mc = self.mapper_config_
        torch.manual_seed(mc.seed)
        rng = np.random.default_rng(mc.seed)
        if self.net_ is None:
            self.net_ = self._new_net(mc)
        net = self.net_.to(self.device)
        opt = torch.optim.AdamW(
            [{"params": net.enhancer.parameters(), "lr": mc.lr_knowledge},
             {"params": net.mapper.parameters(), "lr": mc.lr_mapper}],
            weight_decay=mc.weight_decay,
        )
        progress(0.0, "nearest neighbours of training patches")
        normal, val, ann = self._train_sets()
        self._fit_distance_scaler(net, normal)
        self._fit_noise_factor(normal)
        # The starting point is a candidate too: with the distance prior an untrained mapper is the kNN
        # baseline, and on a warm start the previous mapper; training must beat it on validation data.
        best_val = self._validation_loss(val, ann, rng) if val.feats else float("inf")
        best_state, history = copy.deepcopy(net.state_dict()), [{"epoch": -1, "train_loss": None, "val_loss": best_val}]
        since_best = 0
        bar = tqdm(range(epochs), desc="training mapper", unit="epoch", leave=False, disable=None)
        for epoch in bar:
            net.train()
            losses = []
            for _ in range(mc.steps_per_epoch):
                which = rng.choice(len(normal.feats), size=min(mc.images_per_batch, len(normal.feats)), replace=False)
                q, nn_n, nn_a, img, valid, src, cats = self._batch(normal, which, mc.patches_per_image, rng)
                q_p, nn_np, nn_ap = self._pseudo(q, nn_n, nn_a, src, cats)
                o, prior = net.represent(torch.cat([q, q_p]), torch.cat([nn_n, nn_np]), torch.cat([nn_a, nn_ap]),
                                         torch.cat([img, img]))
                v2 = torch.cat([valid, valid])
                out = net.head(o[v2], None if prior is None else prior[v2])
                out_n, out_p = out[: int(valid.sum())], out[int(valid.sum()):]
                out_a = None
                if ann.feats and mc.lambda_annotated:
                    wa = rng.choice(len(ann.feats), size=min(mc.images_per_batch, len(ann.feats)), replace=False)
                    qa, na, aa, ia, va, _, _ = self._batch(ann, wa, mc.patches_per_image, rng)
                    oa, pa = net.represent(qa, na, aa, ia)
                    out_a = net.head(oa[va], None if pa is None else pa[va])
                loss = hinge_loss(out_n, out_p, out_a, mc.margin, mc.lambda_pseudo, mc.lambda_annotated)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            val_loss = self._validation_loss(val, ann, rng) if val.feats else float(np.mean(losses))
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss})
            if val_loss < best_val:
                best_val, best_state, since_best = val_loss, copy.deepcopy(net.state_dict()), 0
            else:
                since_best += 1
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val=f"{val_loss:.4f}")
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, validation {val_loss:.4f}")
            if patience and since_best >= patience and epoch + 1 < epochs:
                progress(1.0, f"stopped after epoch {epoch + 1}/{epochs}: validation loss not improved for "
                              f"{patience} epochs (best {best_val:.4f})")
                break
        bar.close()
        net.load_state_dict(best_state)
        net.eval()
        self.history_ = history

    @staticmethod
    def _noise_scales(shape: tuple[int, ...], mc: MapperConfig, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-patch noise std, log-uniform in [pseudo_noise_std, pseudo_noise_std_max] (SimpleNet-style
        Gaussian pseudo-anomalies, added to the features before knowledge so bank distances grow with it)."""
        lo, hi = np.log(mc.pseudo_noise_std), np.log(max(mc.pseudo_noise_std_max, mc.pseudo_noise_std))
        u = torch.rand(*shape, 1, generator=generator)
        return torch.exp(lo + (hi - lo) * u)

    @torch.no_grad()
    def _validation_loss(self, val: _TrainSet, ann: _TrainSet, rng: np.random.Generator) -> float:
        """Held-out normal images (a fixed subset of their patches, and pseudo-anomalies made from them,
        seeded) under the training loss; the annotated-defect term uses the training annotations (too few
        to hold any out)."""
        net, mc = self.net_, self.mapper_config_
        net.eval()
        g = torch.Generator(device="cpu").manual_seed(mc.seed)
        total = []
        for start in range(0, len(val.feats), mc.images_per_batch):
            which = list(range(start, min(start + mc.images_per_batch, len(val.feats))))
            q, nn_n, nn_a, img, valid, _, cats = self._batch(val, which, None, rng)
            q_p, nn_np, nn_ap = self._pseudo(q, nn_n, nn_a, None, cats, g)
            out_n = net(q, nn_n, nn_a, img)[valid]
            out_p = net(q_p, nn_np, nn_ap, img)[valid]
            out_a = None
            if ann.feats and mc.lambda_annotated:
                qa, na, aa, ia, va, _, _ = self._batch(ann, range(len(ann.feats)), None, rng)
                out_a = net(qa, na, aa, ia)[va]
            total.append(float(hinge_loss(out_n, out_p, out_a, mc.margin, mc.lambda_pseudo, mc.lambda_annotated)))
        return float(np.mean(total))

    def _calibrate(self) -> None:
        """Thresholds from validation normal images only: the pixel threshold for heat-map masks and the
        image threshold (highest validation normal image score)."""
        if not self.validation_items_:
            return
        preds = self.predict(self.validation_items_, progress_bar=False)
        maps = anomaly_maps(np.stack([p.patch_scores for p in preds]), (256, 256), self.config.score.gaussian_sigma)
        self.pixel_threshold_ = float(np.quantile(maps, self.config.score.pixel_threshold_quantile))
        self.image_threshold_ = float(max(p.image_score for p in preds))

    # -------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def _score_features(self, feats: Sequence[np.ndarray], categories: Sequence[str] | None = None) -> list[np.ndarray]:
        """Patch score grids for images whose features are known (no backbone); ``categories``, one per
        image, for the class-aware normal-bank search (None: search the whole bank)."""
        if self.net_ is None:
            raise RuntimeError("model is not fitted: call fit() or load() first")
        dim = self.config.backbone.feature_dim
        net = self.net_.eval()
        mn, ma = self.normal_bank_.vectors, self.abnormal_bank_.vectors
        out = []
        flat = [np.asarray(f, np.float32).reshape(-1, dim) for f in feats]
        q_all = np.concatenate(flat)
        per_query = None if categories is None else np.repeat(np.asarray(categories), [len(f) for f in flat])
        _, i_n = self._search_normal(q_all, None, per_query)
        _, i_a = self.abnormal_bank_.search(q_all)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        n = flat[0].shape[0]
        q = t(q_all).reshape(len(flat), n, dim)
        scores = -net(q, t(mn[i_n]).reshape(q.shape), t(ma[i_a]).reshape(q.shape), q)
        scores = scores.float().cpu().numpy()
        for f, s in zip(feats, scores, strict=True):
            out.append(s.reshape(f.shape[:2]) if f.ndim == 3 else s)
        return out

    def predict(self, items: Sequence[ImageItem], batch_size: int = 16, progress: Progress = _no_progress,
                progress_bar: bool = True) -> list[Prediction]:
        preds: list[Prediction] = []
        bar = tqdm(total=len(items), desc="predict", unit="img", leave=False, disable=None if progress_bar else True)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            feats = self._get(chunk, desc="features")
            for it, grid in zip(chunk, self._score_features(feats, [it.category for it in chunk]), strict=True):
                preds.append(Prediction(it, grid.astype(np.float32), top_k_mean(grid, self.config.score.top_k)))
            bar.update(len(chunk))
            progress(len(preds) / len(items), f"scored {len(preds)}/{len(items)}")
        bar.close()
        return preds

    def knn_predict(self, items: Sequence[ImageItem], batch_size: int = 16) -> list[Prediction]:
        """The PatchCore baseline on the same features and normal bank: patch score = distance to the
        nearest normal patch, image score = the largest patch score."""
        preds = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            for it, f in zip(chunk, self._get(chunk, desc="features"), strict=True):
                d, _ = self._search_normal(np.asarray(f, np.float32).reshape(-1, f.shape[-1]), None, it.category)
                grid = np.sqrt(np.maximum(d, 0)).reshape(f.shape[:2]).astype(np.float32)
                preds.append(Prediction(it, grid, float(grid.max())))
        return preds

    # ------------------------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """Writes everything needed to predict: banks, their faiss indexes, all trained weights, config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.normal_bank_.save(folder, "normal_bank")
        self.abnormal_bank_.save(folder, "abnormal_bank")
        torch.save(self.net_.state_dict(), folder / "net.pt")
        item = lambda it: {"category": it.category, "hash": it.hash, "path": str(it.path) if it.path else None}  # noqa: E731
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "mapper_config": dataclasses.asdict(self.mapper_config_),
            "categories": self.categories_,
            "normal_items": [item(it) for it in self.normal_items_],
            "validation_items": [item(it) for it in self.validation_items_],
            "annotations": [{**item(a.item), "has_mask": a.mask is not None} for a in self.annotations_],
            "feature_shift": self.feature_shift_.tolist() if self.feature_shift_ is not None else None,
            "feature_scale": self.feature_scale_,
            "pixel_threshold": self.pixel_threshold_,
            "image_threshold": self.image_threshold_,
            "history": self.history_,
            "bank_sizes": {"normal": self.normal_bank_.part_sizes(), "abnormal": self.abnormal_bank_.part_sizes()},
        }
        (folder / "model.json").write_text(json.dumps(meta, indent=1))
        if hasattr(self, "_annotated_idx"):
            np.savez(folder / "annotated_patches.npz", **self._annotated_idx)
        if self._normal_nn_cache:
            np.savez(folder / "normal_neighbours.npz", **self._normal_nn_cache)
        if self._outlier_nn_cache:
            np.savez(folder / "outlier_neighbours.npz",
                     **{f"{k}|{part}": v[j] for k, v in self._outlier_nn_cache.items() for j, part in enumerate("di")})

    @staticmethod
    def load(folder: str | Path, features: FeatureStore) -> DMAD:
        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"model at {folder} has format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        config = DMADConfig.from_dict(meta["config"])
        model = DMAD(config, features)
        # Models saved before the distance features / prior / re-search existed had none of them.
        legacy = {"distance_features": False, "distance_prior": False, "pseudo_requery": False,
                  "correction_bound": 0.0, "pseudo_noise": "isotropic", "attention_key_pool": 1}
        model.mapper_config_ = MapperConfig(**{**legacy, **meta["mapper_config"]})
        model.categories_ = meta["categories"]
        mk = lambda d: ImageItem(category=d["category"], hash=d["hash"], path=Path(d["path"]) if d["path"] else None)  # noqa: E731
        model.normal_items_ = [mk(d) for d in meta["normal_items"]]
        model.validation_items_ = [mk(d) for d in meta["validation_items"]]
        model.feature_shift_ = np.asarray(meta["feature_shift"], np.float32) if meta["feature_shift"] else None
        model.feature_scale_ = meta["feature_scale"]
        model.pixel_threshold_ = meta["pixel_threshold"]
        model.image_threshold_ = meta["image_threshold"]
        model.history_ = meta.get("history", [])
        model.normal_bank_ = B.MemoryBank.load(folder, "normal_bank", config.bank)
        model.abnormal_bank_ = B.MemoryBank.load(folder, "abnormal_bank", config.bank)
        mc = model.mapper_config_
        model.net_ = model._new_net(mc)
        model.net_.load_state_dict(torch.load(folder / "net.pt", map_location="cpu", weights_only=True))
        model.net_.to(model.device).eval()
        if (folder / "normal_neighbours.npz").exists():
            with np.load(folder / "normal_neighbours.npz") as z:
                model._normal_nn_cache = {k: z[k] for k in z.files}
        if (folder / "outlier_neighbours.npz").exists():
            with np.load(folder / "outlier_neighbours.npz") as z:
                keys = {name.rsplit("|", 1)[0] for name in z.files}
                model._outlier_nn_cache = {k: (z[f"{k}|d"], z[f"{k}|i"]) for k in keys}
        if (folder / "annotated_patches.npz").exists():
            z = np.load(folder / "annotated_patches.npz")
            model._annotated_idx = {k: z[k] for k in z.files}
        return model
