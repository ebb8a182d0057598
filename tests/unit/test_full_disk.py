"""A full disk (issue 23): a trained home on a small tmpfs of its own, filled to the last byte.

Serve first answers from its spool's reserve (the line goes on, each image kept), then, the reserve spent,
refuses with 503 and Retry-After, saying the disk is full. Every other new write stops with a clear error
(a retrain fails with the OS's "No space left on device") and nothing half-written is left: no version
folder or row, no image, no feature file, no temporary file, under any name. When space returns, the
same service and the same home go on: what was spooled reaches the pool, the reserve is written again,
the next image is scored and stored, the retrain publishes its version.

Needs `mount -t tmpfs` (root in a sandbox that allows it); skips with the reason otherwise.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.api.scoring import ServeConfig, create_app
from app.services.loop.training import train_version
from db.models import Image, ModelVersion
from dmad_core.cache import FeatureCache
from tests.ui_fixtures import PreparedHome, copy_prepared, ui_template  # noqa: F401

TOKEN = "disk-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
SIZE_MB = 64


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A tmpfs of SIZE_MB mounted for this test, unmounted after."""
    mount = Path(tempfile.mkdtemp(prefix="dmad-full-disk-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a small tmpfs here (needs root and a sandbox that allows it): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
        mount.rmdir()


def fill(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s file system (the soak's fault, benchmarks/soak.py)."""
    from benchmarks.soak import fill_disk

    filler = fill_disk(folder)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def stray_files(root: Path) -> list[Path]:
    """Temporary or half-written files anywhere in the home."""
    return [p for p in root.rglob("*") if ".tmp" in p.name and p.name != "filler"]


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_full_disk_stops_new_writes_cleanly_and_the_home_recovers(small_disk: Path,
                                                                     ui_template: PreparedHome) -> None:  # noqa: F811
    prepared = copy_prepared(ui_template, small_disk / "home", full=True)
    home, sessions = prepared.home, prepared.sessions()
    reserve = 256 * 1024
    home.save_settings(replace(home.load_settings(), spool_reserve_bytes=reserve))
    with sessions() as session:
        versions_before = session.scalar(select(func.count(ModelVersion.id)))
        images_before = session.scalar(select(func.count(Image.id)))
    models_before = sorted(p.name for p in home.models_dir.iterdir())
    app = create_app(home, sessions, ServeConfig(poll_s=0.2), token=TOKEN)
    with TestClient(app) as client:
        assert (home.spool_dir / ".reserve").stat().st_size == reserve  # written when serve started
        filler = fill(small_disk)

        # serve: answered from the reserve while it lasts (each image spooled), then 503: never a 200
        # for an image it cannot keep
        statuses = []
        for seed in range(100, 200):
            r = client.post("/v1/score?category=tiles", content=png(seed), headers=AUTH)
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
        assert statuses[0] == 200 and not (home.spool_dir / ".reserve").exists(), statuses
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, r.text
        assert "disk" in r.json()["detail"] and "No space left" in r.json()["detail"]
        answered = statuses.count(200)
        assert len(list(home.spool_dir.glob("*.npz"))) <= answered  # spooled (or fed), never lost

        # a feature file: refused whole
        cache = FeatureCache(home.features_dir, "full-disk-test")
        with pytest.raises(OSError):
            cache.put("ab" * 32, np.ones((64, 64, 272), np.float32))
        assert "ab" * 32 not in cache

        # a retrain: no version published, no folder left
        with pytest.raises(OSError, match="No space left"):
            train_version(home, sessions, warm_start=True)
        with sessions() as session:
            assert session.scalar(select(func.count(ModelVersion.id))) == versions_before
            # only images answered 200 (fed while the freed reserve had room; the rest wait in the spool)
            fed = session.scalar(select(func.count(Image.id))) - images_before
            assert 0 <= fed <= answered and fed + len(list(home.spool_dir.glob("*.npz"))) >= answered
        assert sorted(p.name for p in home.models_dir.iterdir()) == models_before
        assert stray_files(home.root) == []

        # space returns: the spool reaches the pool and the reserve comes back; the same service scores
        # and keeps the next image, a retrain publishes
        filler.unlink()
        deadline = time.monotonic() + 60
        while (list(home.spool_dir.glob("*.npz")) or not (home.spool_dir / ".reserve").exists()) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not list(home.spool_dir.glob("*.npz")) and (home.spool_dir / ".reserve").stat().st_size == reserve
        with sessions() as session:
            assert session.scalar(select(func.count(Image.id))) == images_before + answered
        r = client.post("/v1/score?category=tiles", content=png(1), headers=AUTH)
        assert r.status_code == 200, r.text
    outcome = train_version(home, sessions, warm_start=True)
    with sessions() as session:
        rows = session.scalars(select(Image).where(Image.content_hash == r.json()["sha256"])).all()
        active = session.scalar(select(ModelVersion.name).where(ModelVersion.status == "active"))
    assert len(rows) == 1 and Path(rows[0].path).is_file()
    assert active == outcome.version and (home.models_dir / outcome.version).is_dir()
    assert stray_files(home.root) == []
