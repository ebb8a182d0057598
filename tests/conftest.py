"""Fixtures and hooks shared by the whole suite.

Real data: ``shared_data`` is ``<repo>/../shared/data`` (CI has that folder beside the checkout, see its
README); the tests that use it, or the dataset fixtures built on it, skip with a clear reason where it is
absent (a user's fresh machine), so the suite still passes there.

Other fixtures live in modules that a test module imports explicitly (``tests/db_fixtures.py``,
``tests/loop_fixtures.py``, ...). The one exception is the real Label Studio server (``labelstudio``): it
is registered here, so that every module that uses it shares one server per session.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.labelstudio_fixtures import labelstudio  # noqa: F401 (fixture: one server per session)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CHROMIUM = Path("/usr/bin/chromium")

_NO_SHARED_DATA = (
    f"../shared/data not found: real-data tests need the shared dataset folder beside the checkout "
    f"(looked for {SHARED_DATA})"
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line on what the environment offers, so a skipped test's cause is visible up front."""
    ls_bin = REPO_ROOT / ".venv-labelstudio" / "bin" / "label-studio"
    has_ls = ls_bin.is_file() or bool(os.environ.get("DMAD_LABEL_STUDIO_BIN")) or bool(shutil.which("label-studio"))
    has_chromium = CHROMIUM.is_file() or bool(shutil.which("chromium"))
    return [
        f"dmad: shared data {'present' if SHARED_DATA.is_dir() else 'absent'} ({SHARED_DATA}); "
        f"label-studio {'found' if has_ls else 'not found'}; chromium {'found' if has_chromium else 'not found'}"
    ]


def _subdir_or_skip(base: Path, *parts: str) -> Path:
    path = base.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"{path} not found: the shared dataset folder lacks {'/'.join(parts)}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data``, the real datasets; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(_NO_SHARED_DATA)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tire_dir(shared_data: Path) -> Path:
    """MVTec 3D-AD ``tire`` (RGB part): ``train/good/rgb``, ``test/<defect>/{rgb,gt}``."""
    return _subdir_or_skip(shared_data, "mvtec_3d_ad", "tire")


@pytest.fixture(scope="session")
def bottle_dir(shared_data: Path) -> Path:
    """MVTec AD ``bottle``: ``train/good``, ``test/<defect or good>``; image-level labels only."""
    return _subdir_or_skip(shared_data, "mvtec_ad", "bottle")


@pytest.fixture(scope="session")
def dtd_dir(shared_data: Path) -> Path:
    """DTD textures: ``dtd/images/<texture>/*.jpg`` (the outlier images)."""
    return _subdir_or_skip(shared_data, "dtd", "images")


@pytest.fixture(autouse=True)
def _keep_the_main_module():
    """Streamlit's AppTest runs a page as ``sys.modules["__main__"]`` and leaves it there; a later test that
    starts processes with multiprocessing's 'spawn' would then run that page again in each child."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
