"""`dmad ingest` says what it did: dataset layouts and flat folders (with --category) are accepted, any
other folder is refused with the layouts it accepts, corrupt files are reported once, each class gets a
summary line, and finding nothing usable exits 2 with nothing stored. Also the CLI's quiet output: no
"next:" hints for steps the demo runs itself, and no faiss INFO line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from sqlalchemy import func, select

from app import supervisor
from app.home_folder import Home
from app.services.database import open_database
from db.models import Category, Image
from dmad_core.data import make_synthetic_category
from tests.loop_fixtures import run_cli


def _png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    assert run_cli("init", "--home", root) == 0
    return root


def _stored(home: Path) -> tuple[list[str], int]:
    with open_database(Home.at(home))() as session:
        return list(session.scalars(select(Category.name))), session.scalar(select(func.count(Image.id)))


def test_a_flat_folder_needs_category_and_one_stray_file_makes_no_class(home, tmp_path, capsys) -> None:
    stray = tmp_path / "Downloads"
    _png(stray / "IMG_0001.png")
    capsys.readouterr()
    assert run_cli("ingest", "--home", home, stray) == 2
    assert "--category NAME" in capsys.readouterr().err
    assert _stored(home) == ([], 0)

    washers = tmp_path / "washers-2026-12-01"
    for i in range(3):
        _png(washers / f"{i:03d}.png", seed=i)
    assert run_cli("ingest", "--home", home, washers, "--category", "washer") == 0
    out = capsys.readouterr().out
    assert "washer (folder): 3 normal training images, 0 pool images" in out and "0 skipped" in out
    assert _stored(home) == (["washer"], 3)


def test_a_folder_in_no_accepted_layout_is_refused_with_the_layouts(home, tmp_path, capsys) -> None:
    mixed = tmp_path / "bottle-photos"  # good/ and bad/ subfolders: reading it flat would call bad images normal
    _png(mixed / "good" / "000.png")
    _png(mixed / "bad" / "000.png", seed=1)
    capsys.readouterr()
    assert run_cli("ingest", "--home", home, mixed, "--category", "bottle") == 2
    err = capsys.readouterr().err
    assert "neither a dataset layout nor a flat folder" in err
    assert "MVTec AD" in err and "MVTec 3D-AD" in err and "--category NAME" in err
    assert _stored(home) == ([], 0)


def test_category_is_refused_for_a_dataset_layout(home, tmp_path, capsys) -> None:
    bottle = make_synthetic_category(tmp_path / "data", "bottle", n_train=2, n_test_good=1, n_test_defect=1, size=32)
    capsys.readouterr()
    assert run_cli("ingest", "--home", home, bottle, "--category", "vial") == 2
    assert "names its class after its folder" in capsys.readouterr().err
    assert _stored(home) == ([], 0)


def test_corrupt_files_are_reported_once_in_a_summary_per_class(home, tmp_path, capsys, caplog) -> None:
    bottle = make_synthetic_category(tmp_path / "data", "bottle", n_train=2, n_test_good=1, n_test_defect=1, size=32)
    (bottle / "train" / "good" / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    capsys.readouterr()
    with caplog.at_level(logging.DEBUG):
        assert run_cli("ingest", "--home", home, bottle) == 0
    captured = capsys.readouterr()
    everything = captured.out + captured.err + caplog.text
    assert everything.count("999.png") == 1
    summary = next(line for line in captured.out.splitlines() if line.startswith("bottle (mvtec_ad):"))
    assert "2 normal training images, 2 pool images" in summary and summary.endswith("1 skipped")


def test_nothing_usable_exits_2_naming_the_unreadable_files(home, tmp_path, capsys) -> None:
    broken = tmp_path / "data" / "gasket" / "train" / "good"
    broken.mkdir(parents=True)
    (broken / "000.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert run_cli("ingest", "--home", home, broken.parent.parent) == 2
    err = capsys.readouterr().err
    assert "no usable image" in err and "000.png" in err and "MVTec AD" in err
    assert _stored(home) == ([], 0)


def test_next_hints_only_when_a_person_runs_the_step(tmp_path, capsys, monkeypatch) -> None:
    assert run_cli("init", "--home", tmp_path / "by-hand") == 0
    assert "next: dmad ingest" in capsys.readouterr().out
    assert run_cli("init", "--home", tmp_path / "demo", "--no-hint") == 0
    assert "next:" not in capsys.readouterr().out

    steps: list[list[str]] = []
    monkeypatch.setattr(supervisor, "run_step", lambda argv, what: steps.append(list(argv)))
    monkeypatch.setattr(supervisor, "has_active_version", lambda home: False)
    supervisor.prepare_demo(Home.at(tmp_path / "demo-home"))
    commands = [argv[argv.index("--home") - 1] for argv in steps]
    assert commands == ["init", "ingest", "train"]
    assert all("--no-hint" in argv for argv in steps if argv[argv.index("--home") - 1] in ("init", "ingest"))


def test_faiss_loader_info_is_quiet_unless_verbose(tmp_path, monkeypatch) -> None:
    logger = logging.getLogger("faiss.loader")
    monkeypatch.setattr(logger, "level", logging.NOTSET)  # as a fresh process has it; restored afterwards
    run_cli("-v", "down", "--home", tmp_path / "home")
    assert logger.level == logging.NOTSET  # -v: faiss says which library it loaded
    run_cli("down", "--home", tmp_path / "home")
    assert logger.level == logging.WARNING  # its "Could not load library with AVX2 support" INFO is hidden


def test_the_onnx_writers_info_lines_are_quiet_unless_verbose(tmp_path, monkeypatch) -> None:
    """`dmad export` printed about 60 INFO lines of onnxscript's and onnx_ir's passes."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    for logger in loggers:
        monkeypatch.setattr(logger, "level", logging.NOTSET)
    run_cli("down", "--home", tmp_path / "home")
    assert [logger.level for logger in loggers] == [logging.WARNING] * 2


