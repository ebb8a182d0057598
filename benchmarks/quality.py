"""The quality table of the product: kNN (PatchCore), DMAD unsupervised and semi-supervised with K = 1, 5, 10
masked defects per class, for the shared classes in ONE model and each class alone, over several seeds.

    .venv/bin/python benchmarks/quality.py [--data DIR ...] [--preset offline|resnet50] [--seeds 0 1 2]
        [--k 1 5 10] [--no-alone] [--cache DIR] [--write docs/results.md] [--json OUT.json]

Per seed and model (all classes together, then each class alone), the model is fitted once on the normal
training images (the seed drives the coreset, the validation split and the classifier's sampling) and then
walks into the semi-supervised setting as the product's loop does: ``DMAD.update`` with K masked defects per
class drawn as ``dmad eval`` draws them (seeded; removed from evaluation). After each step both the model
and the kNN baseline of the same model (its normal bank, image score = max) score the remaining test
images; metrics come from ``dmad_core.metrics`` (image AUROC, pixel AUROC at 256 px, PRO).

Prints a Markdown table (mean and spread over seeds, and the ratio to the kNN of the same run) and, with
``--write``, puts it into that file between ``<!-- quality:begin -->`` and ``<!-- quality:end -->``.
Progress goes to stderr. Nothing is written to the working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dmad_core.config import PRESETS, SCORERS, SELECTION_RULES, DMADConfig
from dmad_core.data.readers import CategoryDataset, load_image, load_mask, read_category
from dmad_core.evaluation import class_metrics, draw_annotated, outlier_items
from dmad_core.model import DMAD, DefectAnnotation, FeatureStore, ImageItem

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle", SHARED / "kolektorsdd" / "commutator"]
METRICS = ("image_auroc", "pixel_auroc", "pro")
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seeded(config: DMADConfig, seed: int) -> DMADConfig:
    return dataclasses.replace(config, mapper=dataclasses.replace(config.mapper, seed=seed),
                               classifier=dataclasses.replace(config.classifier, seed=seed))


def run_model(datasets: list[CategoryDataset], config: DMADConfig, store: FeatureStore, seed: int,
              ks: list[int], outliers: Path | None) -> tuple[dict, dict]:
    """{(setting, method, class): metrics} for one model over the settings, and seconds per phase."""
    normal = [ImageItem.from_path(r.path, ds.name) for ds in datasets for r in ds.train]
    t0 = time.perf_counter()
    model = DMAD(config, store).fit(normal, outlier_items(outliers, 120, seed, config.bank.outlier_images_max)
                                    if config.score.scorer == "mapper" else [])
    seconds = {"fit": time.perf_counter() - t0, "update": 0.0, "predict": 0.0}
    rows = {}
    # the kNN baseline depends on the normal bank only, which annotations do not change: scored once
    knn = {r.path: p for ds in datasets
           for r, p in zip(ds.test, model.knn_predict([ImageItem.from_path(r.path, ds.name) for r in ds.test]))}
    for k in [0, *ks]:
        drawn = {ds.name: draw_annotated(ds, k, seed) for ds in datasets}
        if k:
            t0 = time.perf_counter()
            model.update([DefectAnnotation(ImageItem.from_path(r.path, r.category),
                                           load_mask(r.mask_path, load_image(r.path).shape[:2]))
                          for recs in drawn.values() for r in recs])
            seconds["update"] += time.perf_counter() - t0
        setting = "unsupervised" if k == 0 else f"K={k}"
        t0 = time.perf_counter()
        for ds in datasets:
            held = {r.path for r in drawn[ds.name]}
            records = [r for r in ds.test if r.path not in held]
            items = [ImageItem.from_path(r.path, ds.name) for r in records]
            for method, preds in (("knn", [knn[r.path] for r in records]),
                                  ("dmad", model.predict(items, progress_bar=False))):
                m = class_metrics(records, preds, model).to_dict()
                rows[(setting, method, ds.name)] = {n: m[n] for n in METRICS}
        seconds["predict"] += time.perf_counter() - t0
        say(f"    {setting}: " + ", ".join(f"{ds.name} {100 * rows[(setting, 'dmad', ds.name)]['image_auroc']:.1f}"
                                       f" (kNN {100 * rows[(setting, 'knn', ds.name)]['image_auroc']:.1f})"
                                       for ds in datasets))
    return rows, seconds


def cell(values: list[float | None], spread: bool = True) -> str:
    """Mean over seeds in percent, with the standard deviation when there are several and ``spread``."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    mean = 100 * float(np.mean(vals))
    return f"{mean:.1f}" if len(vals) == 1 or not spread else f"{mean:.1f} ± {100 * float(np.std(vals)):.1f}"


