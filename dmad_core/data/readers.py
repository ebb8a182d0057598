"""Read anomaly-detection datasets in the layouts users download, without converting them.

Three layouts are recognised from the folder structure of one category:

- ``mvtec_ad``: ``<cat>/train/good/*.png``, ``<cat>/test/<defect or good>/*.png`` and, when present,
  ``<cat>/ground_truth/<defect>/<name>_mask.png``.
- ``mvtec_3d_ad`` (RGB part): ``<cat>/train/good/rgb/*.png`` (and ``<cat>/validation/good/rgb``, read as
  train), ``<cat>/test/<defect>/rgb/*.png`` with masks in ``<cat>/test/<defect>/gt/<same name>``.
- ``folder``: any folder of images (subfolders included); everything is a normal training image.

Corrupt files are reported in :attr:`CategoryDataset.skipped` and logged instead of stopping a whole
ingest for one bad file.

Example:
    >>> ds = read_category("../shared/data/mvtec_3d_ad/tire")  # doctest: +SKIP
    >>> ds.layout, len(ds.train), ds.has_masks  # doctest: +SKIP
    ('mvtec_3d_ad', 100, True)
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS: tuple[str, ...] = ("mvtec_ad", "mvtec_3d_ad", "folder")
GOOD = "good"

Split = Literal["train", "test"]
Layout = Literal["mvtec_ad", "mvtec_3d_ad", "folder"]


class CorruptImageError(ValueError):
    """An image file exists but cannot be decoded (truncated, not an image, unsupported)."""


class ImageTooLarge(CorruptImageError):
    """An image has more pixels than the caller accepts (checked on the header, before decoding)."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a category, with its label and (if the dataset has one) its ground-truth mask."""

    path: Path
    category: str
    split: Split
    label: int  # 0 normal, 1 defective
    defect_type: str  # "good" or the defect folder's name
    mask_path: Path | None = None  # None: no mask file; a normal image without a mask is all zero


@dataclass
class CategoryDataset:
    """All images of one category as read from disk, plus the files that could not be read."""

    name: str
    root: Path
    layout: Layout
    train: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """Whether pixel-level evaluation is possible (some test image has a mask file)."""
        return any(r.mask_path is not None for r in self.test)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect folder names of the test split ("good" included when present)."""
        return sorted({r.defect_type for r in self.test})


# --------------------------------------------------------------------------------------------------
# Single files


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """Image files of ``folder`` (sorted, extension case-insensitive, hidden files such as macOS
    ``._x.png`` ignored); an absent folder gives an empty list."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not p.name.startswith(".")
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts[:-1])
    )


def verify_image(path: str | Path) -> str | None:
    """None when the file decodes completely, else a short reason (used to report skipped files)."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: Image.verify() does not notice truncated pixel data
            if im.width == 0 or im.height == 0:
                return "image has zero size"
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"unreadable image ({type(exc).__name__}: {exc})"
    return None


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode ``path``, turning every decoder failure into CorruptImageError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except Exception as exc:
        raise CorruptImageError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


# Decoded by OpenCV: 1.46x faster than Pillow on MVTec's 8-bit PNGs here (7.9 vs 11.5 ms a 900 x 900 image),
# pixel for pixel the same (tests/unit/test_readers.py). JPEG stays with Pillow: OpenCV decodes a truncated
# JPEG without an error (grey rows), where Pillow refuses it; 16-bit, palette and other modes too (their
# conversion rules are ours, _to_rgb_uint8).
_OPENCV_FORMATS = {"PNG", "BMP"}
_OPENCV_MODES = {"RGB", "RGBA", "L"}


def decode_image(data: bytes, name: str = "upload", max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (an upload, or a file's bytes) as RGB uint8 ``HxWx3``.

    ``max_pixels`` is checked on the header, before any pixel is decoded, so an oversized image (or a
    decompression bomb) costs nothing. CorruptImageError for bytes that do not decode, ImageTooLarge
    (a CorruptImageError) for too many pixels.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # checked below, with a clear error: PIL's own warning is noise
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header only
                width, height = im.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over "
                                        f"the limit of {max_pixels / 1e6:.1f}")
                if im.format not in _OPENCV_FORMATS or im.mode not in _OPENCV_MODES:
                    im.load()
                    return _to_rgb_uint8(im)
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{name}: {_without_buffer(exc)}") from exc
    except Exception as exc:
        raise CorruptImageError(f"{name}: unreadable image ({type(exc).__name__}: {_without_buffer(exc)})") from exc
    quiet = cv2.getLogLevel()
    cv2.setLogLevel(2)  # errors only: a truncated file is reported below, not by OpenCV's warning on stderr
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    finally:
        cv2.setLogLevel(quiet)
    if bgr is None or bgr.shape[:2] != (height, width):
        raise CorruptImageError(f"{name}: unreadable image (the {width}x{height} pixel data does not decode)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _without_buffer(exc: Exception) -> str:
    """PIL's message without the in-memory buffer it names (``<_io.BytesIO object at 0x...>``)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)) or type(exc).__name__


