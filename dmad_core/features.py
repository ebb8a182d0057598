"""Patch features of images: computed once per extractor configuration and cached (``FeatureStore``), and
standardised with statistics of the normal training patches (``FeatureScaling``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmad_core.backbone import FeatureExtractor
from dmad_core.cache import FeatureCache
from dmad_core.config import DMADConfig
from dmad_core.items import ImageItem, Progress, no_progress
from dmad_core.progress_bar import make_bar


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

    def get(self, items: Sequence[ImageItem], progress: Progress = no_progress, desc: str = "features",
            keep_in_memory: bool = True, store: bool = True, bar: bool = True) -> list[np.ndarray]:
        """Features of ``items``, from the cache or computed; ``store=False`` computes without caching
        (images scored once on the line, which would only fill the cache); ``bar=False`` shows no progress."""
        out: list[np.ndarray | None] = [self.cache.get(it.hash) for it in items]
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            shown = make_bar(total=len(missing), desc=desc, unit="img", enabled=bar)
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                feats = self.compute([items[i].load() for i in chunk])
                for i, f in zip(chunk, feats, strict=True):
                    if store:
                        self.cache.put(items[i].hash, f)
                    out[i] = f.astype(np.float16)
                shown.update(len(chunk))
                progress(min(1.0, (start + len(chunk)) / len(missing)), f"{desc}: {start + len(chunk)}/{len(missing)}")
            shown.close()
        if keep_in_memory:
            return [np.asarray(f, dtype=np.float16) for f in out]
        return out  # type: ignore[return-value]

    def compute(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Patch features (gh, gw, C) of each image: one backbone call per input size among them (with
        ``geometry="aspect"`` images of other proportions have other grids)."""
        t0 = time.perf_counter()
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.config.backbone.input_size(*img.shape[:2]), []).append(i)
        for rows in groups.values():
            feats = self.extractor(self.extractor.preprocess([images[i] for i in rows])).float().cpu().numpy()
            for i, f in zip(rows, feats, strict=True):
                # C order, as the cache gives them back: the backbone's channels-last view is not, and the
                # mapper's matrix products on it differ from those on cached features by 1e-6 (an image scored
                # on first sight must score exactly as it does from the cache)
                out[i] = np.ascontiguousarray(f)
        self.seconds_backbone += time.perf_counter() - t0
        return out  # type: ignore[return-value]


@dataclass(frozen=True)
class FeatureScaling:
    """One shift per channel and one isotropic scale: backbones differ wildly in scale (EfficientNet-Lite0
    channels have std ~5) and the pseudo-anomaly noise is defined on unit-scale features; a single scale
    keeps the nearest-neighbour geometry.

    Example:
        >>> scaling = FeatureScaling.fit([np.ones((2, 2, 3)), np.zeros((2, 2, 3))], dim=3)
        >>> [float(v) for v in scaling.apply([np.ones((1, 3))])[0][0]]
        [1.0, 1.0, 1.0]
    """

    shift: np.ndarray  # (C,) mean of (every 7th) normal training patch
    scale: float  # mean per-channel std, 1.0 when the features are constant

    @staticmethod
    def fit(feats: Sequence[np.ndarray], dim: int) -> FeatureScaling:
        flat = np.concatenate([np.asarray(f, np.float32).reshape(-1, dim)[::7] for f in feats])
        return FeatureScaling(flat.mean(axis=0), float(flat.std(axis=0).mean()) or 1.0)

    def apply(self, raw: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Standardised float32 copies of ``raw`` features (any leading shape, channels last)."""
        return [(np.asarray(f, np.float32) - self.shift) / self.scale for f in raw]
