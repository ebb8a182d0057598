"""The dual memory of DMAD: the normal bank Mn and the abnormal bank Ma (outlier, seen, weak and centre
parts), how they are built from features, and the nearest-neighbour searches the mapper and the scoring
make in them.

The nearest entries of training images (normal bank; the abnormal bank's outlier part) are cached by image
and saved with the model: a retrain after an annotation changes only the small annotated parts, and these
searches were most of its cost. The normal-bank cache is cleared whenever the normal bank changes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional

from dmad_core import banks
from dmad_core.banks import BankPart, MemoryBank
from dmad_core.config import BankConfig
from dmad_core.coreset import coreset_size, greedy_coreset
from dmad_core.items import DefectAnnotation, ImageItem, Progress, no_progress
from dmad_core.progress_bar import is_report_step, make_bar

# (features (gh, gw, C) of one image, its class) -> (gh * gw,) patch scores, higher = more anomalous
PatchScorer = Callable[[np.ndarray, str], np.ndarray]


def _provenance(items: Sequence[ImageItem], feats: Sequence[np.ndarray], dim: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All patches of the images as rows (float32), with each row's source image id and class."""
    flat = np.concatenate([f.reshape(-1, dim) for f in feats])
    sources = np.concatenate([np.full(f.shape[0] * f.shape[1], it.source, np.int64) for it, f in zip(items, feats)])
    cats = np.concatenate([np.full(f.shape[0] * f.shape[1], it.category, "<U64") for it, f in zip(items, feats)])
    return flat, sources, cats


