"""Dataset readers on tiny trees built in tmp_path, image/mask decoding, and (integration) the real data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmad_core.data import (
    CorruptImageError,
    list_images,
    load_image,
    load_mask,
    read_category,
    verify_image,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _png(path: Path, array: np.ndarray | None = None, mode: str | None = None) -> Path:
    """Write a small image (a gradient by default) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        array = np.linspace(0, 255, 8 * 12 * 3).reshape(8, 12, 3).astype(np.uint8)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    """A real PNG cut in the middle of its pixel data (the header still opens)."""
    rng = np.random.default_rng(0)
    _png(path, rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))  # noise: incompressible
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, size=500, dtype=np.uint8).tobytes())
    return path


def _mask(path: Path, value: int = 255, shape: tuple[int, int] = (8, 12)) -> Path:
    m = np.zeros(shape, dtype=np.uint8)
    m[2:5, 3:7] = value
    return _png(path, m)


@pytest.fixture
def mvtec_ad_tree(tmp_path: Path) -> Path:
    cat = tmp_path / "widget"
    _png(cat / "train" / "good" / "000.png")
    _png(cat / "train" / "good" / "001.png")
    _truncated_png(cat / "train" / "good" / "002.png")
    _png(cat / "test" / "good" / "000.png")
    _png(cat / "test" / "crack" / "000.png")
    _png(cat / "test" / "crack" / "001.png")
    _random_bytes(cat / "test" / "crack" / "002.png")
    _mask(cat / "ground_truth" / "crack" / "000_mask.png")
    _mask(cat / "ground_truth" / "crack" / "001_mask.png")
    return cat


@pytest.fixture
def mvtec_3d_tree(tmp_path: Path) -> Path:
    cat = tmp_path / "gadget"
    _png(cat / "train" / "good" / "rgb" / "000.png")
    _png(cat / "train" / "good" / "rgb" / "001.png")
    (cat / "train" / "good" / "xyz").mkdir(parents=True)  # the 3D part is ignored
    (cat / "train" / "good" / "xyz" / "000.tiff").write_bytes(b"not read")
    _png(cat / "validation" / "good" / "rgb" / "000.png")
    _png(cat / "test" / "good" / "rgb" / "000.png")
    _mask(cat / "test" / "good" / "gt" / "000.png", value=0)  # all-zero gt of a good image: kept
    _png(cat / "test" / "hole" / "rgb" / "000.png")
    _mask(cat / "test" / "hole" / "gt" / "000.png", value=254)
    _png(cat / "test" / "hole" / "rgb" / "001.png")
    _truncated_png(cat / "test" / "hole" / "gt" / "001.png")  # corrupt mask: its image is skipped
    return cat


# --------------------------------------------------------------------------------------------------
# Layouts