def table(runs: dict, classes: list[str], seeds: list[int], settings: list[str], group: str) -> list[str]:
    """One Markdown table: a row per (class, method), I / P / PRO columns, the ratio to kNN of the same run."""
    lines = ["| class | model | I-AUROC | P-AUROC | PRO | x kNN (I / P / PRO) |",
             "|---|---|---|---|---|---|"]

    def values(setting: str, method: str, cls: str, metric: str) -> list[float | None]:
        if cls == "mean":
            per_seed = []
            for s in seeds:
                vs = [runs[(group, s)][(setting, method, c)][metric] for c in classes]
                vs = [v for v in vs if v is not None]
                per_seed.append(float(np.mean(vs)) if vs else None)
            return per_seed
        return [runs[(group, s)][(setting, method, cls)][metric] for s in seeds]

    for cls in [*classes, "mean"]:
        for setting, method, label in [("unsupervised", "knn", "kNN (PatchCore)"),
                                       *[(st, "dmad", f"DMAD {st}") for st in settings]]:
            cols = [cell(values(setting, method, cls, m)) for m in METRICS]
            ratios = []
            for m in METRICS:
                a, b = values(setting, method, cls, m), values(setting, "knn", cls, m)
                pairs = [(x, y) for x, y in zip(a, b) if x is not None and y]
                ratios.append(f"x{np.mean([x / y for x, y in pairs]):.3f}" if pairs else "-")
            lines.append(f"| {'**mean**' if cls == 'mean' else cls} | {label} | " + " | ".join(cols)
                         + f" | {' / '.join(ratios)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, metavar="DIR")
    ap.add_argument("--preset", choices=PRESETS, default="offline")
    ap.add_argument("--scorer", choices=SCORERS, default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--geometry", choices=["square", "aspect"], default=None,
                   help="square: images resized to 256 x 256; aspect: shorter side 256, proportions kept "
                        "(default: the preset's)")
    ap.add_argument("--border", choices=["zeros", "image"], default=None,
                    help="the patch averaging at the image's edge (default: the preset's; BackboneConfig.border)")
    ap.add_argument("--image-selection", choices=SELECTION_RULES,
                    default=None, help="how the classifier scorer chooses each class's image weight from the "
                                       "leave-one-out (default: ClassifierConfig.selection)")
    ap.add_argument("--k", nargs="+", type=int, default=[1, 5, 10], help="masked defects per class")
    ap.add_argument("--no-alone", action="store_true", help="skip each class in a model of its own")
    ap.add_argument("--outliers", type=Path, help="outlier textures for --scorer mapper (procedural if absent)")
    ap.add_argument("--cache", type=Path, help="feature cache (default: a temporary folder)")
    ap.add_argument("--write", type=Path, metavar="FILE.md", help="put the tables into this file (between markers)")
    ap.add_argument("--json", type=Path, metavar="OUT.json")
    args = ap.parse_args()
    missing = [d for d in args.data if not d.is_dir()]
    if missing:
        sys.exit(f"quality.py: no such folder: {', '.join(map(str, missing))} (the shared data lives in ../shared/data)")
    config = DMADConfig.preset(args.preset)
    if args.geometry:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, geometry=args.geometry))
    if args.border:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, border=args.border))
    if args.scorer:
        config = dataclasses.replace(config, score=dataclasses.replace(config.score, scorer=args.scorer))
    if args.image_selection:
        config = dataclasses.replace(config, classifier=dataclasses.replace(config.classifier,
                                                                              selection=args.image_selection))
    datasets = [read_category(d) for d in args.data]
    classes = [ds.name for ds in datasets]
    groups = {"together": datasets} | ({} if args.no_alone else {f"alone:{ds.name}": [ds] for ds in datasets})
    settings = ["unsupervised", *[f"K={k}" for k in args.k]]
    runs, seconds, t_start = {}, {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmad-quality-") as tmp:
        store_root = args.cache or Path(tmp)
        for seed in args.seeds:
            for group, members in groups.items():
                say(f"seed {seed}, {group} ({', '.join(ds.name for ds in members)})")
                store = FeatureStore(seeded(config, seed), store_root)
                runs[(group, seed)], seconds[(group, seed)] = run_model(members, seeded(config, seed), store, seed,
                                                                        args.k, args.outliers)
    total = time.perf_counter() - t_start
    together = table(runs, classes, args.seeds, settings, "together")
    lines = [f"Measured {time.strftime('%Y-%m-%d')} with `benchmarks/quality.py --preset {args.preset}"
             f" --seeds {' '.join(map(str, args.seeds))} --k {' '.join(map(str, args.k))}`"
             f" (scorer: {config.score.scorer}, image weight by {config.classifier.selection}). Mean ± standard"
             " deviation over the seeds, in percent; the last column is the mean over seeds of the ratio to the kNN of the same run and setting.",
             "", f"### All classes in one model ({', '.join(classes)})", "", *together]
    if not args.no_alone:
        lines += ["", "### Each class in a model of its own vs all together (mean over seeds; I / P / PRO)", "",
                  "| class | | " + " | ".join(f"{s} alone | {s} together" for s in ["kNN", *settings]) + " |",
                  "|---|" + "---|" * (1 + 2 * (1 + len(settings)))]
        for cls in classes:
            cells = []
            for setting, method in [("unsupervised", "knn"), *[(s, "dmad") for s in settings]]:
                for group in (f"alone:{cls}", "together"):
                    cells.append(" / ".join(cell([runs[(group, s)][(setting, method, cls)][m] for s in args.seeds], False)
                                            for m in METRICS))
            lines.append(f"| {cls} | | " + " | ".join(cells) + " |")
    per_fit = [v["fit"] for v in seconds.values()]
    per_update = [v["update"] / max(1, len(args.k)) for v in seconds.values()]
    lines += ["", f"Seconds: fit (banks and scorer, warm feature cache) {np.mean(per_fit):.1f} a model on average, "
                  f"update (one annotation set) {np.mean(per_update):.1f}, whole benchmark {total:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({f"{g}|{s}": {"|".join(k): v for k, v in r.items()}
                                         for (g, s), r in runs.items()}, indent=1))
    if args.write:
        write_between(args.write, text, BEGIN, END, "## Quality (`benchmarks/quality.py`)")
        say(f"wrote the tables into {args.write}")


def write_between(path: Path, text: str, begin: str, end: str, heading: str) -> None:
    """Put ``text`` into the Markdown file between its ``begin`` and ``end`` markers (replacing what was
    there), or append it under ``heading`` when the markers are not there yet."""
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old + ("\n\n" if old else "") + f"{heading}\n\n" + block + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
