"""Fixtures for the Label Studio integration tests: one real server per test session.

The `labelstudio` fixture is registered once, in tests/conftest.py, so that all modules share one server
per session: do not import it into a test module (a fixture imported into a module is registered for that
module, and would start a second server). Import the helpers as usual. The tests skip, with the reason,
when no `label-studio` executable can be found.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from annotation.server import LabelStudioServer, find_label_studio_bin
from app.home_folder import Home
from app.services.labelstudio.home import label_studio_server
from dmad_core.errors import UserError
from tests.processes import free_port


def label_studio_bin_or_skip() -> Path:
    try:
        return find_label_studio_bin()
    except UserError as exc:
        pytest.skip(f"no Label Studio to test against: {exc}")


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio in a fresh home on a free port, stopped at the end of the session."""
    executable = label_studio_bin_or_skip()
    home = Home.at(tmp_path_factory.mktemp("labelstudio-home"))
    home.create()
    server = label_studio_server(home, port=free_port(), bin=executable)
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class SampleImage:
    image_id: int
    path: Path
    content_hash: str
    height: int
    width: int


def write_test_images(folder: Path, count: int, height: int = 200, width: int = 310) -> list[SampleImage]:
    """Random non-square RGB PNGs, ids 1..count."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(1, count + 1):
        rng = np.random.default_rng(i)
        path = folder / f"img{i}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        images.append(SampleImage(i, path, hashlib.sha256(path.read_bytes()).hexdigest(), height, width))
    return images


def blob_mask(height: int, width: int, seed: int) -> np.ndarray:
    """An irregular defect-like mask (two overlapping ellipses and a thin scratch)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(2):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(8, 30), rng.uniform(8, 45)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    row = int(rng.integers(5, height - 5))
    mask[row, int(width * 0.1) : int(width * 0.9)] = True
    return mask
