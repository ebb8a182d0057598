"""How much can K annotated tire defects help image-level detection, on these features? The figures behind
the "semi-supervised is not clearly better" finding of docs/results.md, reproducible.

    .venv/bin/python benchmarks/semi_supervision_ceiling.py [--k 10 30] [--seed 0] [--cache DIR] [--picture PNG]

For each K it fits the banks of the unified tire + bottle model (offline preset, DTD outliers, K tire masks
drawn as ``dmad eval --setting semi`` draws them, mapper untrained: only the banks matter here) and prints,
on the tire test images that are not annotated:

- where the most anomalous patch (nearest-normal distance) of each *normal* test image lies, against where
  the defect masks lie: if both sit in the same place, the place itself is hard, not the defects;
- image AUROC of the kNN distance (max and top-5 mean, the two aggregations the evaluation uses);
- image AUROC of the seen part alone (closeness to the annotated defect patches) and of the distance minus
  w times it, for several w: what the abnormal bank can add at best, whatever the mapper learns;
- a supervised upper bound on the features: a logistic regression trained on the annotated defect patches
  against every normal training image's 20 least typical patches, its image AUROC alone and added to the
  distance. If a classifier that sees the labels cannot separate the defects, no mapper can;
- two ideas that did not help: the distance normalised per grid position, and the annotated images'
  patches away from their mask added to the normal bank.

The chosen w or C is never used by the product: these are diagnostics, read on the test set on purpose.
Needs ../shared/data (MVTec 3D-AD tire, MVTec AD bottle, DTD).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from dmad_core import banks
from dmad_core.config import DMADConfig
from dmad_core.data import load_image, load_mask, read_category
from dmad_core.evaluation import draw_annotated, outlier_items
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def top5(scores: np.ndarray) -> np.ndarray:
    return np.sort(scores, axis=1)[:, -5:].mean(axis=1)


def nearest_distance(bank: banks.MemoryBank, feats: list[np.ndarray], part: str | None = None,
                     sources: list[int] | None = None, category: str | None = None) -> np.ndarray:
    """(images, patches) Euclidean distance to the nearest entry of the bank (or of one of its parts, or of
    one class); with ``sources``, entries of the image itself are excluded (training images)."""
    out = []
    for i, f in enumerate(feats):
        q = f.reshape(-1, f.shape[-1]).astype(np.float32)
        src = None if sources is None else np.full(len(q), sources[i], np.int64)
        d, _ = bank.search(q, src, category=category) if part is None else bank.search_part(part, q, src)
        out.append(np.sqrt(np.maximum(d, 0)))
    return np.stack(out)


def save_picture(path: Path, maps: list[np.ndarray], cell: int = 8) -> None:
    """The maps side by side as one grey PNG, each stretched to 0-255 (bright = high), ``cell`` px a patch."""
    from PIL import Image

    tiles = []
    for m in maps:
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-9)
        tiles.append(np.kron((255 * m).astype(np.uint8), np.ones((cell, cell), np.uint8)))
        tiles.append(np.full((tiles[-1].shape[0], cell), 255, np.uint8))
    Image.fromarray(np.concatenate(tiles[:-1], axis=1)).save(path)


def analyse(k: int, seed: int, cache: Path, picture: Path | None = None) -> None:
    t0 = time.perf_counter()
    tire, bottle = read_category(SHARED / "mvtec_3d_ad" / "tire"), read_category(SHARED / "mvtec_ad" / "bottle")
    cfg = DMADConfig.preset("offline")
    cfg = dataclasses.replace(cfg, mapper=dataclasses.replace(cfg.mapper, epochs=0))
    annotated = draw_annotated(tire, k, seed)
    annotations = [DefectAnnotation(ImageItem.from_path(r.path, "tire"), load_mask(r.mask_path, load_image(r.path).shape[:2]))
                   for r in annotated]
    model = DMAD(cfg, FeatureStore(cfg, cache))
    model.fit([ImageItem.from_path(r.path, ds.name) for ds in (tire, bottle) for r in ds.train],
              outlier_items(SHARED / "dtd" / "images", 120, seed, cfg.bank.outlier_images_max), annotations)
    held_out = {r.path for r in annotated}
    records = [r for r in tire.test if r.path not in held_out]
    labels = np.array([r.label for r in records])
    feats = model.patch_features([ImageItem.from_path(r.path, "tire") for r in records])
    grid = feats[0].shape[:2]
    masks = np.stack([load_mask(r.mask_path, grid) if r.mask_path else np.zeros(grid, bool) for r in records])
    masks = masks.reshape(len(records), -1)
    fitted = model.fitted()
    normal_bank, abnormal_bank = fitted.memory.normal_bank_, fitted.memory.abnormal_bank_
    d_normal = nearest_distance(normal_bank, feats, category="tire")
    d_seen = nearest_distance(abnormal_bank, feats, banks.SEEN)
    sizes = abnormal_bank.part_sizes()
    print(f"\n== K = {k} annotated tire defects (seed {seed}): {sizes.get(banks.SEEN, 0)} seen patches; "
          f"{len(records)} test images ({int((labels == 0).sum())} normal) ==")

    good = labels == 0
    top_normal = np.array(np.unravel_index(d_normal[good].argmax(axis=1), grid)).T
    defect_rc = np.array(np.nonzero(masks[~good].reshape(-1, *grid).any(axis=0))).T
    lo, hi = defect_rc.min(axis=0), defect_rc.max(axis=0)
    inside = np.all((top_normal >= lo) & (top_normal <= hi), axis=1)
    print(f"normal test images: most anomalous patch at rows {top_normal[:, 0].min()}-{top_normal[:, 0].max()}, "
          f"cols {top_normal[:, 1].min()}-{top_normal[:, 1].max()} of {grid[0]}x{grid[1]}; "
          f"{inside.sum()}/{len(inside)} inside the box where the defect masks lie "
          f"(rows {lo[0]}-{hi[0]}, cols {lo[1]}-{hi[1]})")
    if picture is not None:
        save_picture(picture, [d_normal[good].mean(0).reshape(grid), d_normal[~good].mean(0).reshape(grid),
                               masks[~good].mean(0).reshape(grid)])
        print(f"picture: {picture} (mean kNN distance of normal test images | of defective ones | defect-mask frequency)")
    print(f"kNN distance:      image AUROC max {roc_auc_score(labels, d_normal.max(1)):.3f}, "
          f"top-5 {roc_auc_score(labels, top5(d_normal)):.3f}; patch AUROC {roc_auc_score(masks.ravel(), d_normal.ravel()):.3f}")
    print(f"seen part alone:   image AUROC top-5 {roc_auc_score(labels, top5(-d_seen)):.3f}; "
          f"patch AUROC {roc_auc_score(masks.ravel(), -d_seen.ravel()):.3f}")
    for w in (0.1, 0.25, 0.5, 1.0):
        s = d_normal - w * d_seen
        print(f"distance - {w:<4} x seen distance: image AUROC top-5 {roc_auc_score(labels, top5(s)):.3f}, "
              f"patch AUROC {roc_auc_score(masks.ravel(), s.ravel()):.3f}")

    # Supervised upper bound: the labels of the annotated patches, a linear classifier on the features.
    train_items = [it for it in fitted.normal_items if it.category == "tire"]
    train_feats = model.patch_features(train_items)
    d_train = nearest_distance(normal_bank, train_feats, sources=[it.source for it in train_items], category="tire")
    hard = np.concatenate([f.reshape(-1, f.shape[-1])[np.argsort(d)[-20:]] for f, d in zip(train_feats, d_train)])
    seen = abnormal_bank.parts[banks.SEEN].vectors
    x = np.concatenate([seen, hard])
    y = np.r_[np.ones(len(seen)), np.zeros(len(hard))]
    flat = np.stack([f.reshape(-1, f.shape[-1]) for f in feats])
    for c in (0.01, 1.0):
        clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced").fit(x, y)
        logit = clf.decision_function(flat.reshape(-1, flat.shape[-1])).reshape(len(records), -1)
        print(f"linear probe C={c:<4}: image AUROC top-5 alone {roc_auc_score(labels, top5(logit)):.3f}, "
              f"distance + 0.1 x logit {roc_auc_score(labels, top5(d_normal + 0.1 * logit)):.3f}, "
              f"+ 0.25 x logit {roc_auc_score(labels, top5(d_normal + 0.25 * logit)):.3f}")

    # Two ideas that did not help, kept so that the figures stay checkable.
    med, q99 = np.median(d_train, axis=0), np.quantile(d_train, 0.99, axis=0)
    z = (d_normal - med) / np.maximum(q99 - med, 1e-3)
    print(f"distance normalised per grid position (training images' median and 99th percentile): image AUROC "
          f"max {roc_auc_score(labels, z.max(1)):.3f}, top-5 {roc_auc_score(labels, top5(z)):.3f}")
    away = []
    for r, f in zip(annotated, model.patch_features([a.item for a in annotations])):
        cover = binary_dilation(load_mask(r.mask_path, grid), iterations=2)
        away.append(f.reshape(-1, f.shape[-1])[~cover.ravel()])
    away = np.concatenate(away)
    normal_part = normal_bank.parts[banks.NORMAL]
    rows = normal_part.categories == "tire"
    extended = banks.MemoryBank(dim=away.shape[1])
    extended.set_part(banks.NORMAL, banks.BankPart(np.concatenate([normal_part.vectors[rows], away]),
                                           np.full(int(rows.sum()) + len(away), -1, np.int64),
                                           np.full(int(rows.sum()) + len(away), "tire")))
    extended.build_index(cfg.bank)
    d_ext = nearest_distance(extended, feats)
    print(f"annotated images' patches away from the mask (dilated 2 patches, {len(away)}) added to the normal "
          f"bank: image AUROC max {roc_auc_score(labels, d_ext.max(1)):.3f}, top-5 {roc_auc_score(labels, top5(d_ext)):.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 30], help="annotated tire defects (default 10 30)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="feature cache (default: a temporary folder)")
    ap.add_argument("--picture", type=Path, default=None,
                    help="write, for the first K, the mean distance maps and the mask frequency as one PNG")
    args = ap.parse_args()
    if not (SHARED / "mvtec_3d_ad" / "tire").exists():
        raise SystemExit(f"needs the real data at {SHARED} (MVTec 3D-AD tire, MVTec AD bottle, DTD)")
    cache = args.cache or Path(tempfile.mkdtemp(prefix="dmad-semi-ceiling-"))
    for i, k in enumerate(args.k):
        analyse(k, args.seed, cache, args.picture if i == 0 else None)


if __name__ == "__main__":
    main()
