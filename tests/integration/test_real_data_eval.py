"""A reduced but real `dmad eval` on the shared MVTec data: tire (MVTec 3D-AD RGB, with masks) and bottle
(MVTec AD, image labels only) in ONE model, DTD textures as outliers, the offline backbone.

Reduced so that it takes a few minutes on a 2-core CPU: a seeded subset of each category's images (linked,
never copied, into a temporary folder that keeps the datasets' own layouts), a few DTD textures (for the
mapper), and few mapper epochs. The default scorer (kNN + defect classifiers) and the paper's mapper are both
run. The full protocol's figures are in docs/results.md.

Skipped, with the reason, where ../shared/data is absent.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from app.cli import main as dmad_main
from dmad_core.metrics import METRIC_NAMES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _link_subset(src_root: Path, dst_root: Path, folder: str, n: int, rng: np.random.Generator,
                 with_gt: bool = False) -> None:
    """Links n seeded images of ``src_root/folder`` (and, for MVTec 3D-AD, their ``gt`` masks)."""
    images = sorted((src_root / folder).glob("*.png"))
    chosen = [images[i] for i in sorted(rng.choice(len(images), size=min(n, len(images)), replace=False))]
    (dst_root / folder).mkdir(parents=True, exist_ok=True)
    for p in chosen:
        (dst_root / folder / p.name).symlink_to(p)
        if with_gt:
            gt_src = p.parent.parent / "gt" / p.name
            gt_dst = dst_root / folder.replace("/rgb", "/gt")
            gt_dst.mkdir(parents=True, exist_ok=True)
            (gt_dst / p.name).symlink_to(gt_src)


@pytest.fixture(scope="module")
def reduced_data(tmp_path_factory, tire_dir: Path, bottle_dir: Path, dtd_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(0)
    tire = root / "tire"
    _link_subset(tire_dir, tire, "train/good/rgb", 60, rng)
    _link_subset(tire_dir, tire, "test/good/rgb", 12, rng, with_gt=True)
    for defect in ("contamination", "cut", "hole"):
        _link_subset(tire_dir, tire, f"test/{defect}/rgb", 8, rng, with_gt=True)
    bottle = root / "bottle"
    _link_subset(bottle_dir, bottle, "train/good", 60, rng)
    _link_subset(bottle_dir, bottle, "test/good", 8, rng)
    for defect in ("broken_large", "contamination"):
        _link_subset(bottle_dir, bottle, f"test/{defect}", 6, rng)
    dtd = root / "dtd"
    for texture in sorted(p.name for p in dtd_dir.iterdir() if p.is_dir())[:4]:
        dtd_tex = dtd / texture
        dtd_tex.mkdir(parents=True)
        for p in sorted(q for q in (dtd_dir / texture).iterdir() if q.is_file())[:6]:
            (dtd_tex / p.name).symlink_to(p)
    return {"tire": tire, "bottle": bottle, "dtd": dtd, "root": root}


def _run(data: dict[str, Path], setting: list[str], name: str) -> tuple[dict, list[dict], str]:
    out_json, out_csv = data["root"] / f"{name}.json", data["root"] / f"{name}.csv"
    rc = dmad_main(["eval", "--data", str(data["tire"]), str(data["bottle"]), "--outliers", str(data["dtd"]),
                    *setting, "--seed", "0", "--cache", str(data["root"] / "cache"),
                    "--json", str(out_json), "--scores-out", str(out_csv)])
    assert rc == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return json.loads(out_json.read_text()), rows, name


@pytest.fixture(scope="module")
def unsupervised(reduced_data):
    return _run(reduced_data, ["--setting", "unsupervised"], "unsup")


@pytest.fixture(scope="module")
def semi(reduced_data, unsupervised):  # after unsupervised: the feature cache is warm
    return _run(reduced_data, ["--setting", "semi", "--anomalies-per-class", "3"], "semi")


@pytest.fixture(scope="module")
def mapper(reduced_data):
    return _run(reduced_data, ["--setting", "unsupervised", "--scorer", "mapper", "--geometry", "square",
                               "--epochs", "16"], "mapper")


def _check_schema_and_sklearn(result: dict, rows: list[dict], n_test: dict[str, int]) -> None:
    assert set(result) >= {"per_class", "mean", "method", "seconds", "config", "annotated", "baselines"}
    assert result["method"] == "dmad" and set(result["baselines"]) == {"knn"}
    assert set(result["seconds"]) >= {"features", "banks", "train", "predict"}
    assert all(v >= 0 for v in result["seconds"].values())
    for block in [result, result["baselines"]["knn"]]:
        assert set(block["per_class"]) == {"tire", "bottle"}
        for cat, metrics in block["per_class"].items():
            assert list(metrics) == list(METRIC_NAMES)
            for name, value in metrics.items():
                if cat == "bottle" and name.startswith(("pixel", "pro")):
                    assert value is None  # this copy of bottle has no masks
                else:
                    assert 0.0 <= value <= 1.0, (cat, name, value)
    assert {r["category"] for r in rows} == {"tire", "bottle"}
    for cat, n in n_test.items():
        cat_rows = [r for r in rows if r["category"] == cat]
        assert len(cat_rows) == n, cat  # every evaluated image once, held-out annotations excluded
        y = np.array([int(r["label"]) for r in cat_rows])
        s = np.array([float(r["score"]) for r in cat_rows])
        assert np.isfinite(s).all()
        # The CSV carries 6 decimals: AUROC from it equals the reported one (ties could only arise by rounding).
        assert roc_auc_score(y, s) == pytest.approx(result["per_class"][cat]["image_auroc"], abs=1e-3)
        assert average_precision_score(y, s) == pytest.approx(result["per_class"][cat]["image_ap"], abs=1e-3)


def test_unsupervised_eval_on_real_data(unsupervised):
    """Unsupervised, the default model is the kNN map in each class's unit: the same pixel ranking as the
    kNN baseline of the same run, so the same pixel AUROC and PRO (computed independently from each
    method's own heat maps)."""
    result, rows, _ = unsupervised
    _check_schema_and_sklearn(result, rows, {"tire": 12 + 3 * 8, "bottle": 8 + 2 * 6})
    tire, knn_tire = result["per_class"]["tire"], result["baselines"]["knn"]["per_class"]["tire"]
    assert result["config"]["score"]["scorer"] == "classifier" and result["config"]["backbone"]["geometry"] == "aspect"
    assert tire["pixel_auroc"] == pytest.approx(knn_tire["pixel_auroc"], abs=1e-4)
    assert tire["pro"] == pytest.approx(knn_tire["pro"], abs=1e-3)
    assert knn_tire["pixel_auroc"] > 0.9 and knn_tire["pro"] > 0.7
    assert tire["image_auroc"] > 0.6 and result["per_class"]["bottle"]["image_auroc"] > 0.9
    assert result["annotated"] == {}


def test_unsupervised_eval_with_the_mapper_on_real_data(mapper):
    result, rows, _ = mapper
    _check_schema_and_sklearn(result, rows, {"tire": 12 + 3 * 8, "bottle": 8 + 2 * 6})
    tire, knn_tire = result["per_class"]["tire"], result["baselines"]["knn"]["per_class"]["tire"]
    # Real defects on a real tyre, a reduced run: well above chance (0.5); an inverted map (the failure of the
    # paper's 0.015 noise on this backbone: pixel AUROC 0.30) or a collapsed one fails here. The kNN baseline
    # of the same run localises better: on the full protocol the unsupervised mapper loses ~6 points of
    # pixel AUROC to it, and more in this short run (docs/results.md, docs/method-notes.md).
    assert tire["pixel_auroc"] > 0.7 and tire["pro"] > 0.25
    assert tire["image_auroc"] > 0.6
    assert knn_tire["pixel_auroc"] > 0.9 and knn_tire["pro"] > 0.7
    assert result["per_class"]["bottle"]["image_auroc"] > 0.9
    assert result["annotated"] == {}


def test_semi_supervised_eval_on_real_data(semi, unsupervised):
    result, rows, _ = semi
    # Three masked tire defects are drawn and held out; bottle has no masks here, so nothing is drawn for it.
    assert len(result["annotated"]["tire"]) == 3 and result["annotated"]["bottle"] == []
    held_out = set(result["annotated"]["tire"])
    assert not held_out & {r["path"] for r in rows}
    _check_schema_and_sklearn(result, rows, {"tire": 12 + 3 * 8 - 3, "bottle": 8 + 2 * 6})
    tire = result["per_class"]["tire"]
    knn_tire = result["baselines"]["knn"]["per_class"]["tire"]
    assert tire["pixel_auroc"] > 0.85 and tire["image_auroc"] > 0.6
    # three annotations are too few to hold one out and still learn from the rest with any confidence,
    # but what the classifier adds may not cost the heat map more than a point against kNN
    assert tire["pixel_auroc"] > knn_tire["pixel_auroc"] - 0.01
    assert result["config"]["mapper"]["seed"] == 0
    assert set(result["scorer"]["weights"]) == {"tire"}  # bottle has no masks here: no classifier