def test_reads_mvtec_ad_and_reports_corrupt_files(mvtec_ad_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ds = read_category(mvtec_ad_tree)
    assert (ds.name, ds.layout, ds.root) == ("widget", "mvtec_ad", mvtec_ad_tree.resolve())
    assert [r.path.name for r in ds.train] == ["000.png", "001.png"]
    assert [(r.defect_type, r.path.name, r.label) for r in ds.test] == [
        ("crack", "000.png", 1),
        ("crack", "001.png", 1),
        ("good", "000.png", 0),
    ]
    skipped = {p.relative_to(mvtec_ad_tree.resolve()).as_posix() for p, _ in ds.skipped}
    assert skipped == {"train/good/002.png", "test/crack/002.png"}
    assert all("unreadable" in reason for _, reason in ds.skipped)
    assert not any(r.path.name == "002.png" for r in ds.train + ds.test)
    assert "002.png" in caplog.text
    assert ds.has_masks
    crack = ds.test[0]
    assert crack.mask_path == mvtec_ad_tree.resolve() / "ground_truth" / "crack" / "000_mask.png"
    assert ds.test[2].mask_path is None  # good MVTec AD images have no mask file
    assert all(r.path.is_absolute() and r.category == "widget" for r in ds.train + ds.test)
    assert {r.split for r in ds.train} == {"train"} and {r.split for r in ds.test} == {"test"}
    assert ds.defect_types == ["crack", "good"]


def test_mvtec_ad_without_ground_truth_has_no_masks(mvtec_ad_tree: Path) -> None:
    for mask in (mvtec_ad_tree / "ground_truth" / "crack").iterdir():
        mask.unlink()
    (mvtec_ad_tree / "ground_truth" / "crack").rmdir()
    (mvtec_ad_tree / "ground_truth").rmdir()
    ds = read_category(mvtec_ad_tree)
    assert not ds.has_masks
    assert all(r.mask_path is None for r in ds.test)
    assert len(ds.test) == 3


def test_reads_mvtec_3d_ad(mvtec_3d_tree: Path) -> None:
    ds = read_category(str(mvtec_3d_tree))
    assert (ds.name, ds.layout) == ("gadget", "mvtec_3d_ad")
    assert len(ds.train) == 3  # train/good/rgb (2) + validation/good/rgb (1)
    assert [(r.defect_type, r.label) for r in ds.test] == [("good", 0), ("hole", 1)]
    good, hole = ds.test
    assert good.mask_path is not None and good.mask_path.parent.name == "gt"
    assert not load_mask(good.mask_path).any()
    assert hole.mask_path == mvtec_3d_tree.resolve() / "test" / "hole" / "gt" / "000.png"
    assert ds.has_masks
    assert len(ds.skipped) == 1
    path, reason = ds.skipped[0]
    assert path.name == "001.png" and path.parent.name == "gt" and reason.startswith("mask of 001.png")


def test_reads_plain_folder_recursively(tmp_path: Path) -> None:
    root = tmp_path / "outliers"
    _png(root / "b.png")
    _png(root / "sub" / "a.JPG")
    _png(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    _random_bytes(root / "sub" / "broken.jpeg")
    ds = read_category(root)
    assert (ds.name, ds.layout) == ("outliers", "folder")
    assert [r.path.name for r in ds.train] == ["b.png", "a.JPG"]
    assert all((r.split, r.label, r.defect_type, r.mask_path) == ("train", 0, "good", None) for r in ds.train)
    assert ds.test == [] and not ds.has_masks
    assert [p.name for p, _ in ds.skipped] == ["broken.jpeg"]


def test_unknown_layouts_are_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="accepted layouts: MVTec AD .* MVTec 3D-AD .* plain folder"):
        read_category(empty)
    partial = tmp_path / "partial"  # test images but no train/good: not silently "normal"
    _png(partial / "test" / "crack" / "000.png")
    with pytest.raises(ValueError, match="no train/good folder"):
        read_category(partial)
    parent = tmp_path / "mvtec"  # a dataset root rather than one category
    _png(parent / "bottle" / "train" / "good" / "000.png")
    with pytest.raises(ValueError, match="pass one category folder"):
        read_category(parent)
    with pytest.raises(FileNotFoundError):
        read_category(tmp_path / "missing")


def test_list_images_sorted_and_case_insensitive(tmp_path: Path) -> None:
    for name in ("c.TIFF", "a.png", "B.Jpeg", "d.bmp", "e.tif", "f.jpg", "g.gif", "h.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["B.Jpeg", "a.png", "c.TIFF", "d.bmp", "e.tif", "f.jpg"]
    assert list_images(tmp_path / "nope") == []


# --------------------------------------------------------------------------------------------------
# Decoding


def test_load_image_converts_modes_to_rgb_uint8(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    img = load_image(_png(tmp_path / "grey.png", grey))
    assert img.dtype == np.uint8 and img.shape == (6, 8, 3)
    np.testing.assert_array_equal(img[:, :, 0], grey)
    np.testing.assert_array_equal(img[:, :, 2], grey)

    rgba = np.zeros((6, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 50
    img = load_image(_png(tmp_path / "rgba.png", rgba))
    assert img.shape == (6, 8, 3) and (img[..., 0] == 200).all()

    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1300).astype(np.uint16)  # up to 61100
    path = _png(tmp_path / "deep.png", deep)
    assert Image.open(path).mode.startswith("I")  # really stored as 16-bit
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (6, 8, 3)
    np.testing.assert_array_equal(img[:, :, 1], np.round(deep / 257).astype(np.uint8))  # rescaled, not clipped

    solid = Image.fromarray(np.full((4, 4, 3), (10, 120, 240), dtype=np.uint8))
    palette = solid.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "p.png")
    assert tuple(load_image(tmp_path / "p.png")[0, 0]) == (10, 120, 240)


def test_load_image_resizes_to_square(tmp_path: Path) -> None:
    img = load_image(_png(tmp_path / "x.png"), size=16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_corrupt_images_raise_and_verify_reports(tmp_path: Path) -> None:
    good = _png(tmp_path / "good.png")
    truncated = _truncated_png(tmp_path / "truncated.png")
    noise = _random_bytes(tmp_path / "noise.png")
    assert verify_image(good) is None
    assert "unreadable" in (verify_image(truncated) or "")
    assert "unreadable" in (verify_image(noise) or "")
    assert verify_image(tmp_path / "missing.png") == "file not found"
    for path in (truncated, noise):
        with pytest.raises(CorruptImageError, match=rf"{path.name}: unreadable image") as info:
            load_image(path)
        assert isinstance(info.value, ValueError)
    with pytest.raises(CorruptImageError):
        load_mask(noise)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")


def test_load_mask_binarises_and_resizes(tmp_path: Path) -> None:
    mask = load_mask(_mask(tmp_path / "m.png", value=254))
    assert mask.dtype == bool and mask.shape == (8, 12)
    assert mask.sum() == 12 and mask[2:5, 3:7].all()

    resized = load_mask(tmp_path / "m.png", size=(16, 20))  # (H, W), non-uniform factors
    assert resized.dtype == bool and resized.shape == (16, 20)
    assert set(np.unique(resized)) == {False, True}
    assert resized[4:10, 5:11].all() and not resized[:3].any()

    colour = np.zeros((5, 5, 3), dtype=np.uint8)
    colour[1, 1] = (0, 0, 128)  # a colour mask: any channel counts
    assert load_mask(_png(tmp_path / "c.png", colour)).sum() == 1


# --------------------------------------------------------------------------------------------------
# Real data (../shared/data), when present


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data folder {SHARED_DATA} is absent")
class TestRealData:
    def test_mvtec_3d_ad_tire(self) -> None:
        ds = read_category(SHARED_DATA / "mvtec_3d_ad" / "tire")
        assert (ds.name, ds.layout) == ("tire", "mvtec_3d_ad")
        assert (len(ds.train), len(ds.test), ds.skipped) == (100, 112, [])
        assert ds.has_masks and all(r.mask_path is not None for r in ds.test)
        assert set(ds.defect_types) == {"good", "contamination", "cut", "hole", "combined"}
        assert sum(r.label == 0 for r in ds.test) == 25
        defect = next(r for r in ds.test if r.label == 1)
        image, mask = load_image(defect.path), load_mask(defect.mask_path)  # type: ignore[arg-type]
        assert image.shape[:2] == mask.shape and mask.any()

    def test_mvtec_ad_bottle(self) -> None:
        ds = read_category(SHARED_DATA / "mvtec_ad" / "bottle")
        assert (ds.name, ds.layout) == ("bottle", "mvtec_ad")
        assert (len(ds.train), len(ds.test), ds.skipped) == (209, 83, [])
        # The shared copy ships the 63 ground-truth masks (one per defective test image, none for good ones).
        assert ds.has_masks
        with_mask = [r for r in ds.test if r.mask_path is not None]
        assert len(with_mask) == 63 and all(r.label == 1 for r in with_mask)
        assert set(ds.defect_types) == {"good", "broken_large", "broken_small", "contamination"}

    def test_dtd_texture_folder(self) -> None:
        textures = sorted(d for d in (SHARED_DATA / "dtd" / "images").iterdir() if d.is_dir())
        ds = read_category(textures[0])
        assert (ds.name, ds.layout, len(ds.train), ds.test) == (textures[0].name, "folder", 60, [])
        assert load_image(ds.train[0].path).dtype == np.uint8


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "JPEG"])
def test_decoding_is_pixel_for_pixel_pillows_whichever_library_decodes(tmp_path, mode, fmt) -> None:
    """OpenCV decodes 8-bit PNG and BMP (faster); the result must be what Pillow's conversion gives."""
    import io

    from dmad_core.data.readers import _to_rgb_uint8, decode_image

    rng = np.random.default_rng(3)
    if mode == "I;16":
        if fmt != "PNG":
            pytest.skip("16-bit is a PNG mode")
        im = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    if fmt == "JPEG" and mode not in ("RGB", "L"):
        pytest.skip("JPEG holds RGB and grey only")
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    data = buffer.getvalue()
    with Image.open(io.BytesIO(data)) as reference:
        expected = _to_rgb_uint8(reference)
    got = decode_image(data)
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3) and np.array_equal(got, expected)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    assert np.array_equal(load_image(path), expected)


def test_a_truncated_png_is_refused_not_half_decoded(tmp_path, capfd) -> None:
    import io

    from dmad_core.data.readers import decode_image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    with pytest.raises(CorruptImageError):
        decode_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "PNG input buffer is incomplete" not in capfd.readouterr().err  # said once, in the error, not by OpenCV


def test_refusals_are_quiet_and_name_no_buffer(recwarn) -> None:
    """Bytes no format recognises are named as such (not PIL's ``<_io.BytesIO object at 0x...>``), and an
    image over the caller's pixel limit is refused (413 in `dmad serve`) without PIL's DecompressionBombWarning."""
    import io

    from dmad_core.data.readers import ImageTooLarge, decode_image

    with pytest.raises(CorruptImageError) as unreadable:
        decode_image(b"not an image", "upload")
    assert "BytesIO" not in str(unreadable.value) and "cannot identify image file" in str(unreadable.value)
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 megapixels, over PIL's own warning level
    with pytest.raises(ImageTooLarge):
        decode_image(buffer.getvalue(), "upload", max_pixels=1_000_000)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
