"""`dmad export`: a version's whole scorer as one TorchScript or ONNX file that scores like the Python
scorer when run by torch.jit or onnxruntime alone (image scores to 1e-4, patch scores too but for rare
float16 rounding steps), and `dmad predict --model`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.services.line.exported import ExportedModel
from app.services.line.prediction import LineImage, LineModel
from db.models import Image
from tests.loop_fixtures import run_cli
from tests.ui_fixtures import PreparedHome, ui_home, ui_template  # noqa: F401


def pool_images(prepared: PreparedHome) -> list[LineImage]:
    with prepared.sessions()() as session:
        rows = session.execute(select(Image.path, Image.category_id).where(Image.role == "pool").order_by(Image.id)).all()
        from db.models import Category

        names = dict(session.execute(select(Category.id, Category.name)).all())
    return [LineImage.from_file(path, names[category_id]) for path, category_id in rows]


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_an_exported_scorer_scores_like_the_python_scorer(ui_home: PreparedHome, tmp_path: Path, suffix: str,  # noqa: F811
                                                           capsys) -> None:
    out = tmp_path / f"model{suffix}"
    assert run_cli("export", "--home", ui_home.home.root, out) == 0
    assert "v0002 ->" in capsys.readouterr().out and out.exists()
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed
    exported = ExportedModel.load(out)
    line = LineModel.load(ui_home.home, ui_home.sessions())
    assert exported.version == "v0002" and exported.categories == ["fabric", "tiles"]
    assert exported.thresholds == pytest.approx({c: t.threshold for c, t in line.thresholds.items()})
    images = pool_images(ui_home)
    # one image a call on both sides: a convolution's kernel choice depends on the batch, and a feature
    # that lands on the other side of a float16 rounding (the cache's precision) moves its patch by 1e-3
    expected = [line.score([image])[0] for image in images]
    for image, want in zip(images, expected, strict=True):
        grid, score, heat = exported.score(image.array, image.category)
        assert score == pytest.approx(want.score, abs=1e-4)
        assert grid.shape == want.patch_map.shape
        # patch scores: to 1e-4 of the grid's scale, but for the few patches where onnxruntime's convolutions
        # put a feature across a float16 rounding step from torch's (seen: 1 patch in 1024, 2.6e-4)
        scale = max(1.0, float(np.abs(want.patch_map).max()))
        gap = np.abs(grid - want.patch_map)
        assert np.mean(gap <= 1e-4 * scale) >= 0.99 and gap.max() <= 1e-3 * scale
        assert heat.shape == tuple(exported.meta["input_size"])


def test_predict_with_an_exported_model(ui_home: PreparedHome, tmp_path: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "model.onnx"
    assert run_cli("export", "--home", ui_home.home.root, out) == 0
    folder = ui_home.home.root.parent.parent / "ui-template" / "data" / "tiles" / "test"
    capsys.readouterr()
    assert run_cli("predict", "--home", tmp_path / "no-home-needed", "--model", out, folder) == 0
    exported = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert run_cli("predict", "--home", ui_home.home.root, folder) == 0
    python = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert exported.keys() == python.keys() and exported
    for path, r in exported.items():
        assert r["model_version"] == "v0002" and r["threshold_source"] == python[path]["threshold_source"]
        assert r["score"] == pytest.approx(python[path]["score"], abs=1e-4)
        assert r["decision"] == python[path]["decision"] or abs(r["score"] - r["threshold"]) < 1e-4
    assert run_cli("predict", "--home", ui_home.home.root, "--model", out, "--ingest", folder) == 2
    (tmp_path / "not-a-model.onnx").write_bytes(b"nonsense")
    assert run_cli("predict", "--home", ui_home.home.root, "--model", tmp_path / "not-a-model.onnx", folder) == 2
    assert "cannot load" in capsys.readouterr().err
