"""The simulated inspector of benchmarks/active_loop.py on tiny synthetic data, so that it cannot silently
break: the real loop runs (annotations recorded, retrains, re-ranking, a new version a round), its bookkeeping
adds up (defects found, inspector minutes, false alarms), the evaluation split is never offered, and the JSON
has the issue's shape. Cost: about 30-40 s on 2 cores (one small first training, a few warm retrains)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from app.home_folder import Home
from app.services.database import open_database
from benchmarks import active_loop
from db.models import Annotation, Image
from dmad_core.data.synthetic import make_synthetic_category


def test_the_simulated_inspector_runs_the_real_loop_and_its_books_add_up(tmp_path: Path) -> None:
    data = make_synthetic_category(tmp_path / "data", "tiles", n_train=8, n_test_good=6, n_test_defect=6,
                                   size=64, texture="grid", seed=2)
    settings = active_loop.LoopSettings((data,), strategies=("default",), seeds=(0,), minutes=0.3, batch=3,
                                        defect_rate=0.3, mask_seconds=6.0, normal_seconds=1.0, train_epochs=1,
                                        retrain_epochs=1, cache=tmp_path / "features", no_normals_arm=True)
    result = active_loop.run(settings, tmp_path / "work")

    assert set(result["strategies"]) == {"default", active_loop.NO_NORMALS}
    pool = result["pool"]["0"]["tiles"]
    assert pool == {"pool": 10, "pool_defects": 3, "train": 4, "evaluation": 6}
    for name, seeds in result["strategies"].items():
        rounds = seeds["0"]
        assert rounds[0]["minutes"] == 0 and rounds[0]["found"] == 0 and len(rounds) >= 2
        versions = [r["version"] for r in rounds]
        assert versions == sorted(set(versions))  # every round's annotations made a new version
        for before, after in zip(rounds, rounds[1:]):
            masks = after["found"] - before["found"]
            normals = after["offered"] - masks
            spent = (6.0 * masks + 1.0 * normals) / 60
            assert abs(after["minutes"] - before["minutes"] - spent) < 1e-9
            assert after["false_alarms"] - before["false_alarms"] == after["round_false_alarms"] <= normals
        assert rounds[-1]["minutes"] >= 0.3 or sum(r["offered"] for r in rounds) == 10
        assert rounds[-1]["found"] <= 3
        for r in rounds:
            m = r["per_class"]["tiles"]
            assert set(m) == set(active_loop.METRICS) and 0 <= m["image_auroc"] <= 1
    # the JSON the issue asks for, and the tables and picture read it
    text = json.dumps(result)
    assert json.loads(text)["strategies"]["default"]["0"][1]["per_class"]["tiles"]["pro"] is not None
    assert "| default |" in active_loop.report(result)
    assert active_loop.CEILING in active_loop.report(result)
    active_loop.plot(result, tmp_path / "loop.png")
    assert (tmp_path / "loop.png").stat().st_size > 10_000


def test_the_evaluation_split_is_fixed_and_never_offered(tmp_path: Path) -> None:
    data = make_synthetic_category(tmp_path / "data", "tiles", n_train=6, n_test_good=6, n_test_defect=6,
                                   texture="grid", seed=4)
    from dmad_core.data.readers import read_category

    ds = read_category(data)
    split = active_loop.make_split([ds], active_loop.LoopSettings((data,), seeds=(0, 1, 2), defect_rate=0.25))
    assert sorted(r.label for _, r in split.evaluation) == [0, 0, 0, 1, 1, 1]  # stratified, by content hash
    held = {r.path for _, r in split.evaluation}
    assert not held & {p for p, _ in split.pool.values()} and not held & {p for _, p in split.train}
    # the seeds draw the pool's defects (3 normals held back + 3 test goods: 2 of the 3 other defects)
    defects = {h for h, (_, truth) in split.pool.items() if truth.label == 1}
    assert all(len(defects - split.hidden[seed]) == 2 for seed in (0, 1, 2))
    assert len({frozenset(split.hidden[seed]) for seed in (0, 1, 2)}) > 1


def test_the_ceiling_offers_every_defect_first_at_the_benchmarks_own_costs() -> None:
    settings = {"minutes": 2, "batch": 5, "mask_seconds": 30, "normal_seconds": 3}
    rounds = active_loop.ceiling_rounds({"a": {"pool": 10, "pool_defects": 2}}, settings)
    assert rounds == [{"minutes": 0.0, "found": 0}, {"minutes": 1.15, "found": 2}, {"minutes": 1.4, "found": 2}]
    # the classes share the budget, and it stops the inspector mid-round
    two = {"a": {"pool": 10, "pool_defects": 5}, "b": {"pool": 10, "pool_defects": 1}}
    assert active_loop.ceiling_rounds(two, {**settings, "minutes": 1})[-1] == {"minutes": 1.0, "found": 4}


def test_the_budgets_last_round_is_the_one_during_which_it_ran_out() -> None:
    settings = {"minutes": 4, "batch": 32, "mask_seconds": 30, "normal_seconds": 3}
    rounds = [{"minutes": 0.0}, {"minutes": 2.6}, {"minutes": 4.1}, {"minutes": 4.5}]
    # 3 classes: the image that spends the budget adds at most 30 s / 3 = 0.17 minutes a class
    assert active_loop.at_budget(rounds, 4, settings, 3) == {"minutes": 4.1}
    assert active_loop.at_minutes(rounds, 4) == {"minutes": 2.6}  # a curve's point before the budget: ended by then
    assert active_loop.at_budget(rounds, 4, settings, 1) == {"minutes": 4.5}  # one class: up to 30 s past it
    assert active_loop.at_budget(rounds[:2] + rounds[3:], 4, settings, 3) == {"minutes": 2.6}