def _to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """RGB uint8 array from any PIL mode; 16/32-bit and float data are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNG/TIFF (PIL opens them as "I;16" or "I"); convert("RGB") would clip at 255.
        arr = np.asarray(im).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    # Grayscale, palette, RGBA (alpha dropped), CMYK, 1-bit...: PIL's own conversion is right.
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Decode an image as RGB uint8 ``HxWx3``; with ``size``, resized (bilinear) to ``size x size``.

    Raises CorruptImageError for a file that cannot be decoded, FileNotFoundError for a missing one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptImageError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    arr = decode_image(data, str(path))
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(
            Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8
        )
    return arr


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a defect mask as bool ``HxW``: the one mask reader of the project (datasets' ground truth,
    annotated masks, benchmarks).

    The threshold rule: any value > 0 in any colour channel is defect (alpha ignored; palette images
    through their colours). MVTec 3D-AD uses 0/254, the annotation store 0/255, so "nonzero" is the one
    rule all of them agree on. With ``size`` = (H, W), resized nearest-neighbour so it stays binary.
    FileNotFoundError for a missing file, CorruptImageError for one that cannot be decoded."""
    path = Path(path)
    im = _open_decoded(path)
    if im.mode == "P":
        im = im.convert("RGB")
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[:, :, :3].max(axis=2)  # colour masks: any colour channel; alpha ignored
    mask = arr > 0
    if size is not None and mask.shape != tuple(size):
        h, w = size
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        mask = np.asarray(resized) > 0
    return mask


# --------------------------------------------------------------------------------------------------
# Layouts


def detect_layout(root: str | Path) -> Layout:
    """Which layout ``root`` (one category folder) is in; ValueError when none fits."""
    root = Path(root)
    accepted = (
        "accepted layouts: MVTec AD (<cat>/train/good/*.png, <cat>/test/<defect>/*.png, optional "
        "<cat>/ground_truth/<defect>/<name>_mask.png), MVTec 3D-AD RGB (<cat>/train/good/rgb/*.png, "
        "<cat>/test/<defect>/rgb/*.png, <cat>/test/<defect>/gt/*.png), or a plain folder of images "
        f"({', '.join(IMAGE_EXTENSIONS)})"
    )
    if (root / "train" / "good" / "rgb").is_dir():
        return "mvtec_3d_ad"
    if (root / "train" / "good").is_dir():
        return "mvtec_ad"
    # A partial MVTec tree read as a plain folder would turn its defect images into "normal" ones.
    if any((root / name).is_dir() for name in ("train", "test", "ground_truth", "validation")):
        raise ValueError(
            f"{root}: has train/test folders but no train/good folder, so its layout is unknown; {accepted}"
        )
    nested = [d.name for d in sorted(root.iterdir()) if d.is_dir() and (d / "train" / "good").is_dir()]
    if nested:
        raise ValueError(
            f"{root}: contains dataset categories ({', '.join(nested[:5])}); pass one category folder "
            f"at a time, e.g. {root / nested[0]}"
        )
    if list_images(root, recursive=True):
        return "folder"
    raise ValueError(f"{root}: no images found and no known dataset layout; {accepted}")


