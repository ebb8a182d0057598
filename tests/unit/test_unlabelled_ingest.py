"""Unlabelled line images do not become normal training data by accident: a folder of line images with
defects, given to `dmad ingest --category C` without `--all-normal`, is refused with a message naming
`--pool` (its images score NG under the active version), and `--pool` puts them into the pool that Review
ranks, scored by the active version. Cost: the session's trained home, then a few seconds."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
from sqlalchemy import func, select

from app.services.database import open_database
from app.services.loop.unlabelled import guard
from db.models import Category, Image, PoolScore
from tests.loop_fixtures import LoopHome, run_cli, trained_home, trained_home_template  # noqa: F401


def _line_folder(trained: LoopHome, dest: Path) -> Path:
    """A flat folder of tiles line images: every defective test image of the class and two good ones."""
    dest.mkdir()
    test = trained.data / "tiles" / "test"
    defects = sorted(p for p in test.glob("*/*.png") if p.parent.name != "good")
    goods = sorted((test / "good").glob("*.png"))[:2]
    for i, path in enumerate([*defects, *goods]):
        # a line's feed: no folder says which are defects; mirrored, so that they are new parts, not the pool's
        PIL.Image.open(path).transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(dest / f"line-{i:03d}.png")
    return dest


def _counts(trained: LoopHome) -> tuple[int, int]:
    with open_database(trained.home)() as session:
        tiles = (select(func.count(Image.id)).join(Category, Category.id == Image.category_id)
                 .where(Category.name == "tiles"))
        return (int(session.scalar(tiles.where(Image.role == "train_normal"))),
                int(session.scalar(tiles.where(Image.role == "pool"))))


def test_line_images_with_defects_are_refused_as_normals_and_go_to_the_pool(trained_home: LoopHome, tmp_path,
                                                                            capsys) -> None:
    folder = _line_folder(trained_home, tmp_path / "line")
    before = _counts(trained_home)
    verdict = guard(trained_home.home, open_database(trained_home.home), folder, "tiles")
    assert verdict.refused and verdict.scored == 18 and verdict.ng > 0.1 * verdict.scored

    capsys.readouterr()
    assert run_cli("ingest", *trained_home.args, folder, "--category", "tiles") == 2
    err = capsys.readouterr().err
    assert "--pool" in err and "scored NG" in err
    assert _counts(trained_home) == before  # nothing became normal training data

    assert run_cli("ingest", *trained_home.args, folder, "--category", "tiles", "--pool") == 0
    out = capsys.readouterr().out
    assert "18 new in the pool" in out
    train_after, pool_after = _counts(trained_home)
    assert train_after == before[0]
    with open_database(trained_home.home)() as session:  # the line's images are in the pool, ranked
        stored = int(session.scalar(select(func.count(PoolScore.id)).join(Image, Image.id == PoolScore.image_id)
                                    .where(Image.path.contains("/images/"))))
    assert stored == 18 and pool_after == before[1] + 18
