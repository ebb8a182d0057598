"""Every annotation buys something, and the product shows it: on the demo's hard class (faint tints on unevenly
lit images, which the normal-only model ranks poorly), five masks drawn on the class's hottest defective images
(the top of Review, as a newcomer meets them) and one retrain by the worker lift the class's image AUROC on the
same evaluation images by at least 10 points, in the demo's own four classes. The new version's change record,
`dmad status` and the Training and Metrics pages say what it bought, and a class without annotations is
said to be unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.home_folder import Home
from app.services.database import open_database
from app.services.loop.versions import active_version
from benchmarks.demo_learning import hottest_unannotated
from dmad_core.data import DEMO_HARD_CATEGORY, make_demo_dataset
from tests.loop_fixtures import LoopHome, run_cli
from tests.ui_fixtures import HOME_ENV

UI = Path(__file__).resolve().parents[2] / "app" / "ui"
MASKS = 5


@pytest.fixture(scope="module")
def learnt(tmp_path_factory: pytest.TempPathFactory) -> LoopHome:
    """The demo's data, trained, then masks of the hard class's five hottest defective images under the first
    version, retrained by the worker (one job, as in production)."""
    root = tmp_path_factory.mktemp("learning")
    folders = make_demo_dataset(root / "data")
    loop = LoopHome(Home.at(root / "home"), root / "data")
    assert run_cli("init", *loop.args, "--no-hint") == 0
    assert run_cli("ingest", *loop.args, "--no-hint", *folders) == 0
    assert run_cli("train", *loop.args) == 0
    # the inspector of benchmarks/demo_learning.py (the screenshot's): the class's hottest defects first
    for path, mask in hottest_unannotated(loop.home, DEMO_HARD_CATEGORY, MASKS):
        assert run_cli("annotate", *loop.args, path, "--mask", mask) == 0
    assert run_cli("worker", *loop.args, "--once", "--sync-every", 0) == 0
    return loop


def test_five_masks_lift_the_hard_class_by_ten_points_on_the_same_images(learnt: LoopHome, capsys) -> None:
    capsys.readouterr()
    assert run_cli("status", *learnt.args, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["active_version"]["name"] == "v0002"
    change = status["change"]
    assert change["parent"] == "v0001"
    hard = change["classes"][DEMO_HARD_CATEGORY]
    before, after, low, high = hard["image_auroc"]
    assert after - before >= 0.10, hard  # the learning shows
    assert low <= after - before <= high
    assert hard["scores_moved"] and hard["annotations"]["defect_masks"] == MASKS
    assert hard["image_weight"] > 0  # the masks earned a weight: not the normal-only distance any more
    plain = change["classes"]["tiles"]
    assert not plain["scores_moved"]  # nothing annotated there: the class scores as before
    lines = "\n".join(change["lines"])
    assert f"{DEMO_HARD_CATEGORY}: scores moved; image AUROC" in lines
    assert "tiles: no annotations of its own; its scores did not change." in lines
    assert hard["mask_peak_share"] is not None and plain["mask_peak_share"] is None  # levels from drawn masks
    assert f"its proposed masks are cut at {100 * hard['mask_peak_share']:.0f} % of each image's peak" in lines
    assert change["pool_decisions"]["compared"] > 0  # the pool was re-ranked and compared

    capsys.readouterr()
    assert run_cli("status", *learnt.args) == 0
    text = capsys.readouterr().out
    assert "what it bought against v0001 (same evaluation images):" in text
    assert f"{DEMO_HARD_CATEGORY}: scores moved" in text


def test_the_training_and_metrics_pages_show_what_it_bought(learnt: LoopHome, monkeypatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(learnt.home.root))
    training = AppTest.from_file(str(UI / "pages" / "3_Training.py"), default_timeout=30)
    training.run()
    assert not training.exception, [e.message for e in training.exception]
    said = "\n".join(str(m.value) for m in training.markdown)
    assert "What v0002 bought" in said and f"{DEMO_HARD_CATEGORY}: scores moved; image AUROC" in said

    metrics = AppTest.from_file(str(UI / "pages" / "4_Metrics.py"), default_timeout=30)
    metrics.run()
    assert not metrics.exception, [e.message for e in metrics.exception]
    assert any("What each version bought" in str(s.value) for s in metrics.subheader)
    table = metrics.dataframe[0].value  # the first table: what each version bought
    row = table[table["class"] == DEMO_HARD_CATEGORY].iloc[0]
    assert row["change (points)"] >= 10 and row["against"] == "v0001"
    assert any(f"{DEMO_HARD_CATEGORY} at v0002" in str(c.value) for c in metrics.caption)  # its set changed
    with open_database(learnt.home)() as session:  # the record is the version's own, kept with it
        assert active_version(session).config["evaluation_set"][DEMO_HARD_CATEGORY]["images"] == 24 - MASKS


def test_the_masks_level_is_said_even_where_the_scores_did_not_move() -> None:
    """Drawn masks that leave a class's scores as they were still set its proposed masks: the words say so."""
    from app.services.loop.version_change import class_change_text

    still = {"scores_moved": False, "annotations": {"defect_masks": 4}, "mask_peak_share": 0.65, "mask_grabcut": True}
    said = class_change_text("commutator", still)
    assert said.startswith("commutator: 4 defect annotations; not yet enough to change its scores")
    assert "cut at 65 % of each image's peak, refined by the image's colours (GrabCut)" in said
    none_drawn = {"scores_moved": False, "annotations": {"confirmed_normals": 2}, "mask_peak_share": None}
    assert "proposed masks" not in class_change_text("tire", none_drawn)
