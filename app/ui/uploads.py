"""Images uploaded through the UI to be scored: stored under `<home>/uploads`, never in the working
directory, under a unique name so two uploads of `image.png` never collide."""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import PIL.Image

from app.home_folder import Home
from dmad_core.errors import Invalid

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def save_upload(home: Home, filename: str, data: bytes) -> Path:
    """Write the uploaded bytes to `<home>/uploads/<random>-<name>` and return the path; refuses
    bytes that do not decode as an image, so a worker never picks up a job that cannot succeed."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as exc:  # PIL raises several types; its message names an in-memory buffer, not the file
        kind = "empty file" if not data else f"{len(data):,} bytes that no image format recognises"
        raise Invalid(f"{filename} is not a readable image ({kind}): upload a PNG, JPEG, BMP or TIFF file") from exc
    name = _UNSAFE.sub("_", Path(filename).name).strip("._") or "upload"
    home.uploads_dir.mkdir(parents=True, exist_ok=True)
    path = home.uploads_dir / f"{uuid.uuid4().hex[:12]}-{name}"
    path.write_bytes(data)
    return path
