"""How well the model's pre-annotation masks (what Label Studio shows an inspector before they draw) fit
the real defects, per class: IoU with the ground-truth mask on every defective test image with a mask.

    .venv/bin/python benchmarks/preannotation.py [--data DIR ...] [--k 10] [--seed 0] [--cache DIR]

One unified model on the classes (default: tire, bottle, KolektorSDD commutator from ../shared/data), scored
unsupervised and after K masked defects per class (drawn as `dmad eval` draws them, removed from the
measurement). The masks of each image, at the image's own size:

- before: the heat map above ONE pixel threshold for all classes (the validation quantile over all
  classes' normal pixels), no clean-up (what the product sent first);
- one threshold + clean-up: the same, components smaller than one patch removed (the product's mask for a
  class with no drawn masks until 2026-12-07);
- class threshold + clean-up: the class's own threshold (the lowest at which its validation normals keep at
  most one patch's area marked), components smaller than one patch removed (measured, not kept);
- half the peak: the product's mask for a class with no drawn masks (the unsupervised rows): cut at half the
  image's peak (``preannotation.UNDRAWN_PEAK_SHARE``, never below the class's own pixel threshold), the peak's
  component only;
- relative level: the product's mask for a class with drawn masks: cut at the share of the image's peak
  that the model chose on the K annotated masks (``FittedState.mask_peak_shares``), the peak's component only;
- the same level over the pooled threshold: the product's mask until 2026-12-07, when the floor was one
  threshold for all classes;
- GrabCut: the product's mask refined by ``preannotation.grabcut_mask``, for every class; the product
  column takes it only for the classes whose drawn masks chose it (``FittedState.mask_grabcut``);
- ceiling: the single threshold that gives the best mean IoU on these very images (chosen on the test
  masks: reported only as the ceiling, never used).

IoU of an image is |mask & truth| / |mask | truth|; the table gives the mean over a class's images.
Progress goes to stderr; nothing is written to the working directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dmad_core.config import DMADConfig
from dmad_core.data.readers import load_image, load_mask, read_category
from dmad_core.evaluation import draw_annotated
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem
from dmad_core.preannotation import (UNDRAWN_PEAK_SHARE, defect_mask, grabcut_mask, iou, patch_area,
                                     pixel_threshold_for)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle", SHARED / "kolektorsdd" / "commutator"]


def false_mark_threshold(normal_heats: list[np.ndarray], patch_pixels: int,
                         levels: np.ndarray | None = None) -> float:
    """The per-class threshold measured against the product's one threshold (and not kept): the lowest
    level at which a class's validation heat maps (at the model's input resolution) keep on average at most
    one patch's area (``patch_pixels``) marked after clean-up; tried at the pixel quantiles ``levels``
    (default: 1 - 10^-2 ... 1 - 10^-5.5), else just above their maximum."""
    values = np.concatenate([h.ravel() for h in normal_heats])
    levels = 1 - np.logspace(-2, -5.5, 36) if levels is None else levels
    for t in np.unique(np.quantile(values, levels)):
        marked = np.mean([defect_mask(h, t, patch_pixels).sum() for h in normal_heats])
        if marked <= patch_pixels:
            return float(t)
    return float(np.nextafter(values.max(), np.inf))  # nothing normal is marked


def heat_maps(model: DMAD, records: list, category: str) -> tuple[list, list, list, list]:
    """Heat maps, ground-truth masks, one patch's area and the pixels of the records' images, at each
    image's size."""
    items = [ImageItem.from_path(r.path, category) for r in records]
    preds = model.predict(items, progress_bar=False)
    heats, truths, areas, images = [], [], [], []
    for r, p in zip(records, preds, strict=True):
        images.append(load_image(r.path))
        h, w = images[-1].shape[:2]
        heats.append(model.anomaly_map(p.patch_scores, (h, w)))
        truths.append(load_mask(r.mask_path, (h, w)))
        areas.append(patch_area(p.patch_scores.shape, (h, w)))
    return heats, truths, areas, images