class DualMemory:
    """Mn and Ma of one model, with the neighbour caches of its training images.

    Example (see ``DMAD.fit``)::

        memory = DualMemory(config.bank, dim=152, seed=0)
        memory.build(train_items, train_feats, outlier_feats)
        memory.set_annotations(annotations, annotation_feats, net_scores=None)  # also builds Ma's index
        dist, idx = memory.search_normal(queries, None, "bottle")
    """

    def __init__(self, config: BankConfig, dim: int, seed: int):
        self.config = config
        self.dim = dim
        self.seed = seed  # coreset selection, outlier fusion (seed + 1) and centre perturbations (seed + 2)
        self.normal_bank_: MemoryBank | None = None
        self.abnormal_bank_: MemoryBank | None = None
        self.normal_nn_cache_: dict[str, np.ndarray] = {}  # "<hash>:x|a" -> nearest normal entries
        self.outlier_nn_cache_: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # same keys -> (dist, index)
        self.annotated_patches_: dict[str, np.ndarray] = {}  # image hash -> patch indices of its defect

    # ------------------------------------------------------------------------------------ building
    def build(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray],
              outlier_feats: Sequence[np.ndarray], progress: Progress = no_progress) -> None:
        """Mn as a coreset of the normal training patches, Ma with its outlier part (the annotated parts
        follow with ``set_annotations``, which also builds Ma's index)."""
        flat, sources, cats = _provenance(items, feats, self.dim)
        sel = self._normal_coreset(flat, cats, None, lambda f, m: progress(0.8 * f, m))
        self.normal_bank_ = MemoryBank(dim=self.dim)
        self.normal_bank_.set_part(banks.NORMAL, BankPart(flat[sel].astype(np.float32), sources[sel], cats[sel]))
        self.normal_bank_.build_index(self.config)
        self.normal_nn_cache_, self.outlier_nn_cache_ = {}, {}
        self.abnormal_bank_ = MemoryBank(dim=self.dim)
        self.abnormal_bank_.set_part(banks.OUTLIER, self._outlier_part(
            outlier_feats, items, feats, lambda f, m: progress(0.8 + 0.2 * f, m)))

    def extend_normal(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray],
                      progress: Progress = no_progress) -> None:
        """Confirmed normal images join Mn: the greedy coreset continued from the current bank."""
        flat, sources, cats = _provenance(items, feats, self.dim)
        flat = flat.astype(np.float32)
        normal_bank = built(self.normal_bank_)
        current = normal_bank.parts[banks.NORMAL]
        sel = self._normal_coreset(flat, cats, current, progress)
        normal_bank.set_part(banks.NORMAL, BankPart.concat(
            [current, BankPart(flat[sel], sources[sel], cats[sel])], self.dim))
        normal_bank.build_index(self.config)
        self.normal_nn_cache_ = {}

    def _normal_coreset(self, flat: np.ndarray, cats: np.ndarray, current: BankPart | None,
                        progress: Progress) -> np.ndarray:
        """Rows of ``flat`` chosen for Mn: the greedy coreset of each class's patches apart
        (``coreset_per_class``), or of all at once; continued from ``current``'s entries when given."""
        cfg = self.config
        groups = [np.unique(cats)] if not cfg.coreset_per_class else [[c] for c in np.unique(cats)]
        chosen = []
        for n, group in enumerate(groups):
            rows = np.flatnonzero(np.isin(cats, group))
            initial = None
            if current is not None and len(current):
                initial = current.vectors if not cfg.coreset_per_class else current.vectors[
                    np.isin(current.categories, group)]
            name = "normal bank coreset" + (f" ({group[0]})" if cfg.coreset_per_class else "")
            sel = greedy_coreset(flat[rows], coreset_size(len(rows), cfg.coreset_ratio), cfg.coreset_projection_dim,
                                 self.seed, initial=initial if initial is not None and len(initial) else None,
                                 max_candidates=cfg.coreset_max_candidates, desc=name,
                                 progress=_within(progress, n, len(groups)))
            chosen.append(rows[sel])
        return np.sort(np.concatenate(chosen))

    def _outlier_part(self, out_feats: Sequence[np.ndarray], items: Sequence[ImageItem],
                      feats: Sequence[np.ndarray], progress: Progress = no_progress) -> BankPart:
        """Mo: beta * F(outlier) + (1 - beta) * F(normal), patch for patch, then coreset-reduced. The fused
        entry keeps the normal image as its source (it carries that image's features)."""
        cfg = self.config
        if not out_feats:
            return BankPart.empty(self.dim)
        rng = np.random.default_rng(self.seed + 1)
        fused, sources, cats = [], [], []
        for of in out_feats:
            j = int(rng.integers(len(feats)))
            fused.append((cfg.outlier_beta * of.astype(np.float32)
                          + (1 - cfg.outlier_beta) * feats[j].astype(np.float32)).reshape(-1, self.dim))
            sources.append(np.full(len(fused[-1]), items[j].source, np.int64))
            cats.append(np.full(len(fused[-1]), items[j].category, "<U64"))
        flat = np.concatenate(fused)
        sel = greedy_coreset(flat, coreset_size(len(flat), cfg.outlier_coreset_ratio), cfg.coreset_projection_dim,
                             self.seed + 1, max_candidates=cfg.coreset_max_candidates, progress=progress,
                             desc="outlier bank coreset")
        return BankPart(flat[sel], np.concatenate(sources)[sel], np.concatenate(cats)[sel])

    def annotated_patches(self, annotation: DefectAnnotation, feat: np.ndarray,
                          net_scores: PatchScorer | None) -> tuple[np.ndarray, bool]:
        """Patch indices that carry the defect, and whether they are weak evidence (no mask).

        Masked: the share of each patch's area the mask covers; patches covered above the threshold, or, for a
        defect thinner than that (a crack a few pixels wide never covers half a patch), those covered at
        least half as much as the best-covered one (measured: KolektorSDD's cracks gave one patch an image
        under the plain threshold, docs/supervision-study.md). Without mask: the image's
        highest-scoring patches under ``net_scores`` (the current mapper), or by nearest-neighbour distance
        when there is no mapper yet (``None``).
        """
        gh, gw = feat.shape[:2]
        if annotation.mask is not None:
            m = torch.from_numpy(np.asarray(annotation.mask, np.float32))[None, None]
            cover = functional.adaptive_avg_pool2d(m, (gh, gw)).reshape(-1).numpy()
            if cover.max() <= 0:
                return np.zeros(0, np.int64), False
            return np.flatnonzero(cover >= min(self.config.mask_threshold, 0.5 * float(cover.max()))), False
        if net_scores is not None:
            scores = net_scores(feat, annotation.item.category)
        else:
            scores = self.search_normal(feat.reshape(-1, feat.shape[-1]), None, annotation.item.category)[0]
        return np.argsort(scores)[-self.config.weak_patches_per_image:], True

    def set_annotations(self, annotations: Sequence[DefectAnnotation], feats: Sequence[np.ndarray],
                        net_scores: PatchScorer | None) -> None:
        """Rebuilds Mas (seen), the weak part and Mp (anomaly centres) from the complete current set of
        annotations (``feats``: their standardised features), then Ma's index."""
        dim = self.dim
        seen: list[BankPart] = []
        weak: list[BankPart] = []
        self.annotated_patches_ = {}
        for ann, feat in zip(annotations, feats, strict=True):
            idx, is_weak = self.annotated_patches(ann, feat, net_scores)
            self.annotated_patches_[ann.item.hash] = idx
            part = BankPart(feat.reshape(-1, dim)[idx].astype(np.float32), np.full(len(idx), ann.item.source, np.int64),
                            np.full(len(idx), ann.item.category, "<U64"))
            (weak if is_weak else seen).append(part)
        seen_part, weak_part = BankPart.concat(seen, dim), BankPart.concat(weak, dim)
        centres = []
        rng = np.random.default_rng(self.seed + 2)
        evidence = BankPart.concat([seen_part, weak_part], dim)
        for cat in sorted(set(evidence.categories.tolist())):
            centre = evidence.vectors[evidence.categories == cat].mean(axis=0)
            noise = rng.normal(0.0, self.config.perturbation_std,
                               size=(self.config.perturbations_per_centre, dim)).astype(np.float32)
            centres.append(BankPart(centre[None] + noise, np.full(len(noise), -1, np.int64),
                                    np.full(len(noise), cat, "<U64")))
        abnormal_bank = built(self.abnormal_bank_)
        abnormal_bank.set_part(banks.SEEN, seen_part)
        abnormal_bank.set_part(banks.WEAK, weak_part)
        abnormal_bank.set_part(banks.CENTRE, BankPart.concat(centres, dim))
        abnormal_bank.build_index(self.config)

    # ------------------------------------------------------------------------------------ searching
    def search_normal(self, q: np.ndarray, sources: np.ndarray | None,
                      categories: str | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Normal-bank search within each query's class (``categories``: one for all queries, or one per
        query) when ``BankConfig.class_aware``; across all classes otherwise or when the class is unknown."""
        bank = built(self.normal_bank_)
        if not self.config.class_aware or categories is None:
            return bank.search(q, sources)
        if isinstance(categories, str):
            return bank.search(q, sources, category=categories)
        categories = np.asarray(categories)
        dist, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
        for c in np.unique(categories):
            sel = categories == c
            dist[sel], idx[sel] = bank.search(q[sel], None if sources is None else sources[sel], category=str(c))
        return dist, idx

    def normal_distances(self, feat: np.ndarray, category: str | None, source: int | None = None) -> np.ndarray:
        """Euclidean distance (float32) of each patch of one image's features (..., C) to its nearest normal-bank
        entry (of its class, see ``search_normal``; never from image ``source`` when given): PatchCore's
        patch score, and the kNN term of the classifier scorer."""
        q = np.asarray(feat, np.float32).reshape(-1, self.dim)
        src = None if source is None else np.full(len(q), source, np.int64)
        return np.sqrt(np.maximum(self.search_normal(q, src, category)[0], 0)).astype(np.float32)

    def nearest_vectors(self, q: np.ndarray, sources: np.ndarray | None,
                        categories: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The nearest normal-bank and abnormal-bank entries (vectors, row for row with ``q``)."""
        i_n = self.search_normal(q, sources, categories)[1]
        abnormal_bank = built(self.abnormal_bank_)
        i_a = abnormal_bank.search(q, sources)[1]
        return built(self.normal_bank_).vectors[i_n], abnormal_bank.vectors[i_a]

    def neighbours(self, items: Sequence[ImageItem], feats: Sequence[np.ndarray], exclude: bool,
                   progress: Progress = no_progress, desc: str = "nearest neighbours"
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Indices of the nearest normal-bank and abnormal-bank entries of every patch of the training
        images (``exclude``: not from the patch's own image), from the caches where they are known;
        ``progress``/``desc`` report the images done (a bar on stderr too)."""
        exclude = exclude and self.config.exclude_same_image
        nn_n, nn_a = [], []
        bar = make_bar(total=len(items), desc=desc, unit="img")
        for done, (it, f) in enumerate(zip(items, feats), start=1):
            q = f.reshape(-1, self.dim).astype(np.float32)
            src = np.full(len(q), it.source, np.int64) if exclude else None
            key = f"{it.hash}:{'x' if exclude else 'a'}"
            if key not in self.normal_nn_cache_:
                self.normal_nn_cache_[key] = self.search_normal(q, src, it.category)[1].astype(np.int32)
            nn_n.append(self.normal_nn_cache_[key].astype(np.int64))
            nn_a.append(self.abnormal_neighbours(key, q, src))
            bar.update(1)
            if is_report_step(done, len(items)):
                progress(done / len(items), f"{desc}: {done}/{len(items)} images")
        bar.close()
        return nn_n, nn_a

    def abnormal_neighbours(self, key: str, q: np.ndarray, src: np.ndarray | None) -> np.ndarray:
        """Nearest abnormal-bank entry of each patch, as the nearer of (a) its nearest entry in the outlier
        part, which is fixed once fitted and therefore cached by ``key`` and saved with the model, and (b)
        its nearest entry in the other parts (seen, weak, centre: small, rebuilt by every retrain)."""
        bank = built(self.abnormal_bank_)
        if not len(bank.parts.get(banks.OUTLIER, ())):
            return bank.search(q, src)[1]
        if key not in self.outlier_nn_cache_:
            d, i = bank.search_part(banks.OUTLIER, q, src)
            self.outlier_nn_cache_[key] = (d.astype(np.float32), i.astype(np.int32))
        best_d, within = self.outlier_nn_cache_[key]
        best_i = within.astype(np.int64) + bank.part_rows(banks.OUTLIER)[0]
        for name in bank.parts:
            if name == banks.OUTLIER or not len(bank.parts[name]):
                continue
            d, i = bank.search_part(name, q, src)
            nearer = d < best_d
            best_d = np.where(nearer, d, best_d)
            best_i = np.where(nearer, i + bank.part_rows(name)[0], best_i)
        alone = ~np.isfinite(best_d)  # every entry of every part is from the query's own image
        if alone.any():
            best_i[alone] = bank.search(q[alone], None if src is None else src[alone])[1]
        return best_i


def built(bank: MemoryBank | None) -> MemoryBank:
    """``bank``, which ``DualMemory.build`` (or ``load``) must have set: a clear error instead of an
    AttributeError on None (and the narrowing the type checker needs)."""
    if bank is None:
        raise RuntimeError("the memory's banks are not built: call build() (or load a fitted model) first")
    return bank


def _within(progress: Progress, step: int, steps: int) -> Progress:
    """``progress`` for step ``step`` of ``steps`` equal ones: its fraction maps into [step, step + 1] / steps."""
    return lambda fraction, message: progress((step + fraction) / steps, message)
