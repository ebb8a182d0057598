"""A trained home on tiny synthetic data, built once per test session through the real CLI, and a
fresh copy of it for each test that changes it (a retrain takes seconds; a first training a minute).

Import what you use into a test module (`from tests.loop_fixtures import trained_home, trained_home_template`).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.cli import main as dmad
from app.home_folder import Home
from dmad_core.data.synthetic import make_synthetic_category

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = (("tiles", "grid"), ("fabric", "weave"))
_READY = "READY"


@dataclass(frozen=True)
class LoopHome:
    home: Home
    data: Path  # parent of the category folders

    @property
    def args(self) -> list[str]:
        return ["--home", str(self.home.root)]


def tiny_dataset(root: Path) -> list[Path]:
    """Two categories, 26 pool images each (10 normal, 16 defective with masks)."""
    return [make_synthetic_category(root, name, n_train=12, n_test_good=10, n_test_defect=16, texture=texture,
                                    seed=3) for name, texture in CATEGORIES]


def run_cli(*argv: str) -> int:
    return dmad([str(a) for a in argv])


def cli_process(*argv: str, **popen) -> subprocess.Popen:
    """`dmad ...` in its own process (for the tests that kill it)."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", *map(str, argv)], cwd=ROOT, **popen)


def copy_home(src: LoopHome, dest: Path) -> LoopHome:
    """A copy of a home; version folders are absolute in the database, so they are rewritten."""
    shutil.copytree(src.home.root, dest)
    with sqlite3.connect(dest / "dmad.db") as db:
        db.execute("UPDATE model_versions SET folder = replace(folder, ?, ?)", (str(src.home.root), str(dest)))
    return LoopHome(Home.at(dest), src.data)


@pytest.fixture(scope="session")
def trained_home_template(tmp_path_factory: pytest.TempPathFactory) -> LoopHome:
    """Trained once per test session: every module that imports this fixture gets its own fixture
    instance, so the folder under the session's base temp is what they share (marked when complete)."""
    root = tmp_path_factory.getbasetemp() / "loop-template"
    loop = LoopHome(Home.at(root / "home"), root / "data")
    if not (root / _READY).exists():
        shutil.rmtree(root, ignore_errors=True)
        folders = tiny_dataset(root / "data")
        assert run_cli("init", *loop.args, "--train-epochs", 2, "--retrain-epochs", 1) == 0
        assert run_cli("ingest", *loop.args, *folders) == 0
        assert run_cli("train", *loop.args) == 0
        (root / _READY).touch()
    return loop


@pytest.fixture
def trained_home(trained_home_template: LoopHome, tmp_path: Path) -> LoopHome:
    return copy_home(trained_home_template, tmp_path / "home")