def measure(model: DMAD, records: list, category: str) -> dict[str, float | None]:
    """Mean IoU of each mask over the class's defective images with masks."""
    heats, truths, areas, images = heat_maps(model, records, category)
    fitted = model.fitted()
    t = fitted.pixel_threshold  # over all classes (the product's floor until 2026-12-07)
    own = pixel_threshold_for(fitted.pixel_thresholds, t, category)  # the class's own (the product's floor)

    def mean_iou(masks: Iterable[np.ndarray]) -> float:
        return float(np.mean([iou(m, truth) for m, truth in zip(masks, truths, strict=True)]))

    def cut(level: float, peak_share: float | None = None) -> float:  # the product's masks at this level
        return mean_iou(defect_mask(hm, level, a, peak_share) for hm, a in zip(heats, areas, strict=True))

    val = [it for it in fitted.validation_items if it.category == category]
    stride = model.config.backbone.stride
    class_threshold = false_mark_threshold([model.anomaly_map(p.patch_scores)
                                            for p in model.predict(val, progress_bar=False)], stride * stride)
    share = fitted.mask_peak_shares.get(category)
    product_share = UNDRAWN_PEAK_SHARE if share is None else share
    proposed = [defect_mask(hm, own, a, product_share) for hm, a in zip(heats, areas, strict=True)]
    refined = [grabcut_mask(img, m, a) for img, m, a in zip(images, proposed, areas, strict=True)]
    values = np.concatenate([hm.ravel()[::7] for hm in heats])  # defects can be 0.01 % of the pixels:
    candidates = np.quantile(values, 1 - np.logspace(-0.3, -5.5, 80))  # thresholds up to the very top
    return {
        "before": mean_iou(hm >= t for hm in heats),
        "cleaned": cut(t),
        "class": cut(class_threshold),
        "half_pooled": cut(t, UNDRAWN_PEAK_SHARE if share is None else share),
        "half": cut(own, UNDRAWN_PEAK_SHARE),
        "relative": None if share is None else cut(own, share),
        "share": share,
        "grabcut": mean_iou(refined),
        "grabcut_chosen": category in fitted.mask_grabcut,
        "ceiling": max(mean_iou(hm >= c for hm in heats) for c in candidates),
        "images": len(records),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, metavar="DIR")
    ap.add_argument("--k", type=int, default=10, help="masked defects per class for the semi-supervised rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, help="feature cache (default: a temporary folder)")
    args = ap.parse_args()
    missing = [d for d in args.data if not d.is_dir()]
    if missing:
        sys.exit(f"preannotation.py: no such folder: {', '.join(map(str, missing))}")
    config = DMADConfig.preset("offline")
    datasets = [read_category(d) for d in args.data]
    with tempfile.TemporaryDirectory(prefix="dmad-preannotation-") as tmp:
        store = FeatureStore(config, args.cache or Path(tmp))
        model = DMAD(config, store).fit([ImageItem.from_path(r.path, ds.name) for ds in datasets for r in ds.train], [])
        drawn = {ds.name: draw_annotated(ds, args.k, args.seed) for ds in datasets}
        rows = []
        for setting in ("unsupervised", f"K={args.k}"):
            if setting != "unsupervised":
                model.update([DefectAnnotation(ImageItem.from_path(r.path, r.category),
                                               load_mask(r.mask_path, load_image(r.path).shape[:2]))
                              for recs in drawn.values() for r in recs])
            for ds in datasets:
                held = {r.path for r in drawn[ds.name]}
                records = [r for r in ds.test if r.label == 1 and r.mask_path is not None and r.path not in held]
                if records:
                    print(f"  {setting} {ds.name}: {len(records)} images", file=sys.stderr, flush=True)
                    rows.append((setting, ds.name, measure(model, records, ds.name)))
    print("| setting | class | images | IoU: one threshold, no clean-up | one threshold + clean-up (product, no "
          "drawn masks until 2026-12-07) | class threshold + clean-up (not kept) | half the peak (product, no drawn "
          "masks) | relative level from drawn masks | the product's level over the pooled threshold (until "
          "2026-12-07) | GrabCut on the level's mask | product (GrabCut where the drawn masks chose it) | ceiling "
          "(best single threshold on these images) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, name, m in rows:
        relative = "-" if m["relative"] is None else f"{100 * m['relative']:.1f} (at {m['share']:.2f} of the peak)"
        plain = m["half"] if m["relative"] is None else m["relative"]
        product = f"{100 * (m['grabcut'] if m['grabcut_chosen'] else plain):.1f}" + (" (GrabCut)" if m["grabcut_chosen"] else "")
        print(f"| {setting} | {name} | {m['images']} | {100 * m['before']:.1f} | {100 * m['cleaned']:.1f} | "
              f"{100 * m['class']:.1f} | {100 * m['half']:.1f} | {relative} | {100 * m['half_pooled']:.1f} | "
              f"{100 * m['grabcut']:.1f} | {product} | "
              f"{100 * m['ceiling']:.1f} |")

if __name__ == "__main__":
    main()
