"""Engine performance on this machine: end-to-end images/s vs the backbone forward alone, peak memory, and
seconds for features / banks / mapper training. Every figure is a ratio against a baseline measured in the
same run.

    .venv/bin/python benchmarks/throughput.py [--data DIR ...] [--epochs N] [--preset offline|paper|resnet50]
                                              [--random-weights]

``--preset paper --random-weights`` times the paper's WideResNet50-2 head and banks where its hub weights
cannot be downloaded: random weights change no cost (same layers, same bank sizes, same searches) but make
every metric meaningless, so this mode prints timings only.

Uses ../shared/data (tire + bottle) when present, else a synthetic dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dmad_core.config import PRESETS, DMADConfig
from dmad_core.data import load_image, make_demo_dataset, read_category
from dmad_core.evaluation import outlier_items
from dmad_core.model import DMAD, FeatureStore, ImageItem

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_breakdown(model: DMAD, test: list[ImageItem], batch: int, e2e_s: float) -> None:
    """Milliseconds per image of each stage of end-to-end inference, timed one stage at a time over the
    same test images: where the time goes, so that an optimisation can aim at the largest part."""
    fe = model.features.extractor
    scoring = ["abnormal-bank search", "knowledge + mapper"] if model.uses_mapper else ["defect classifiers"]
    stages: dict[str, float] = dict.fromkeys(
        ["decode", "resize + normalise", "backbone", "patch features", "normal-bank search", *scoring], 0.0)
    dim, fitted = model.config.backbone.feature_dim, model.fitted()
    whole_bank = 0.0  # the normal-bank search across all classes, for reference (not in the sum)
    for start in range(0, len(test), batch):
        chunk = test[start:start + batch]
        t = time.perf_counter(); images = [load_image(it.path) for it in chunk]; stages["decode"] += time.perf_counter() - t
        t = time.perf_counter(); x = fe.preprocess(images); stages["resize + normalise"] += time.perf_counter() - t
        t = time.perf_counter(); maps = fe.backbone_forward(x); stages["backbone"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.inference_mode():
            feats = fe.head(maps).float().cpu().numpy()
        stages["patch features"] += time.perf_counter() - t
        q = fitted.scaling.apply([feats.reshape(-1, dim)])[0]
        cats = np.repeat([it.category for it in chunk], len(q) // len(chunk))
        t = time.perf_counter(); _, i_n = fitted.memory.search_normal(q, None, cats); stages["normal-bank search"] += time.perf_counter() - t
        t = time.perf_counter(); fitted.memory.normal_bank_.search(q); whole_bank += time.perf_counter() - t
        if not model.uses_mapper:  # the logits of each image's class classifier (kNN distance: searched above)
            t = time.perf_counter()
            for it, rows in zip(chunk, q.reshape(len(chunk), -1, dim), strict=True):
                state = fitted.scorer.classes_.get(it.category)
                if state is not None and state.classifier is not None:
                    state.classifier.logit(rows)
            stages["defect classifiers"] += time.perf_counter() - t
            continue
        t = time.perf_counter(); _, i_a = fitted.memory.abnormal_bank_.search(q); stages["abnormal-bank search"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            qt = torch.from_numpy(q).reshape(len(chunk), -1, dim)
            fitted.net.eval()(qt, torch.from_numpy(fitted.memory.normal_bank_.vectors[i_n]).reshape(qt.shape),
                              torch.from_numpy(fitted.memory.abnormal_bank_.vectors[i_a]).reshape(qt.shape), qt)
        stages["knowledge + mapper"] += time.perf_counter() - t
    total = sum(stages.values())
    print(f"where end-to-end time goes (ms/img, stages timed one by one; sum {1000 * total / len(test):.1f} "
          f"vs {1000 * e2e_s:.1f} measured end to end, the rest is the feature cache and bookkeeping):")
    for name, s in stages.items():
        print(f"  {name:<22}{1000 * s / len(test):6.1f}  ({s / stages['backbone']:.2f}x backbone)")
    print(f"  (normal-bank search across all classes instead of within the image's class: "
          f"{1000 * whole_bank / len(test):.1f} ms/img, class-aware = {stages['normal-bank search'] / whole_bank:.2f}x that)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", type=Path)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--preset", choices=PRESETS, default="offline")
    ap.add_argument("--random-weights", action="store_true",
                    help="timing only: random backbone weights (for the paper preset without its hub weights)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dmad-bench-"))
    dirs = args.data or ([SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle"] if SHARED.exists()
                         else make_demo_dataset(tmp / "data"))
    outliers_dir = SHARED / "dtd" / "images" if SHARED.exists() else None
    cfg = DMADConfig.preset(args.preset)
    if args.random_weights:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights="random"))
    if args.epochs:
        cfg = dataclasses.replace(cfg, mapper=dataclasses.replace(cfg.mapper, epochs=args.epochs))
    dss = [read_category(d) for d in dirs]
    normal = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.train]
    test = [ImageItem.from_path(r.path, d.name) for d in dss for r in d.test]
    print(f"device: {torch.device('cuda' if torch.cuda.is_available() else 'cpu')}, threads {torch.get_num_threads()}")
    print(f"data: {', '.join(d.name for d in dss)}: {len(normal)} train, {len(test)} test images")
    print(f"preset: {args.preset} ({cfg.backbone.name}, {cfg.backbone.feature_dim}-d)"
          + (", RANDOM backbone weights: timings only" if args.random_weights else ""))

    store = FeatureStore(cfg, tmp / "features", allow_random_weights=args.random_weights)
    model = DMAD(cfg, store)
    t0 = time.perf_counter()
    model.fit(normal, outlier_items(outliers_dir, 120, 0, cfg.bank.outlier_images_max))
    fit_s = time.perf_counter() - t0
    print(f"fit: {fit_s:.1f} s = " + ", ".join(f"{k} {v:.1f} s" for k, v in model.fitted().timings.items()))

    # Baseline: the backbone forward alone on preprocessed batches (no decoding, no head, no scoring).
    images = [load_image(it.path) for it in test]
    fe = store.extractor
    batches = [fe.preprocess(images[i:i + args.batch]) for i in range(0, len(images), args.batch)]
    fe.backbone_forward(batches[0])  # warm-up
    t0 = time.perf_counter()
    for x in batches:
        fe.backbone_forward(x)
    backbone_s = (time.perf_counter() - t0) / len(images)

    # End to end: decode, resize, backbone, patch features, both bank searches, knowledge, mapper, top-k.
    # A fresh cache so that every image really goes through the backbone.
    model.features = FeatureStore(cfg, tmp / "features-e2e", allow_random_weights=args.random_weights,
                                  batch_size=args.batch)
    model.features._extractor = fe
    t0 = time.perf_counter()
    model.predict(test, batch_size=args.batch, progress_bar=False)
    e2e_s = (time.perf_counter() - t0) / len(test)
    # Cached: features already on disk (what retrains and pool rescoring pay).
    t0 = time.perf_counter()
    model.predict(test, batch_size=args.batch, progress_bar=False)
    cached_s = (time.perf_counter() - t0) / len(test)
    print(f"backbone forward alone: {1 / backbone_s:7.1f} img/s ({1000 * backbone_s:.1f} ms/img)  [baseline]")
    print(f"end-to-end inference:   {1 / e2e_s:7.1f} img/s ({1000 * e2e_s:.1f} ms/img)  = {e2e_s / backbone_s:.2f}x backbone")
    print(f"scoring cached features:{1 / cached_s:7.1f} img/s ({1000 * cached_s:.1f} ms/img)  = {cached_s / backbone_s:.2f}x backbone")
    print_breakdown(model, test, args.batch, e2e_s)
    print(f"peak memory (RSS): {peak_rss_mb():.0f} MB")
    timings = model.fitted().timings
    print(f"training from cached features vs fit: banks {timings['banks']:.1f} s, "
          f"scorer (mapper or classifiers) {timings['train']:.1f} s, features {timings['features']:.1f} s")


if __name__ == "__main__":
    main()
