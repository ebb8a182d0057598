"""How well the model's pre-annotation masks (what Label Studio shows an inspector before they draw) fit
the real defects, per class: IoU with the ground-truth mask on every defective test image with a mask.

    .venv/bin/python benchmarks/preannotation.py [--data DIR ...] [--k 10] [--seed 0] [--cache DIR]

One unified model on the classes (default: tire, bottle, KolektorSDD commutator from ../shared/data), scored
unsupervised and after K masked defects per class (drawn as `dmad eval` draws them, removed from the
measurement). Three masks per image, at the image's own size:

- before: the heat map above ONE pixel threshold for all classes (the validation quantile over all
  classes' normal pixels), no clean-up (what the product sent until now);
- one threshold + clean-up: the same, components smaller than one patch removed;
- class threshold + clean-up: the class's own threshold (the lowest at which its validation normals keep at
  most one patch's area marked, dmad_core/preannotation.py), components smaller than one patch removed;
- ceiling: the single threshold that gives the best mean IoU on these very images (chosen on the test
  masks: reported only as the ceiling, never used).

IoU of an image is |mask & truth| / |mask | truth|; the table gives the mean over a class's images.
Progress goes to stderr; nothing is written to the working directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from dmad_core.config import DMADConfig
from dmad_core.data.readers import load_image, load_mask, read_category
from dmad_core.evaluation import draw_annotated
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem
from dmad_core.preannotation import defect_mask, patch_area

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


def peak_component(mask: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Only the connected component of ``mask`` that holds its hottest pixel (an image's main defect)."""
    if not mask.any():
        return mask
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    hottest = np.unravel_index(np.argmax(np.where(mask, heat, -np.inf)), heat.shape)
    return labels == labels[hottest]


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(mask, truth).sum()
    return float(np.logical_and(mask, truth).sum() / union) if union else 1.0


def relative_mask(heat: np.ndarray, threshold: float, share: float, min_area: int) -> np.ndarray:
    """The clean-up mask, further cut at ``share`` of the image's own peak (a relative level)."""
    return peak_component(defect_mask(heat, max(threshold, share * float(heat.max())), min_area), heat)


SHARES = np.linspace(0.3, 0.95, 14)


def heat_maps(model: DMAD, records: list, category: str) -> tuple[list, list, list]:
    items = [ImageItem.from_path(r.path, category) for r in records]
    preds = model.predict(items, progress_bar=False)
    heats, truths, areas = [], [], []
    for r, p in zip(records, preds, strict=True):
        h, w = load_image(r.path).shape[:2]
        heats.append(model.anomaly_map(p.patch_scores, (h, w)))
        truths.append(load_mask(r.mask_path, (h, w)))
        areas.append(patch_area(p.patch_scores.shape, (h, w)))
    return heats, truths, areas


def chosen_share(model: DMAD, annotated: list, category: str) -> float | None:
    """The relative level that fits the class's annotated masks best (inspectors' own masks, never test)."""
    if not annotated:
        return None
    heats, truths, areas = heat_maps(model, annotated, category)
    return float(max(SHARES, key=lambda s: np.mean([iou(relative_mask(hm, model.pixel_threshold_, s, a), t)
                                                    for hm, t, a in zip(heats, truths, areas)])))


def measure(model: DMAD, records: list, category: str, share: float | None = None) -> dict[str, float]:
    """Mean IoU of the masks over the class's defective images with masks."""
    heats, truths, areas = heat_maps(model, records, category)
    relative = None if share is None else np.mean([iou(relative_mask(hm, model.pixel_threshold_, share, a), t)
                                                   for hm, t, a in zip(heats, truths, areas)])
    before = np.mean([iou(hm >= model.pixel_threshold_, t) for hm, t in zip(heats, truths)])
    cleaned = np.mean([iou(defect_mask(hm, model.pixel_threshold_, a), t) for hm, t, a in zip(heats, truths, areas)])
    val = [it for it in model.validation_items_ if it.category == category]
    stride = model.config.backbone.stride
    class_threshold = false_mark_threshold([model.anomaly_map(p.patch_scores)
                                            for p in model.predict(val, progress_bar=False)], stride * stride)
    after = np.mean([iou(defect_mask(hm, class_threshold, a), t) for hm, t, a in zip(heats, truths, areas)])
    peak = np.mean([iou(peak_component(defect_mask(hm, model.pixel_threshold_, a), hm), t)
                    for hm, t, a in zip(heats, truths, areas)])
    values = np.concatenate([hm.ravel()[::7] for hm in heats])  # defects can be 0.01 % of the pixels:
    candidates = np.quantile(values, 1 - np.logspace(-0.3, -5.5, 80))  # thresholds up to the very top
    ceiling = max(np.mean([iou(hm >= c, t) for hm, t in zip(heats, truths)]) for c in candidates)
    return {"before": float(before), "cleaned": float(cleaned), "after": float(after), "peak": float(peak),
            "relative": None if relative is None else float(relative), "share": share,
            "ceiling": float(ceiling), "images": len(records)}


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
                    share = None if setting == "unsupervised" else chosen_share(model, drawn[ds.name], ds.name)
                    rows.append((setting, ds.name, measure(model, records, ds.name, share)))
    print("| setting | class | images | IoU: one threshold, no clean-up (before) | one threshold + clean-up | "
          "class threshold + clean-up | hottest component only | + relative level (chosen on annotated) | ceiling (best single threshold on these images) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setting, name, m in rows:
        print(f"| {setting} | {name} | {m['images']} | {100 * m['before']:.1f} | {100 * m['cleaned']:.1f} | {100 * m['after']:.1f} | {100 * m['peak']:.1f} | "
              + ("-" if m["relative"] is None else f"{100 * m['relative']:.1f} (at {m['share']:.2f} of the peak)") + " | "
              f"{100 * m['ceiling']:.1f} |")


if __name__ == "__main__":
    main()
