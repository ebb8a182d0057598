"""The project helpers that need no server: labelling config, task payloads, image URLs, heat maps."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from annotation.project import BRUSH_NAME, IMAGE_NAME, VERDICT_NAME, TaskItem, image_url_for, label_config, task_payload
from annotation.rle import rle_to_mask
from dmad_core.preannotation import heatmap_mask
from dmad_core.errors import UserError


def test_label_config_structure() -> None:
    root = ET.fromstring(label_config(["scratch", 'odd "name" <&>']))
    image = root.find("Image")
    assert image is not None and image.get("name") == IMAGE_NAME and image.get("value") == "$image"
    assert image.get("zoom") == "true"
    brush = root.find("BrushLabels")
    assert brush is not None and brush.get("name") == BRUSH_NAME and brush.get("toName") == IMAGE_NAME
    assert [label.get("value") for label in brush.findall("Label")] == ["scratch", 'odd "name" <&>']
    verdict = root.find("Choices")
    assert verdict is not None and verdict.get("name") == VERDICT_NAME and verdict.get("choice") == "single"
    assert [c.get("value") for c in verdict.findall("Choice")] == ["normal", "defect"]
    shown = " ".join(h.get("value", "") for h in root.findall("Header"))
    for field in ("$image_id", "$category", "$score", "$model_version"):
        assert field in shown
    assert "$content_hash" not in shown  # 64 hex digits say nothing to an inspector
    # the labels and the verdict come before the image, so they are in view at 1400 x 1000
    order = [child.tag for child in root]
    assert order.index("BrushLabels") < order.index("Image") and order.index("Choices") < order.index("Image")


@pytest.mark.parametrize("labels", [[], ["a", "a"], ["a", " "]])
def test_bad_labels_are_refused(labels: list[str]) -> None:
    with pytest.raises(UserError):
        label_config(labels)


def test_image_url_only_from_a_content_hash() -> None:
    assert image_url_for("http://127.0.0.1:8765/", "ab" * 32) == f"http://127.0.0.1:8765/images/{'ab' * 32}"
    for bad in ("../etc/passwd", "AB" * 32, "ab/cd" * 4, ""):
        with pytest.raises(ValueError):
            image_url_for("http://127.0.0.1:8765", bad)


def _item(mask: np.ndarray | None, height: int = 20, width: int = 33, percentile: float | None = 0.75) -> TaskItem:
    return TaskItem(image_id=3, content_hash="ab" * 32, category="bottle", image_url="http://x/images/ab",
                    width=width, height=height, score=4.7591, model_version="v0002", heatmap_mask=mask,
                    normal_percentile=percentile)


def test_task_payload_carries_ids_and_the_mask_as_a_prediction() -> None:
    mask = np.zeros((20, 33), dtype=bool)
    mask[4:9, 10:30] = True
    payload = task_payload(_item(mask), label="scratch")
    assert payload["data"] == {"image": "http://x/images/ab", "image_id": 3, "content_hash": "ab" * 32,
                               "category": "bottle", "score": 4.759, "normal_percentile": 0.75,
                               "model_version": "v0002"}
    (prediction,) = payload["predictions"]
    # Label Studio shows a prediction's score as a percentage: the percentile, never the raw anomaly score
    assert prediction["model_version"] == "v0002" and prediction["score"] == 0.75
    assert "score" not in task_payload(_item(mask, percentile=None))["predictions"][0]
    (result,) = prediction["result"]
    assert result["value"]["brushlabels"] == ["scratch"]
    assert np.array_equal(rle_to_mask(result["value"]["rle"], 20, 33), mask)


def test_task_payload_without_mask_or_with_an_empty_one() -> None:
    assert task_payload(_item(None))["predictions"][0]["result"] == []
    assert task_payload(_item(np.zeros((20, 33), dtype=bool)))["predictions"][0]["result"] == []


def test_task_payload_refuses_unthresholded_or_misfitting_maps() -> None:
    with pytest.raises(ValueError, match="thresholded"):
        task_payload(_item(np.random.default_rng(0).random((20, 33))))
    with pytest.raises(ValueError, match="mask is 20x33 but the image is 33x20"):
        task_payload(_item(np.ones((33, 20), dtype=bool)))


def test_heatmap_mask_covers_the_whole_image() -> None:
    grid = np.zeros((32, 32), dtype=np.float16)  # a model's grid
    grid[:8, :8] = 1.0  # the top-left eighth of each side
    mask = heatmap_mask(grid, 120, 200, 0.5)
    assert mask.shape == (120, 200)
    ys, xs = np.nonzero(mask)
    assert ys.max() < 120 // 4 + 2 and xs.max() < 200 // 4 + 2 and mask[0, 0]
    assert not heatmap_mask(np.zeros((32, 32)), 120, 200, 0.5).any()


def test_tasks_refine_masks_with_grabcut_only_for_the_classes_that_chose_it(tmp_path) -> None:  # noqa: ANN001
    """Label Studio's tasks read the version's ``mask_grabcut``: a chosen class gets the mask GrabCut makes from
    the image's pixels (what ``heatmap_mask(..., image=)`` gives, so ``dmad serve`` agrees); another class,
    or a chosen one whose file is gone, the heat map's own mask."""
    import PIL.Image

    from app.services.labelstudio.tasks import task_items
    from db.models import Category, Image, ModelVersion, PoolScore
    from dmad_core.data.readers import load_image

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(200, 6, (96, 128)), 0, 255).astype(np.uint8)
    pixels[46:50, 52:78] = 40  # a dark crack on a bright surface
    path = tmp_path / "part.png"
    PIL.Image.fromarray(pixels).save(path)
    grid = np.zeros((12, 16), np.float16)
    grid[5:7, 7:9] = 1.0  # the model's blurred view of it
    version = ModelVersion(name="v0002", config={"pixel_threshold": 0.2, "mask_peak_shares": {"bottle": 0.5},
                                                 "mask_grabcut": ["bottle"]})

    def row(image_id: int, category: str, file: str) -> PoolScore:
        image = Image(id=image_id, content_hash=f"{image_id:064x}", path=file, width=128, height=96,
                      category=Category(name=category))
        return PoolScore(image=image, score=1.0, patch_map=grid.tobytes(), map_shape=[12, 16])

    chosen, other, gone = task_items(version, [row(1, "bottle", str(path)), row(2, "tire", str(path)),
                                               row(3, "bottle", str(tmp_path / "missing.png"))], "http://x")
    plain = heatmap_mask(grid, 96, 128, 0.2, peak_share=0.5)
    refined = heatmap_mask(grid, 96, 128, 0.2, peak_share=0.5, image=load_image(path))
    assert not np.array_equal(plain, refined) and refined.sum() < plain.sum()
    assert np.array_equal(chosen.heatmap_mask, refined)
    assert np.array_equal(other.heatmap_mask, plain) and np.array_equal(gone.heatmap_mask, plain)
