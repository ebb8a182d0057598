"""Pure image helpers for the UI and `dmad predict`: heat-map overlays, crops, boxes and masks (numpy,
PIL and the engine's heat map).

Kept free of Streamlit so they are cheap to test and to cache.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
import PIL.Image
from PIL import ImageDraw

from dmad_core.config import DMADConfig
from dmad_core.model import anomaly_map

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, x1/y1 exclusive

# Anchors of an inferno-like colour scale: dark for ordinary patches, bright yellow for the hottest.
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
_LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).round().astype(np.uint8)
BOX_COLOUR = (0, 229, 255)
MASK_COLOUR = (0, 200, 255)


def load_rgb(path: str) -> np.ndarray:
    """The image file as RGB uint8 (H, W, 3); grey or RGBA files are converted."""
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def upsample(grid: np.ndarray, width: int, height: int, config: DMADConfig | None = None) -> np.ndarray:
    """The patch grid as the model's heat map at (height, width): bilinear, smoothed with the sigma of
    ``config`` (the version's engine configuration; None: the defaults), the same map the pixel threshold
    and the Label Studio pre-annotations use. The backbone sees the whole image resized, so the grid
    covers all of it."""
    return anomaly_map(grid, (height, width), config or DMADConfig())


def normalise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Scores mapped to [0, 1] on a fixed scale, so one colour means one score on every image (a
    per-image min-max would make every image look hot)."""
    if hi <= lo:
        return (np.asarray(values) >= hi).astype(np.float32)
    return np.clip((np.asarray(values, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def colormap(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as RGB uint8 colours."""
    return _LUT[np.clip(np.asarray(t) * 255, 0, 255).astype(np.uint8)]


def heat_overlay(rgb: np.ndarray, grid: np.ndarray, lo: float, hi: float, opacity: float = 0.6,
                 config: DMADConfig | None = None) -> np.ndarray:
    """The image with the heat map blended in; each pixel's alpha grows with its score, so ordinary
    regions stay visible and only anomalous ones are tinted."""
    h, w = rgb.shape[:2]
    return _blend(rgb, normalise(upsample(grid, w, h, config), lo, hi), opacity)


def _blend(rgb: np.ndarray, t: np.ndarray, opacity: float) -> np.ndarray:
    """Colour-mapped scores over the image; alpha follows sqrt(t) so mid-level anomalies still show."""
    alpha = (float(opacity) * np.sqrt(t))[:, :, None]
    out = rgb.astype(np.float32) * (1.0 - alpha) + colormap(t).astype(np.float32) * alpha
    return out.round().astype(np.uint8)


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, opacity: float = 0.45,
                 colour: Sequence[int] = MASK_COLOUR) -> np.ndarray:
    """The image with a boolean mask tinted in `colour`."""
    out = rgb.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = out[m] * (1.0 - opacity) + np.asarray(colour, dtype=np.float32) * opacity
    return out.round().astype(np.uint8)


def draw_boxes(rgb: np.ndarray, boxes: Iterable[Sequence[float]], colour: Sequence[int] = BOX_COLOUR,
               labels: Sequence[str] | None = None) -> np.ndarray:
    """A copy of the image with rectangle outlines (line width follows the image size)."""
    canvas = PIL.Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(max(canvas.size) / 256))
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=tuple(colour), width=line)
        if labels is not None and i < len(labels):
            draw.text((x0 + line + 1, y0 + line), labels[i], fill=tuple(colour))
    return np.asarray(canvas)


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """A box as integers inside the image, at least one pixel wide and high."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0 = int(np.clip(np.floor(min(x0, x1)), 0, width - 1))
    y0 = int(np.clip(np.floor(min(y0, y1)), 0, height - 1))
    x1 = int(np.clip(np.ceil(max(x0 + 1, x1)), x0 + 1, width))
    y1 = int(np.clip(np.ceil(max(y0 + 1, y1)), y0 + 1, height))
    return x0, y0, x1, y1


def context_box(box: Sequence[float], width: int, height: int, margin: float = 0.5, min_side: int = 64) -> Box:
    """The region to crop around a patch: the box grown by `margin` of its size on each side (and to
    at least `min_side`), shifted to stay inside the image. Inspectors judge a defect by its
    surroundings, so a bare patch is too little."""
    x0, y0, x1, y1 = clip_box(box, width, height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side_w = min(width, max(min_side, round((x1 - x0) * (1 + 2 * margin))))
    side_h = min(height, max(min_side, round((y1 - y0) * (1 + 2 * margin))))
    left = int(np.clip(round(cx - side_w / 2), 0, width - side_w))
    top = int(np.clip(round(cy - side_h / 2), 0, height - side_h))
    return left, top, left + side_w, top + side_h


def thumbnail(rgb: np.ndarray, grid: np.ndarray, box: Sequence[float], lo: float, hi: float,
              opacity: float = 0.5, size: int = 192) -> np.ndarray:
    """The crop shown in the Review grid: the patch with context, heat map blended, the patch outlined,
    resized so its longer side is `size`."""
    h, w = rgb.shape[:2]
    cx0, cy0, cx1, cy1 = context_box(box, w, h)
    px0, py0, px1, py1 = clip_box(box, w, h)
    # The heat map is upsampled for the whole image and then cut, so the crop matches the full view.
    t = normalise(upsample(grid, w, h)[cy0:cy1, cx0:cx1], lo, hi)
    crop = _blend(rgb[cy0:cy1, cx0:cx1], t, opacity)
    crop = draw_boxes(crop, [(px0 - cx0, py0 - cy0, px1 - cx0, py1 - cy0)])
    scale = size / max(crop.shape[:2])
    new_size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    return np.asarray(PIL.Image.fromarray(crop).resize(new_size, PIL.Image.BILINEAR))


def to_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes: a tenth of the raw array, which is what the crop cache keeps."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