@dataclass(frozen=True)
class _Candidate:
    """An image found by a layout reader, before its files are checked for readability."""

    path: Path
    split: Split
    defect_type: str
    mask_path: Path | None = None


def _subfolders(folder: Path) -> list[Path]:
    """Sorted visible subfolders (so test defect types come in a stable order)."""
    if not folder.is_dir():
        return []
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of ``folder`` by stem (one directory listing instead of one stat per image)."""
    return {p.stem: p for p in list_images(folder)}


def _find_mvtec_ad(root: Path) -> list[_Candidate]:
    found = [_Candidate(p, "train", GOOD) for p in list_images(root / "train" / "good")]
    gt_root = root / "ground_truth"
    for defect_dir in _subfolders(root / "test"):
        defect = defect_dir.name
        masks = _mask_index(gt_root / defect)
        for path in list_images(defect_dir):
            mask = masks.get(f"{path.stem}_mask") or masks.get(path.stem)
            if mask is None and defect != GOOD and gt_root.is_dir():
                logger.warning("%s: no ground-truth mask under %s", path, gt_root / defect)
            found.append(_Candidate(path, "test", defect, mask))
    return found


def _find_mvtec_3d_ad(root: Path) -> list[_Candidate]:
    found = [
        _Candidate(p, "train", GOOD)
        for train_dir in (root / "train" / "good" / "rgb", root / "validation" / "good" / "rgb")
        for p in list_images(train_dir)
    ]
    for defect_dir in _subfolders(root / "test"):
        if not (defect_dir / "rgb").is_dir():
            logger.warning("%s: no rgb folder, ignored", defect_dir)
            continue
        masks = _mask_index(defect_dir / "gt")
        for path in list_images(defect_dir / "rgb"):
            mask = masks.get(path.stem)
            if mask is None and defect_dir.name != GOOD:
                logger.warning("%s: no ground-truth mask in %s", path, defect_dir / "gt")
            found.append(_Candidate(path, "test", defect_dir.name, mask))
    return found


def _find_folder(root: Path) -> list[_Candidate]:
    return [_Candidate(p, "train", GOOD) for p in list_images(root, recursive=True)]


def _problem(candidate: _Candidate) -> tuple[Path, str] | None:
    """The first unreadable file of a candidate (its image, then its mask) with the reason, or None."""
    reason = verify_image(candidate.path)
    if reason is not None:
        return candidate.path, reason
    if candidate.mask_path is not None:
        reason = verify_image(candidate.mask_path)
        if reason is not None:
            return candidate.mask_path, f"mask of {candidate.path.name}: {reason}"
    return None


def read_category(root: str | Path, log_skipped: bool = True) -> CategoryDataset:
    """Read one category folder in any accepted layout (detected from its structure).

    The category is named after the folder. Paths in the records are absolute. Unreadable images are
    left out and listed in ``skipped`` with the reason; ``log_skipped=False`` leaves reporting them to
    the caller (`dmad ingest` prints them once in its summary).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: a dataset category must be a folder")
    root = root.resolve()
    layout = detect_layout(root)
    finders = {"mvtec_ad": _find_mvtec_ad, "mvtec_3d_ad": _find_mvtec_3d_ad, "folder": _find_folder}
    candidates = finders[layout](root)
    # Decoding every file is the slow part of reading; PIL releases the GIL while decoding.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_problem, candidates))
    dataset = CategoryDataset(name=root.name, root=root, layout=layout)
    for candidate, problem in zip(candidates, problems, strict=True):
        if problem is not None:
            if log_skipped:
                logger.warning("skipping %s: %s", *problem)
            dataset.skipped.append(problem)
            continue
        record = ImageRecord(
            path=candidate.path,
            category=dataset.name,
            split=candidate.split,
            label=0 if candidate.defect_type == GOOD else 1,
            defect_type=candidate.defect_type,
            mask_path=candidate.mask_path,
        )
        (dataset.train if candidate.split == "train" else dataset.test).append(record)
    if dataset.skipped and log_skipped:
        logger.warning("%s: %d unreadable file(s) skipped", root, len(dataset.skipped))
    return dataset
