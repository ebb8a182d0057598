"""anomalib's PatchCore beside our model, with the same backbone weights, in one run (issue 20, item 3).

    .venv/bin/python benchmarks/peer_patchcore.py [--data DIR ...] [--coreset 0.01] [--neighbours 9]
        [--border zeros|image] [--seeds 0 1 2] [--cache DIR] [--json OUT.json]

The peer: ``anomalib.models.image.patchcore.torch_model.PatchcoreModel`` as anomalib builds it, with
EfficientNet-Lite0 layers 2 and 3 (timm ``out_indices``), our ImageNet weights loaded into its timm body
(the same tensors our ``offline`` preset uses), each image squashed to 256 x 256 and normalised as ours are,
one memory bank per class from every training image, anomalib's greedy coreset (``--coreset`` of the
patches) and its image score reweighted by ``--neighbours`` neighbours; its anomaly map as anomalib makes it
(upsampled to the input, then Gaussian sigma 4). Ours: the product's default configuration, ONE model for
every class, fitted on the same training images: the kNN baseline (PatchCore's nearest-neighbour distance on
our bank) and unsupervised DMAD. Every method is scored by the same function (``compute_class_metrics``:
image AUROC on the scores, pixel AUROC and PRO on the maps at 256 x 256 against the same masks).

anomalib is not a dependency of the product. Install it beside the environment (it runs offline: no
weights are downloaded, ``pre_trained=False`` and ours are loaded):
``.venv/bin/python -m pip install anomalib==2.7.0`` (or, leaving the environment as it is, ``pip install
--target DIR --no-deps anomalib==2.7.0 jsonargparse omegaconf lightning lightning_utilities torchmetrics kornia
kornia_rs einops FrEIA`` and ``PYTHONPATH=DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmad_core.backbone import FeatureExtractor  # noqa: E402
from dmad_core.config import DMADConfig  # noqa: E402
from dmad_core.data.readers import CategoryDataset, load_image, load_mask, read_category  # noqa: E402
from dmad_core.evaluation import EVAL_MAP_SIZE, class_metrics  # noqa: E402
from dmad_core.metrics import compute_class_metrics  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DATA = [SHARED / "mvtec_3d_ad" / "tire", SHARED / "mvtec_ad" / "bottle", SHARED / "kolektorsdd" / "commutator"]
METRICS = ("image_auroc", "pixel_auroc", "pro")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def import_anomalib():  # noqa: ANN201
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError as exc:
        raise SystemExit(f"peer_patchcore.py: anomalib is not importable ({exc}); install it as this file's "
                         "docstring says (it is not a dependency of the product)") from exc
    return PatchcoreModel


def peer_patchcore(ds: CategoryDataset, pipeline: FeatureExtractor, weights: dict, coreset: float, neighbours: int,
                   batch: int = 8, border: str = "zeros", seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """anomalib's PatchCore on one class: its metrics and seconds per phase. ``pipeline``: our extractor at square
    geometry, for its input pipeline only; ``weights``: our timm body's state dict; ``border``: "zeros" (anomalib's
    3 x 3 averaging counts the zero padding) or "image" (border cells averaged over the image only); ``seed``: its
    coreset's random first centre and projection."""
    import torch

    PatchcoreModel = import_anomalib()
    peer = PatchcoreModel(layers=list(pipeline.config.layers), backbone=pipeline.config.name, pre_trained=False,
                          num_neighbors=neighbours)
    if border == "image":
        peer.feature_pooler = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    missing, _ = peer.feature_extractor.feature_extractor.load_state_dict(weights, strict=False)
    if missing:
        raise SystemExit(f"peer_patchcore.py: anomalib's body lacks {len(missing)} of our tensors, e.g. {missing[:3]}")

    def batches(records):  # noqa: ANN001, ANN202
        for start in range(0, len(records), batch):
            yield pipeline.preprocess([load_image(r.path) for r in records[start:start + batch]])

    seconds = {}
    t0 = time.perf_counter()
    peer.train()  # anomalib 2.x: training-mode calls add each batch's patches to its embedding store
    with torch.no_grad():
        for x in batches(ds.train):
            peer(x)
    seconds["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the greedy coreset's random first centre
    np.random.seed(seed)  # its random projection draws from numpy's global generator (random_state=None)
    peer.subsample_embedding(coreset)
    seconds["coreset"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer.eval()
    scores, maps = [], []
    with torch.no_grad():
        for x in batches(ds.test):
            out = peer(x)  # an InferenceBatch: pred_score, anomaly_map
            scores += out.pred_score.reshape(-1).tolist()
            maps += list(out.anomaly_map.reshape(len(x), *x.shape[-2:]).numpy())
    seconds["test"] = time.perf_counter() - t0
    size = (EVAL_MAP_SIZE, EVAL_MAP_SIZE)
    masks = np.stack([load_mask(r.mask_path, size) if r.mask_path else np.zeros(size, bool) for r in ds.test])
    metrics = compute_class_metrics(np.array([r.label for r in ds.test]), np.array(scores), masks, np.stack(maps))
    return {m: metrics.to_dict()[m] for m in METRICS}, seconds


def ours(datasets: list[CategoryDataset], config: DMADConfig, cache: Path) -> tuple[dict, float]:
    """Our one model for every class: {class: {"knn": metrics, "dmad": metrics}} and the fit's seconds."""
    from dmad_core.model import DMAD, FeatureStore, ImageItem

    t0 = time.perf_counter()
    model = DMAD(config, FeatureStore(config, cache)).fit(
        [ImageItem.from_path(r.path, ds.name) for ds in datasets for r in ds.train], [])
    fit_s = time.perf_counter() - t0
    out = {}
    for ds in datasets:
        items = [ImageItem.from_path(r.path, ds.name) for r in ds.test]
        out[ds.name] = {method: {m: class_metrics(ds.test, preds, model).to_dict()[m] for m in METRICS}
                        for method, preds in (("knn", model.knn_predict(items)),
                                              ("dmad", model.predict(items, progress_bar=False)))}
    return out, fit_s


def table(result: dict) -> list[str]:
    lines = ["| class | anomalib PatchCore | our kNN | our unsupervised DMAD | kNN - anomalib | DMAD - anomalib |",
             "|---|---|---|---|---|---|"]
    rows = result["classes"]
    for name, r in {**rows, "mean": {k: {m: float(np.mean([rows[c][k][m] for c in rows])) for m in METRICS}
                                     for k in ("anomalib", "knn", "dmad")}}.items():
        cell = {k: " / ".join(f"{100 * r[k][m]:.2f}" for m in METRICS) for k in ("anomalib", "knn", "dmad")}
        diff = {k: " / ".join(f"{100 * (r[k][m] - r['anomalib'][m]):+.2f}" for m in METRICS) for k in ("knn", "dmad")}
        lines.append(f"| {name} | {cell['anomalib']} | {cell['knn']} | {cell['dmad']} | {diff['knn']} | {diff['dmad']} |")
    return lines


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", type=Path, default=DEFAULT_DATA, metavar="DIR")
    ap.add_argument("--coreset", type=float, default=0.01, help="anomalib's coreset share of the patches")
    ap.add_argument("--neighbours", type=int, default=9, help="anomalib's reweighting neighbours")
    ap.add_argument("--border", choices=["zeros", "image"], default="zeros",
                    help="anomalib's border cells: averaged with the zero padding (its own) or over the image only (ours)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="coreset seeds, ours and anomalib's; the table gives the mean over them")
    ap.add_argument("--cache", type=Path, help="our feature cache (default: a temporary folder)")
    ap.add_argument("--json", type=Path, metavar="OUT.json")
    args = ap.parse_args(argv)
    import_anomalib()  # fail before any work
    missing = [d for d in args.data if not d.is_dir()]
    if missing:
        raise SystemExit(f"peer_patchcore.py: no such folder: {', '.join(map(str, missing))}")
    datasets = [read_category(d) for d in args.data]
    config = DMADConfig.preset("offline")
    result: dict = {"settings": {"coreset": args.coreset, "neighbours": args.neighbours, "border": args.border,
                                 "our_border": config.backbone.border, "seeds": args.seeds,
                                 "data": [str(d) for d in args.data]}, "classes": {}, "per_seed": {}, "seconds": {}}
    square = FeatureExtractor(dataclasses.replace(config.backbone, geometry="square"), device="cpu")
    weights = square.eager_body().state_dict()  # built once, given to every class's peer
    with tempfile.TemporaryDirectory(prefix="dmad-peer-") as tmp:  # one feature cache for every seed
        for seed in args.seeds:
            seeded = dataclasses.replace(config, mapper=dataclasses.replace(config.mapper, seed=seed))  # our coreset's
            say(f"ours, seed {seed}: one model for every class")
            mine, result["seconds"][f"ours_fit_{seed}"] = ours(datasets, seeded, args.cache or Path(tmp))
            rows = result["per_seed"][str(seed)] = {}
            for ds in datasets:
                say(f"anomalib PatchCore, seed {seed}: {ds.name} ({len(ds.train)} training images, coreset "
                    f"{args.coreset:g})")
                peer, seconds = peer_patchcore(ds, square, weights, args.coreset, args.neighbours, border=args.border,
                                               seed=seed)
                rows[ds.name] = {"anomalib": peer, **mine[ds.name]}
                result["seconds"][f"{ds.name}_{seed}"] = seconds
                knn = mine[ds.name]["knn"]
                say(f"  {ds.name}: anomalib {100 * peer['image_auroc']:.1f} / {100 * peer['pixel_auroc']:.2f}, ours "
                    f"kNN {100 * knn['image_auroc']:.1f} / {100 * knn['pixel_auroc']:.2f}")
    runs = list(result["per_seed"].values())
    result["classes"] = {ds.name: {k: {m: float(np.mean([r[ds.name][k][m] for r in runs])) for m in METRICS}
                                   for k in ("anomalib", "knn", "dmad")} for ds in datasets}
    print("\n".join(table(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