def test_train_progress_prints_each_step_and_a_burst_of_reports_once(capsys) -> None:
    from app.commands.loop import _progress_printer

    show = _progress_printer(True, every_s=3600.0, bars=False)
    for i in range(1, 21):
        show(0.3, f"normal bank coreset: {i}/20 patches selected")
    show(0.4, "epoch 1/3: loss 0.5, validation 0.4")
    show(0.6, "epoch 2/3: loss 0.4, validation 0.3")
    assert capsys.readouterr().out.splitlines() == [
        "[ 30.0%] normal bank coreset: 1/20 patches selected",
        "[ 40.0%] epoch 1/3: loss 0.5, validation 0.4",
        "[ 60.0%] epoch 2/3: loss 0.4, validation 0.3"]


def test_train_progress_leaves_a_step_with_a_terminal_bar_to_the_bar(capsys) -> None:
    """On a terminal the engine draws its own bars: a step's later reports would print its count twice."""
    from app.commands.loop import _progress_printer

    for bars, expected in ((True, 2), (False, 4)):
        show = _progress_printer(True, every_s=0.0, bars=bars)
        for i in (1, 2, 3):
            show(0.1 * i, f"features: normal: {i}/3")
        show(0.5, "building the normal bank (coreset)")
        assert len(capsys.readouterr().out.splitlines()) == expected


# -- unlabelled folders: the guard before normal training data, and `--pool` ---------------------------
def test_a_flat_folder_much_larger_than_the_training_set_is_refused_naming_pool(home, tmp_path, capsys) -> None:
    small = tmp_path / "washers"
    for i in range(3):
        _png(small / f"{i:03d}.png", seed=i)
    assert run_cli("ingest", "--home", home, small, "--category", "washer") == 0
    line = tmp_path / "line-2026-12-01"  # no version yet: the size alone refuses it
    for i in range(200):
        _png(line / f"{i:04d}.png", seed=100 + i)
    capsys.readouterr()
    assert run_cli("ingest", "--home", home, line, "--category", "washer") == 2
    err = capsys.readouterr().err
    assert "--pool" in err and "--all-normal" in err and "200 images" in err
    assert _stored(home) == (["washer"], 3)  # nothing of the refused folder is stored
    assert run_cli("ingest", "--home", home, line, "--category", "washer", "--all-normal") == 0
    assert _stored(home) == (["washer"], 203)
